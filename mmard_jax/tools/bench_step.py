"""Our side of scripts/benchmark.py: the JAX train step of a case, its FLOPs, its first random draws, and one
timed row (the JAX worker); the start file that lets the PyTorch row (tests/peers/torch_bench.py) begin from the
same weights and draws.

FLOPs: XLA's cost analysis counts a `while` body once, so the step is lowered with 0 and 1 PGD
iterations and the count is f(0) + steps * (f(1) - f(0)), independent of how the loop is unrolled.
"""

import os
import resource
import statistics
import time
from typing import Any, Dict, List, Optional

from mmard_jax.tools.bench_cases import EPOCH, Case, bench_data


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarize(times: List[float], batch: int, total_s: float, n: int) -> Dict[str, Any]:
    """Median step time, throughput over the timed run, the spread, and the machine's load average."""
    return {
        "load_avg_1min": os.getloadavg()[0],
        "cpus": len(os.sched_getaffinity(0)),
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "images_per_s": batch * n / total_s,
        "timed_steps": n,
    }


def save_start(path: str, variables: Dict[str, Any], draws: Dict[str, Any]) -> None:
    """Initial variables ({network: Flax variables}) and the first step's draws, as one .npz for the torch worker."""
    import numpy as np

    from mmard_jax.interop import naming

    arrays = {f"var/{net}/" + "/".join(p): np.asarray(v, np.float32)
              for net, tree in variables.items() for p, v in naming.flatten_variables(tree).items()}
    arrays.update({f"draw/{k}": np.asarray(v) for k, v in draws.items() if v is not None})
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_start(path: str):
    """Inverse of `save_start`: ({network: nested variables}, {draw name: array})."""
    import numpy as np
    from flax import traverse_util

    variables, draws = {}, {}
    with np.load(path) as data:
        for key in data.files:
            kind, rest = key.split("/", 1)
            if kind == "draw":
                draws[rest] = data[key]
            else:
                net, leaf = rest.split("/", 1)
                variables.setdefault(net, {})[tuple(leaf.split("/"))] = data[key]
    return {net: traverse_util.unflatten_dict(flat) for net, flat in variables.items()}, draws


# ----------------------------------------------------------------------------- JAX worker


def step_settings(case: Case, pgd_steps: int, unroll: str):
    """The StepSettings of the case's step: the method's published attack start and BatchNorm mode, PGD-`pgd_steps`."""
    from mmard_jax import methods, runtime, train_step

    return train_step.StepSettings(steps=pgd_steps, unroll=runtime.resolve_unroll(unroll),
                                   **methods.attack_defaults(case.method))


def jax_step_builder(case: Case, seed: int = 0):
    """(build(pgd_steps, unroll) -> jitted step, nets, method, txs, mesh) for `case`."""
    import jax.numpy as jnp

    from mmard_jax import methods, models, parallel, train_step
    from mmard_jax.models import layers

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}[case.dtype]
    mesh = parallel.data_mesh()
    parallel.check_divisible(case.batch, mesh)
    method = methods.get_method(case.method, plugins=case.plugins)
    common = {"dtype": dtype, "conv_grad": layers.default_conv_grad()}  # a row's --conv_grad: $MMARD_JAX_CONV_GRAD
    classes = case.num_classes
    student = models.create(case.student, classes, bn_axis_name=parallel.AXIS, **common, **case.student_kwargs)
    used = method.networks()
    # The case's teacher architecture serves every teacher role: the frozen teacher, CIARD's clean teacher
    # (teacher2) and its trained robust teacher (rteacher, cross-device BatchNorm as every trained network).
    teachers = {role: models.create(case.teacher, classes, **common, **case.teacher_kwargs,
                                    **({"bn_axis_name": parallel.AXIS} if role == "rteacher" else {}))
                for role in ("teacher", "teacher2", "rteacher") if role in used}
    peer = models.create(case.student, classes, bn_axis_name=parallel.AXIS, **common, **case.student_kwargs) \
        if "peer" in used else None
    nets = train_step.Networks(student, peer=peer, **teachers)
    schedule = train_step.make_lr_schedule(0.1, 390, 300)
    txs = {n: rteacher_optimizer() if n == "rteacher" else train_step.make_optimizer(schedule)
           for n in nets.trained()}

    def build(pgd_steps: int, unroll: str):
        settings = step_settings(case, pgd_steps, unroll)
        return train_step.make_train_step(nets, method, method.phase(EPOCH), txs, schedule, settings, mesh, seed)

    return build, nets, method, txs, mesh


def jax_step_draws(seed: int, step: int, batch: int, image_shape, settings) -> Dict[str, Any]:
    """The random draws of `train_step.make_train_step(..., seed)`'s step number `step` for a global batch, on the
    host: crop offsets [B, 2], flips [B] and the attack's start offset from x, NHWC (None for init 'none').

    Mirrors `make_train_step` (k_aug, k_init = split(fold_in(key(seed), step))), `augment_batch` and
    `engine.initial_point`'s per-example draws, so that the PyTorch step can start from the same point;
    tests/test_benchmark.py checks the two steps agree, so a change there fails there.
    """
    import jax
    import numpy as np

    from mmard_jax import parallel
    from mmard_jax.data.augment import crop_flip_params

    k_aug, k_init = jax.random.split(jax.random.fold_in(jax.random.key(seed), step))
    offsets, flips = crop_flip_params(k_aug, batch, padding=settings.crop_padding, flip=settings.flip)
    keys = parallel.example_keys(k_init, jax.numpy.arange(batch))
    shape = tuple(image_shape)
    if settings.init == "uniform":
        noise = jax.vmap(lambda k: jax.random.uniform(k, shape, jax.numpy.float32, -settings.eps, settings.eps))(keys)
    elif settings.init == "gaussian":
        noise = jax.vmap(lambda k: settings.gaussian_scale * jax.random.normal(k, shape, jax.numpy.float32))(keys)
    else:
        noise = None
    return {"offsets": np.asarray(offsets), "flips": np.asarray(flips),
            "noise": None if noise is None else np.asarray(noise)}


def rteacher_optimizer():
    """CIARD's robust-teacher optimizer as the trainer builds it from config.rteacher.optim (config_lib.RTEACHER_OPTIM:
    SGD 1e-4, momentum 0.1, wd 2e-4, 'cosine_exp' from 0-based epoch 49), at the benchmark's 390 steps x 300 epochs."""
    from mmard_jax import config_lib, train_step

    o = config_lib.optim_block(**config_lib.RTEACHER_OPTIM)
    schedule = train_step.make_lr_schedule(o.lr, 390, 300, o.schedule, tuple(o.boundaries), o.decay, o.per_epoch)
    return train_step.make_optimizer(schedule, o.momentum, o.weight_decay, o.nesterov)


def frozen_variables(case: Case, nets, init):
    """The variables of the teachers the case uses: `init(module, salt)` for each (the teacher salt 0, the clean
    teacher 1), and CIARD's robust teacher's start, the teacher's weights (salt 0), as the trainer starts it from
    config.teacher's checkpoint (`train.build_networks`); `split_start` separates it from the frozen ones."""
    out = {"teacher": init(nets.teacher, 0)} if nets.teacher is not None else {}
    if nets.teacher2 is not None:
        out["teacher2"] = init(nets.teacher2, 1)
    if nets.rteacher is not None:
        out["rteacher"] = init(nets.rteacher, 0)
    return out


def split_start(variables):
    """`frozen_variables`' output -> (the frozen teachers' variables the step reads, {trained network: its start})."""
    from mmard_jax import methods

    initial = {k: v for k, v in variables.items() if k in methods.core.TRAINED}
    return {k: v for k, v in variables.items() if k not in initial}, initial


def sharpen_teacher(case: Case, frozen):
    """The teacher's classifier kernel (`fc`) x `case.teacher_scale` (a confident teacher; bench_cases.CPU_LATER):
    the frozen teacher's, or the start of CIARD's robust teacher."""
    if case.teacher_scale == 1.0:
        return frozen
    out = dict(frozen)
    for role in ("teacher", "rteacher"):
        if role not in frozen:
            continue
        params = frozen[role]["params"]
        if "fc" not in params:
            raise ValueError(f"teacher_scale needs a classifier named 'fc'; {case.teacher} has {sorted(params)}")
        fc = dict(params["fc"], kernel=params["fc"]["kernel"] * case.teacher_scale)
        out[role] = {**frozen[role], "params": {**params, "fc": fc}}
    return out


def _abstract_args(case: Case, nets, method, txs, n_images: int):
    """Shapes and dtypes of the step's arguments (no memory, no compilation)."""
    import jax
    import jax.numpy as jnp

    from mmard_jax import train_step

    shape = (case.size, case.size, 3)
    frozen, initial = split_start(frozen_variables(
        case, nets,
        lambda m, salt: jax.eval_shape(lambda: m.init(jax.random.key(salt), jnp.zeros((1,) + shape), train=False))))
    state = jax.eval_shape(lambda: float64_stats(case, train_step.init_state(nets, method, txs, jax.random.key(0),
                                                                             shape, initial=initial)))
    return (state, frozen, jax.ShapeDtypeStruct((n_images,) + shape, jnp.uint8),
            jax.ShapeDtypeStruct((n_images,), jnp.int32), jax.ShapeDtypeStruct((case.batch,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))


def step_flops(case: Case) -> float:
    """FLOPs of one train step from XLA's cost analysis of the lowered program: f(0) + steps * (f(1) - f(0)).

    A `while` body is counted once however many times it runs, so the PGD iterations are counted by
    difference; the result does not depend on the loop's unrolling.
    """
    build, nets, method, txs, _ = jax_step_builder(case)
    args = _abstract_args(case, nets, method, txs, n_images=max(4 * case.batch, 512))
    f0, f1 = (build(k, "1").lower(*args).cost_analysis()["flops"] for k in (0, 1))
    return f0 + case.pgd_steps * (f1 - f0)


def _initial(case: Case, seed: int, mesh, nets, method, txs):
    """The step's initial state and the teachers' variables, replicated over `mesh` (random weights; CIARD's robust
    teacher starts from the teacher's)."""
    import jax

    from mmard_jax import parallel, train_step

    shape = (case.size, case.size, 3)
    rep = parallel.replicated(mesh)
    frozen, initial = split_start(sharpen_teacher(case, frozen_variables(case, nets, teacher_init(seed, shape))))
    state = float64_stats(case, train_step.init_state(nets, method, txs, jax.random.key(seed, impl="rbg"), shape,
                                                      initial=initial))
    return jax.device_put(state, rep), jax.device_put(frozen, rep)


def float64_stats(case: Case, state):
    """A float64 case's trained networks keep their running statistics in float64, the dtype their float64 forwards
    update them in (a step must return the state's own types); other cases' state unchanged."""
    import jax

    if case.dtype != "float64":
        return state
    return state.replace(nets={k: s.replace(batch_stats=jax.tree.map(lambda a: a.astype("float64"), s.batch_stats))
                               for k, s in state.nets.items()})


def x64_scope(case: Case):
    """`jax.enable_x64` for a float64 case (its networks compute in float64), a no-op scope for the others."""
    import jax

    return jax.enable_x64(case.dtype == "float64")


def teacher_init(seed: int, shape):
    """`init(module, salt)` of `frozen_variables`: the module's random variables from key seed + 1 + salt."""
    import jax
    import jax.numpy as jnp

    return lambda m, salt: jax.jit(lambda k: m.init(k, jnp.zeros((1,) + tuple(shape)), train=False))(
        jax.random.key(seed + 1 + salt, impl="rbg"))


def write_start(case: Case, path: str, state, frozen, seed: int = 0) -> None:
    """The torch worker's start: our initial variables and step 0's draws (`save_start`)."""
    import jax

    variables = {name: {"params": s.params, "batch_stats": s.batch_stats} for name, s in state.nets.items()}
    variables.update(frozen)
    draws = jax_step_draws(seed, 0, case.batch, (case.size, case.size, 3), step_settings(case, case.pgd_steps, "1"))
    save_start(path, jax.device_get(variables), draws)


def compiled_kernels(compiled) -> int:
    """The fusions in a compiled program's optimized HLO: on XLA:CPU each is a kernel compiled on its own, the count
    a compile time follows (BENCHMARKS.md, "Compile time of the MobileNetV2 step")."""
    return sum(" fusion(" in line and "calls=" in line for line in compiled.as_text().splitlines())


def flops_worker(case: Case, start_file: Optional[str] = None, seed: int = 0) -> Dict[str, Any]:
    """The FLOP count alone (PyTorch-only runs), and the torch worker's start file if asked (float64: x64's draws)."""
    with x64_scope(case):
        if start_file:
            build, nets, method, txs, mesh = jax_step_builder(case, seed)
            write_start(case, start_file, *_initial(case, seed, mesh, nets, method, txs), seed=seed)
        return {"impl": "flops", "form": "", "flops_per_step": step_flops(case)}


def jax_worker(case: Case, warmup: int, steps: int, unroll: str, seed: int = 0, start_file: Optional[str] = None,
               compiler_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Compiles and times mmard_jax's train step for `case` (random weights and data, resident on the device);
    writes the torch worker's start to `start_file` if given. `compiler_options` go to XLA (tests: its cheaper
    LLVM passes, the same arithmetic). A float64 case runs under `jax.enable_x64` (its draws are then x64's, and
    its start file carries them to the PyTorch 'f64' row)."""
    with x64_scope(case):
        return _jax_worker(case, warmup, steps, unroll, seed, start_file, compiler_options)


def _jax_worker(case, warmup, steps, unroll, seed, start_file, compiler_options) -> Dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from mmard_jax import parallel

    build, nets, method, txs, mesh = jax_step_builder(case, seed)
    state, frozen = _initial(case, seed, mesh, nets, method, txs)
    if start_file:
        write_start(case, start_file, state, frozen, seed)
    rep = parallel.replicated(mesh)
    total = warmup + steps
    images_np, labels_np, idx_np = bench_data(case, total, seed)
    images, labels = jax.device_put(jnp.asarray(images_np), rep), jax.device_put(jnp.asarray(labels_np), rep)
    idx = jax.device_put(jnp.asarray(idx_np), parallel.batch_sharded(mesh, axis=1))
    epoch = jnp.asarray(EPOCH, jnp.int32)
    args = lambda i: (state, frozen, images, labels, idx[i], epoch)  # noqa: E731

    flops_per_step = step_flops(case)
    t0 = time.perf_counter()
    compiled = build(case.pgd_steps, unroll).lower(*args(0)).compile(compiler_options=compiler_options)
    compile_s = time.perf_counter() - t0
    kernels = compiled_kernels(compiled)
    first_loss = None
    for i in range(warmup):
        state, metrics = compiled(*args(i))
        first_loss = float(metrics["loss"]) if i == 0 else first_loss
    jax.block_until_ready(state)
    times = []
    start = time.perf_counter()
    for i in range(warmup, total):
        t = time.perf_counter()
        state, metrics = compiled(*args(i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    jax.block_until_ready(state)
    total_s = time.perf_counter() - start

    device = jax.devices()[0]
    mem = (device.memory_stats() or {}).get("peak_bytes_in_use")
    flags = os.environ.get("XLA_FLAGS", "")
    conv = os.environ.get("MMARD_JAX_CONV_GRAD", "")
    bn = os.environ.get("MMARD_JAX_BN_GRAD", "")
    out = {
        "impl": "jax", "backend": jax.default_backend(),
        "form": f"{case.dtype}, unroll={unroll}" + (f", conv_grad={conv}" if conv else "")
                + (f", bn_grad={bn}" if bn else "")
                + (f", XLA_FLAGS={flags}" if flags else ""),
        "device_kind": device.device_kind, "n_devices": mesh.devices.size,
        "versions": f"jax {jax.__version__}, jaxlib {jax.lib.__version__}",
        "compile_s": compile_s, "kernels": kernels, "flops_per_step": flops_per_step, "loss": float(metrics["loss"]),
        "first_loss": first_loss, "dtype": case.dtype,
        "peak_mem_bytes": mem if mem is not None else peak_rss_bytes(),
        "mem_kind": "device peak" if mem is not None else "process peak RSS",
        "xla_flags": flags,
    }
    out.update(summarize(times, case.batch, total_s, steps))
    return out
