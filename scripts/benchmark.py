"""Times mmard_jax's fused train step against a PyTorch implementation of the same step, on the same device.

    python scripts/benchmark.py --cases=cpu_mmard_wrn16_2_wrn10_1_16px --append=BENCHMARKS.md
    python scripts/benchmark.py --cases=mmard_rn18_wrn34_10,mmard_mnv2_wrn34_10,rslad_rn18_wrn34_10 \
        --torch_forms=eager,cl+compile+bf16 --append=BENCHMARKS.md          # on a GPU
    python scripts/benchmark.py --list                                      # the cases

For each case (method, student, teacher, batch, image size, compute dtype) it measures the whole step in
steady state: images/s, compile time, peak memory (the device's peak where `memory_stats()` has one, the
process's peak RSS on the CPU), FLOPs per step from XLA's cost analysis, achieved TFLOP/s and the fraction
of the device's dense peak. Every (case, implementation) runs in its own process, so peak memory and
thread pools are its own; the PyTorch rows reuse the JAX row's FLOP count (the same computation).

Same work on both sides: the JAX worker writes its initial variables (student, teacher, peer) and its first step's
random draws (crop offsets, flips, attack start) to a file that the PyTorch worker loads, both draw the same batches,
and each row reports its first step's loss; a PyTorch row whose loss differs from the JAX row's by more than the
rounding of the two compute dtypes (`LOSS_RTOL`) is marked 'not comparable' in the table.

FLOPs: XLA's cost analysis counts a `while` body once, so the step is lowered with 0 and 1 PGD
iterations and the count is f(0) + steps * (f(1) - f(0)), independent of how the loop is unrolled.
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Dense peak TFLOP/s by device kind substring (first match wins) and compute dtype. float32 rows run on
# the tensor cores as TF32 (XLA's default precision on GPUs; PyTorch's default for cuDNN convolutions),
# so their peak is the TF32 one. Sources: NVIDIA H100 datasheet (SXM / PCIe), H200 datasheet (same chip),
# A100 datasheet, GA102 whitepaper (RTX 3090: bf16 tensor with fp32 accumulate 71, fp32 35.6).
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float32": 494.5}),
    ("H200", {"bfloat16": 989.0, "float32": 494.5}),
    ("GH200", {"bfloat16": 989.0, "float32": 494.5}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("RTX 3090", {"bfloat16": 71.0, "float32": 35.6}),
)
# First-step losses of a JAX row and a PyTorch row agree within this relative tolerance, by the coarser compute
# dtype of the two and the backend: float32 on the CPU is float32 rounding (plus the odd PGD sign flipped by it);
# float32 on a GPU runs the convolutions as TF32 on both sides (10-bit mantissa); bfloat16 has an 8-bit mantissa.
LOSS_RTOL = {("cpu", "float32"): 1e-4, ("gpu", "float32"): 1e-2, ("cpu", "bfloat16"): 5e-2, ("gpu", "bfloat16"): 5e-2}
# Epoch given to both steps: past IAD's/AdaIAD's 60-epoch warm-up (the full sequence of forwards); the IGDM term's
# weight is then (100 + 1) / 200.
EPOCH = 100


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked step: method, student and teacher (arch, kwargs; none for PeerAiD, whose peer is the
    student's architecture), batch, image size, compute dtype."""

    method: str
    student: str
    student_kwargs: Dict[str, Any]
    teacher: str
    teacher_kwargs: Dict[str, Any]
    batch: int = 128
    size: int = 32
    dtype: str = "float32"
    pgd_steps: int = 10
    note: str = ""


WRN34_10 = ("wide_resnet", {"depth": 34, "width": 10})
WRN16_2 = ("wide_resnet", {"depth": 16, "width": 2})
WRN10_1 = ("wide_resnet", {"depth": 10, "width": 1})
RN18 = ("resnet18", {})
MNV2 = ("mobilenet_v2", {})
NO_TEACHER = ("", {})


def _case(method, student, teacher, **kw) -> Case:
    return Case(method, student[0], student[1], teacher[0], teacher[1], **kw)


def _paper_cases(method: str, student, teacher, name: str) -> Dict[str, Case]:
    """The bfloat16 case and its float32 twin (what the paper's RTX 3090 ran)."""
    return {name: _case(method, student, teacher, dtype="bfloat16"), f"{name}_f32": _case(method, student, teacher)}


CASES = {
    # The paper's setting (GPU targets).
    **_paper_cases("mmard", RN18, WRN34_10, "mmard_rn18_wrn34_10"),
    **_paper_cases("mmard", MNV2, WRN34_10, "mmard_mnv2_wrn34_10"),
    **_paper_cases("rslad", RN18, WRN34_10, "rslad_rn18_wrn34_10"),
    # The methods after the paper: they call the teacher at every attack step as MMARD does (PeerAiD: its peer,
    # a second ResNet-18, trained jointly).
    **_paper_cases("adaad", RN18, WRN34_10, "adaad_rn18_wrn34_10"),
    **_paper_cases("adaiad", RN18, WRN34_10, "adaiad_rn18_wrn34_10"),
    **_paper_cases("igdm", RN18, WRN34_10, "igdm_rn18_wrn34_10"),
    **_paper_cases("peeraid", RN18, NO_TEACHER, "peeraid_rn18"),
    # CPU-sized cases: a WRN-16-2 teacher, small students, 16x16 or 32x32 images.
    "cpu_mmard_wrn16_2_wrn10_1_16px": _case("mmard", WRN10_1, WRN16_2, size=16, note="docs/design.md, \"Performance choices\" case"),
    "cpu_mmard_wrn16_2_wrn10_1_16px_bf16": _case("mmard", WRN10_1, WRN16_2, size=16, dtype="bfloat16"),
    "cpu_mmard_wrn16_2_wrn10_1_32px": _case("mmard", WRN10_1, WRN16_2),
    "cpu_rslad_wrn16_2_wrn10_1_16px": _case("rslad", WRN10_1, WRN16_2, size=16),
    "cpu_mmard_wrn16_2_mnv2_16px": _case("mmard", MNV2, WRN16_2, size=16),
    "cpu_mmard_wrn16_2_rn18_16px": _case("mmard", RN18, WRN16_2, size=16),
    "cpu_adaad_wrn16_2_wrn10_1_16px": _case("adaad", WRN10_1, WRN16_2, size=16),
    "cpu_adaiad_wrn16_2_wrn10_1_16px": _case("adaiad", WRN10_1, WRN16_2, size=16),
    "cpu_igdm_wrn16_2_wrn10_1_16px": _case("igdm", WRN10_1, WRN16_2, size=16),
    "cpu_peeraid_wrn10_1_16px": _case("peeraid", WRN10_1, NO_TEACHER, size=16),
    # scripts/gpu_check.sh part (c): a GPU case that compiles in seconds (the loop and conv settings).
    "probe_mmard_rn18_wrn16_2_bf16": _case("mmard", RN18, WRN16_2, dtype="bfloat16"),
    # For tests: seconds, not minutes.
    "tiny": _case("mmard", WRN10_1, WRN10_1, batch=8, size=8, pgd_steps=2),
    "tiny_bf16": _case("mmard", WRN10_1, WRN10_1, batch=8, size=8, pgd_steps=2, dtype="bfloat16"),
    "tiny_peeraid": _case("peeraid", WRN10_1, NO_TEACHER, batch=8, size=8, pgd_steps=2),
}


# Named groups for --cases.
GROUPS = {
    "paper": "mmard_rn18_wrn34_10,mmard_mnv2_wrn34_10,rslad_rn18_wrn34_10",
    "paper_f32": "mmard_rn18_wrn34_10_f32,mmard_mnv2_wrn34_10_f32,rslad_rn18_wrn34_10_f32",
    "paper_sota": "adaad_rn18_wrn34_10,adaiad_rn18_wrn34_10,igdm_rn18_wrn34_10,peeraid_rn18",
    "paper_sota_f32": "adaad_rn18_wrn34_10_f32,adaiad_rn18_wrn34_10_f32,igdm_rn18_wrn34_10_f32,peeraid_rn18_f32",
    "cpu": "cpu_mmard_wrn16_2_wrn10_1_16px,cpu_mmard_wrn16_2_mnv2_16px,cpu_rslad_wrn16_2_wrn10_1_16px",
    "cpu_sota": "cpu_adaad_wrn16_2_wrn10_1_16px,cpu_adaiad_wrn16_2_wrn10_1_16px,cpu_igdm_wrn16_2_wrn10_1_16px,"
                "cpu_peeraid_wrn10_1_16px",
}


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
    """The device's dense peak for `dtype` from PEAK_TFLOPS, None for CPUs and unknown kinds."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


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


def bench_data(case: Case, total: int, seed: int = 0):
    """The split and the batches both workers use: uint8 images [N, H, W, 3], labels [N], indices [total, B]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_images = max(4 * case.batch, 512)
    images = rng.integers(0, 256, (n_images, case.size, case.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n_images).astype(np.int32)
    idx = np.stack([rng.permutation(n_images)[: case.batch] for _ in range(total)]).astype(np.int32)
    return images, labels, idx


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


def _jax_step_builder(case: Case, seed: int = 0):
    """(build(pgd_steps, unroll) -> jitted step, nets, method, txs, mesh) for `case`."""
    import jax.numpy as jnp

    from mmard_jax import methods, models, parallel, train_step
    from mmard_jax.models import layers

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[case.dtype]
    mesh = parallel.data_mesh()
    parallel.check_divisible(case.batch, mesh)
    method = methods.get_method(case.method)
    common = {"dtype": dtype, "conv_grad": layers.default_conv_grad()}  # a row's --conv_grad: $MMARD_JAX_CONV_GRAD
    student = models.create(case.student, 10, bn_axis_name=parallel.AXIS, **common, **case.student_kwargs)
    used = method.networks()
    teacher = models.create(case.teacher, 10, **common, **case.teacher_kwargs) if "teacher" in used else None
    peer = models.create(case.student, 10, bn_axis_name=parallel.AXIS, **common, **case.student_kwargs) \
        if "peer" in used else None
    nets = train_step.Networks(student, teacher, None, peer)
    schedule = train_step.make_lr_schedule(0.1, 390, 300)
    txs = {n: train_step.make_optimizer(schedule) for n in nets.trained()}

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


def _frozen(case: Case, nets, init):
    """The teachers' variables: `init(module)` for each frozen network the case uses."""
    return {"teacher": init(nets.teacher)} if nets.teacher is not None else {}


def _abstract_args(case: Case, nets, method, txs, n_images: int):
    """Shapes and dtypes of the step's arguments (no memory, no compilation)."""
    import jax
    import jax.numpy as jnp

    from mmard_jax import train_step

    shape = (case.size, case.size, 3)
    frozen = _frozen(case, nets, lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1,) + shape), train=False)))
    state = jax.eval_shape(lambda: train_step.init_state(nets, method, txs, jax.random.key(0), shape))
    return (state, frozen, jax.ShapeDtypeStruct((n_images,) + shape, jnp.uint8),
            jax.ShapeDtypeStruct((n_images,), jnp.int32), jax.ShapeDtypeStruct((case.batch,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))


def step_flops(case: Case) -> float:
    """FLOPs of one train step from XLA's cost analysis of the lowered program: f(0) + steps * (f(1) - f(0)).

    A `while` body is counted once however many times it runs, so the PGD iterations are counted by
    difference; the result does not depend on the loop's unrolling.
    """
    build, nets, method, txs, _ = _jax_step_builder(case)
    args = _abstract_args(case, nets, method, txs, n_images=max(4 * case.batch, 512))
    f0, f1 = (build(k, "1").lower(*args).cost_analysis()["flops"] for k in (0, 1))
    return f0 + case.pgd_steps * (f1 - f0)


def _initial(case: Case, seed: int, mesh, nets, method, txs):
    """The step's initial state and the teachers' variables, replicated over `mesh` (random weights)."""
    import jax
    import jax.numpy as jnp

    from mmard_jax import parallel, train_step

    shape = (case.size, case.size, 3)
    rep = parallel.replicated(mesh)
    init = lambda m: jax.jit(lambda k: m.init(k, jnp.zeros((1,) + shape), train=False))(  # noqa: E731
        jax.random.key(seed + 1, impl="rbg"))
    frozen = jax.device_put(_frozen(case, nets, init), rep)
    state = jax.device_put(train_step.init_state(nets, method, txs, jax.random.key(seed, impl="rbg"), shape), rep)
    return state, frozen


def write_start(case: Case, path: str, state, frozen, seed: int = 0) -> None:
    """The torch worker's start: our initial variables and step 0's draws (`save_start`)."""
    import jax

    variables = {name: {"params": s.params, "batch_stats": s.batch_stats} for name, s in state.nets.items()}
    variables.update(frozen)
    draws = jax_step_draws(seed, 0, case.batch, (case.size, case.size, 3), step_settings(case, case.pgd_steps, "1"))
    save_start(path, jax.device_get(variables), draws)


def flops_worker(case: Case, start_file: Optional[str] = None, seed: int = 0) -> Dict[str, Any]:
    """The FLOP count alone (PyTorch-only runs), and the torch worker's start file if asked."""
    if start_file:
        build, nets, method, txs, mesh = _jax_step_builder(case, seed)
        write_start(case, start_file, *_initial(case, seed, mesh, nets, method, txs), seed=seed)
    return {"impl": "flops", "form": "", "flops_per_step": step_flops(case)}


def jax_worker(case: Case, warmup: int, steps: int, unroll: str, seed: int = 0,
               start_file: Optional[str] = None) -> Dict[str, Any]:
    """Compiles and times mmard_jax's train step for `case` (random weights and data, resident on the device);
    writes the torch worker's start to `start_file` if given."""
    import jax
    import jax.numpy as jnp

    from mmard_jax import parallel

    build, nets, method, txs, mesh = _jax_step_builder(case, seed)
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
    compiled = build(case.pgd_steps, unroll).lower(*args(0)).compile()
    compile_s = time.perf_counter() - t0
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
    out = {
        "impl": "jax", "backend": jax.default_backend(),
        "form": f"{case.dtype}, unroll={unroll}" + (f", conv_grad={conv}" if conv else "")
                + (f", XLA_FLAGS={flags}" if flags else ""),
        "device_kind": device.device_kind, "n_devices": mesh.devices.size,
        "versions": f"jax {jax.__version__}, jaxlib {jax.lib.__version__}",
        "compile_s": compile_s, "flops_per_step": flops_per_step, "loss": float(metrics["loss"]),
        "first_loss": first_loss, "dtype": case.dtype,
        "peak_mem_bytes": mem if mem is not None else peak_rss_bytes(),
        "mem_kind": "device peak" if mem is not None else "process peak RSS",
        "xla_flags": flags,
    }
    out.update(summarize(times, case.batch, total_s, steps))
    return out


# ----------------------------------------------------------------------------- PyTorch worker


def torch_worker(case: Case, warmup: int, steps: int, form_text: str, seed: int = 0,
                 start_file: Optional[str] = None) -> Dict[str, Any]:
    """Times scripts/torch_reference.py's step for `case` in the given form, on the device: from the JAX worker's
    weights and first draws (`start_file`, when it exists), on the same batches."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    import torch_reference as tr

    from mmard_jax import methods
    from mmard_jax.interop.testing import copy_into_torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    form = tr.parse_form(form_text)
    if device.type == "cuda" and form.name != "eager":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    used = methods.get_method(case.method).networks()
    arch = {"student": (case.student, case.student_kwargs), "peer": (case.student, case.student_kwargs),
            "teacher": (case.teacher, case.teacher_kwargs)}
    nets = {name: tr.build_model(arch[name][0], 10, arch[name][1]) for name in arch if name in used}
    draws, weights = {}, "own (random)"
    if start_file and os.path.exists(start_file):
        variables, draws = load_start(start_file)
        nets = {name: copy_into_torch(variables[name], net) for name, net in nets.items()}
        weights = "the JAX row's"
    nets = {name: net.to(device) for name, net in nets.items()}
    # Our semantics where the published scripts differ in value only: the start projected (the random images hold
    # 0 and 255) and the exact KL (RSLAD's/MTARD's 1e-5); see torch_reference's docstring.
    settings = tr.Settings(method=case.method, steps=case.pgd_steps, kl_form="exact", project_start=True)
    step = tr.TorchTrainStep(nets["student"], nets.get("teacher"), settings, form, seed=seed, peer=nets.get("peer"))
    total = warmup + steps
    images_np, labels_np, idx_np = bench_data(case, total, seed)
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(labels_np).long().to(device)
    idx = torch.from_numpy(idx_np).long().to(device)
    first = {}
    if draws:
        noise = draws.get("noise")
        first = {"offsets": torch.from_numpy(draws["offsets"]).long().to(device),
                 "flips": torch.from_numpy(draws["flips"]).to(device),
                 "noise": None if noise is None else torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous().to(device)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    metrics = step(images, labels, idx[0], epoch=EPOCH, **first)
    first_loss = float(metrics["loss"])
    first_s = time.perf_counter() - t0
    for i in range(1, warmup):
        metrics = step(images, labels, idx[i], epoch=EPOCH)
    sync()
    times = []
    start = time.perf_counter()
    for i in range(warmup, total):
        t = time.perf_counter()
        metrics = step(images, labels, idx[i], epoch=EPOCH)
        sync()
        times.append(time.perf_counter() - t)
    total_s = time.perf_counter() - start
    out = {
        "impl": "torch", "form": form.name, "backend": device.type,
        "device_kind": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "n_devices": 1, "versions": tr.torch_versions(), "threads": torch.get_num_threads(),
        # torch.compile compiles lazily: the first step's excess over a steady step is its compile time.
        "compile_s": first_s - statistics.median(times), "loss": float(metrics["loss"]),
        "first_loss": first_loss, "weights": weights, "dtype": "bfloat16" if form.bf16 else "float32",
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes(),
        "mem_kind": "device peak" if device.type == "cuda" else "process peak RSS",
    }
    out.update(summarize(times, case.batch, total_s, steps))
    return out


# ----------------------------------------------------------------------------- driver


def run_worker(kind: str, case_name: str, option: str, warmup: int, steps: int, timeout: float,
               env: Optional[Dict[str, str]] = None, cpus: Optional[List[int]] = None,
               start_file: Optional[str] = None) -> Dict[str, Any]:
    """Runs one measurement in a fresh process (pinned to `cpus` if given); its JSON, or {'error': ...}."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", kind, "--cases", case_name,
           "--option", option, "--warmup", str(warmup), "--steps", str(steps)]
    if start_file:
        cmd += ["--start_file", start_file]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                              preexec_fn=pin)
    except subprocess.TimeoutExpired:
        return {"impl": kind, "form": option, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"impl": kind, "form": option, "error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def merge_rounds(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One row from repeated measurements: the round with the median step time, and the spread over rounds."""
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r.get("step_s", 0.0))
    if not ok or "step_s" not in ok[0]:
        return ok[0] if ok else rows[-1]
    row = dict(ok[(len(ok) - 1) // 2])
    row["rounds"] = len(ok)
    row["step_s_rounds"] = [r["step_s"] for r in ok]
    return row


def loss_tolerance(backend: str, dtypes) -> float:
    """LOSS_RTOL for the coarser of `dtypes` on `backend` ('cpu', or any GPU)."""
    dtype = "bfloat16" if "bfloat16" in dtypes else "float32"
    return LOSS_RTOL[("cpu" if backend == "cpu" else "gpu", dtype)]


def same_work(row: Dict[str, Any], jax_row: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """A PyTorch row's first-step loss against the case's JAX row: {'loss_rel_diff', 'loss_rtol', 'comparable'}."""
    if jax_row is None or row.get("first_loss") is None or jax_row.get("first_loss") is None:
        return {"comparable": None}
    ref = jax_row["first_loss"]
    rel = abs(row["first_loss"] - ref) / max(abs(ref), 1e-12)
    tol = loss_tolerance(row.get("backend", "cpu"), (row.get("dtype"), jax_row.get("dtype")))
    ok = rel <= tol and row.get("weights") == "the JAX row's"
    return {"loss_rel_diff": rel, "loss_rtol": tol, "comparable": ok}


def complete(row: Dict[str, Any], flops: Optional[float], dtype: str,
             jax_row: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Adds achieved TFLOP/s and the fraction of the device's dense peak to a measured row, and (PyTorch rows)
    whether it did the same work as the case's JAX row."""
    if "error" in row:
        return row
    if row["impl"] == "torch":
        row = dict(row, **same_work(row, jax_row))
    if not flops:
        return row
    row = dict(row, flops_per_step=row.get("flops_per_step", flops))
    row["tflops"] = row["flops_per_step"] / row["step_s"] / 1e12
    # A PyTorch row's compute dtype is its form's: bf16 autocast or float32.
    row_dtype = dtype if row["impl"] == "jax" else ("bfloat16" if "bf16" in row["form"] else "float32")
    peak = peak_tflops(row.get("device_kind", ""), row_dtype)
    row["peak_tflops"] = peak
    row["mfu"] = row["tflops"] / peak if peak else None
    return row


def _fmt_bytes(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _fmt_same_work(r: Dict[str, Any]) -> str:
    if r["impl"] != "torch":
        return "-"
    if r.get("comparable") is None:
        return "not comparable (no JAX loss)"
    diff = f"rel. diff {r['loss_rel_diff']:.1e} (tol. {r['loss_rtol']:.0e})"
    return diff if r["comparable"] else f"**not comparable**: {diff}, weights {r.get('weights')}"


def table(results: List[Dict[str, Any]]) -> str:
    """Markdown table of all rows, with our speed (the case's first JAX row) over each PyTorch form of the case."""
    head = ("| case | impl | form | step (s, median) | images/s | compile (s) | peak memory | GFLOP/step "
            "| TFLOP/s | % of peak | JAX speed / this | first-step loss | same work | load avg |")
    lines = [head, "|" + "|".join(["---"] * 14) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | {r['form']} | failed: {r['error']} | | | | | | | | | | |")
            continue
        jax_rate = next((x["images_per_s"] for x in results if x["case"] == r["case"] and x["impl"] == "jax"
                         and "error" not in x), None)
        ratio = f"{jax_rate / r['images_per_s']:.2f}x" if jax_rate and r["impl"] == "torch" else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "- (no peak)"
        spread = r.get("step_s_rounds", [])
        step = f"{r['step_s']:.3f}" + (f" ({min(spread):.2f}-{max(spread):.2f} over {len(spread)} rounds)" if len(spread) > 1 else "")
        first = f"{r['first_loss']:.6g}" if r.get("first_loss") is not None else "-"
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['form']} | {step} | {r['images_per_s']:.1f} "
            f"| {r['compile_s']:.1f} | {_fmt_bytes(r['peak_mem_bytes'])} ({r['mem_kind']}) "
            f"| {r.get('flops_per_step', 0) / 1e9:.4g} | {r.get('tflops', 0):.3f} | {mfu} | {ratio} | {first} "
            f"| {_fmt_same_work(r)} | {r['load_avg_1min']:.1f} |"
        )
    return "\n".join(lines)


def section(results: List[Dict[str, Any]], args) -> str:
    """One BENCHMARKS.md section: date, device, versions, settings and the table."""
    ok = [r for r in results if "error" not in r]
    versions = sorted({r["versions"] for r in ok})
    devices = sorted({f"{r['backend']}: {r['device_kind']}" for r in ok})
    cases = "\n".join(f"- `{name}`: {describe(CASES[name])}" for name in dict.fromkeys(r["case"] for r in results))
    flags = sorted({r.get("xla_flags", "") for r in ok if r["impl"] == "jax"})
    return (
        f"\n## {datetime.date.today().isoformat()} - {args.title or ', '.join(devices)}\n\n"
        f"Device: {'; '.join(devices)} ({os.cpu_count()} CPU cores, workers pinned to "
        f"{args.cpus or 'all'}). Versions: {'; '.join(versions)}.\n"
        f"Command: `python scripts/benchmark.py {' '.join(sys.argv[1:])}`; {args.warmup} warm-up + {args.steps} timed "
        f"steps per row, each row in its own process. XLA_FLAGS: {', '.join(repr(f) for f in flags) or '(none)'}.\n"
        f"FLOPs: XLA cost analysis, f(0 PGD steps) + steps x (f(1) - f(0)) (a rolled loop body counts once); "
        f"PyTorch rows reuse the JAX count. Same work: the PyTorch rows start from the JAX row's weights and first "
        f"draws on the same batches (epoch {EPOCH}); their first-step loss must match the JAX row's.\n\n"
        f"{cases}\n\n{table(results)}\n"
    )


def describe(case: Case) -> str:
    """'MMARD, student resnet18 {...} <- teacher wide_resnet {...}, batch 128, 32x32, bfloat16, PGD-10'."""
    kw = lambda d: (" " + ",".join(f"{k}={v}" for k, v in d.items())) if d else ""  # noqa: E731
    source = f"teacher {case.teacher}{kw(case.teacher_kwargs)}" if case.teacher else "peer = the student's architecture"
    return (f"{case.method.upper()}, student {case.student}{kw(case.student_kwargs)} <- {source}, batch {case.batch}, "
            f"{case.size}x{case.size}, {case.dtype}, PGD-{case.pgd_steps}" + (f" ({case.note})" if case.note else ""))


def default_torch_forms() -> str:
    """Eager float32 and the fastest form: on CUDA bf16 autocast + channels_last + compile; on the CPU
    channels_last + compile in float32 (this CPU has no bf16 arithmetic: BENCHMARKS.md measures the others)."""
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        return ""
    return "eager,cl+compile+bf16" if cuda else "eager,cl+compile"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="cpu_mmard_wrn16_2_wrn10_1_16px",
                   help=f"comma-separated names from --list, or groups: {', '.join(GROUPS)}")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--unroll", default="auto", help="comma-separated PGD unroll settings for the JAX rows")
    p.add_argument("--conv_grad", default="", help="comma-separated MMARD_JAX_CONV_GRAD settings for the JAX rows "
                   "(auto, custom, lax: layers.conv2d's input gradient; default: the environment's)")
    p.add_argument("--torch_forms", default=None, help="comma-separated: eager, or options joined by + from "
                   "cl, bf16, compile ('' for none; default: eager and the fastest form for the device)")
    p.add_argument("--match_dtype", action="store_true", help="each case runs only the PyTorch forms of its compute "
                   "dtype: bfloat16 cases the forms with bf16, float32 cases the others (the paper group and its "
                   "_f32 twins in one table without running the same PyTorch row twice)")
    p.add_argument("--xla_flags", action="append", default=None,
                   help="exact XLA_FLAGS for a JAX row, without mmard_jax's CPU defaults (repeat for several "
                        "rows; '' = none); default: $XLA_FLAGS plus the defaults of mmard_jax/xla_env.py")
    p.add_argument("--cpus", default="", help="pin every worker to these CPUs, e.g. '1' (both frameworks then use "
                   "that many threads; on a shared machine a one-core comparison is the reproducible one)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (at least 1: the first step's loss)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1, help="rounds over all rows, interleaved; the median round is kept")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    p.add_argument("--deadline_s", type=float, default=0, help="seconds for the whole run (0: none): rows that "
                   "would start later are recorded as skipped, and a row's timeout never runs past it")
    p.add_argument("--append", default=None, help="append a section with the table to this Markdown file")
    p.add_argument("--json", default=None, help="write all rows as JSON here (rewritten after every row)")
    p.add_argument("--title", default="", help="section title (default: the device)")
    p.add_argument("--impls", default="jax,torch", help="which implementations to time (the FLOP count is always made)")
    p.add_argument("--multiprocess", action="store_true", help="compare process layouts (1x2 vs 2x1, ...) with "
                   "scripts/benchmark_multiprocess.py; the other arguments are that script's")
    p.add_argument("--worker", choices=("jax", "torch", "flops"), help=argparse.SUPPRESS)
    p.add_argument("--option", default="", help=argparse.SUPPRESS)
    p.add_argument("--start_file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step's loss is compared across implementations)")
    return args


def _worker_main(args, case: Case) -> None:
    """One row in this process: JAX's CPU XLA defaults first (an entry point sets them before JAX starts)."""
    if args.worker in ("jax", "flops"):
        from mmard_jax import xla_env

        xla_env.apply_cpu_defaults()
    if args.worker == "flops":
        row = flops_worker(case, args.start_file)
    elif args.worker == "jax":
        row = jax_worker(case, args.warmup, args.steps, args.option, start_file=args.start_file)
    else:
        row = torch_worker(case, args.warmup, args.steps, args.option, start_file=args.start_file)
    print(json.dumps(row), flush=True)


def plan_rows(names: List[str], args) -> List[tuple]:
    """(case, kind, option, env, writes the start file) in the order the rows run."""
    forms = args.torch_forms if args.torch_forms is not None else default_torch_forms()
    base_flags = os.environ.get("XLA_FLAGS", "")
    flag_sets = args.xla_flags if args.xla_flags is not None else [base_flags]
    # Explicit --xla_flags rows run with exactly those flags (mmard_jax's own CPU defaults switched off).
    exact = {"MMARD_JAX_XLA_DEFAULTS": "0"} if args.xla_flags is not None else {}
    convs = [c for c in args.conv_grad.split(",") if c] or [None]
    impls = set(args.impls.split(","))
    plan = []
    for name in names:
        if "jax" in impls:
            rows = [(name, "jax", u, {"XLA_FLAGS": f, **exact, **({"MMARD_JAX_CONV_GRAD": c} if c else {})})
                    for u in args.unroll.split(",") for f in flag_sets for c in convs]
            plan += [row + (i == 0,) for i, row in enumerate(rows)]
        else:
            plan += [(name, "flops", "", None, True)]
        if "torch" in impls:
            bf16_case = CASES[name].dtype == "bfloat16"
            plan += [(name, "torch", f, None, False) for f in forms.split(",")
                     if f and (not args.match_dtype or ("bf16" in f.split("+")) == bf16_case)]
    return plan


def main(argv=None) -> List[Dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--multiprocess" in argv:  # process layouts side by side: scripts/benchmark_multiprocess.py
        sys.path.insert(0, str(ROOT / "scripts"))
        import benchmark_multiprocess

        return benchmark_multiprocess.main([a for a in argv if a != "--multiprocess"])
    args = parse_args(argv)
    if args.list:
        for name, case in CASES.items():
            print(f"{name}: {describe(case)}")
        for name, members in GROUPS.items():
            print(f"group {name}: {members}")
        return []
    names = [n for g in args.cases.split(",") if g for n in GROUPS.get(g, g).split(",")]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if args.worker:
        _worker_main(args, CASES[names[0]])
        return []

    plan = plan_rows(names, args)
    rounds = [[] for _ in plan]
    cpus = [int(c) for c in args.cpus.split(",") if c] or None
    deadline = time.monotonic() + args.deadline_s if args.deadline_s else None
    with tempfile.TemporaryDirectory(prefix="mmard_bench_") as tmp:
        starts = {name: os.path.join(tmp, f"{name}.npz") for name in names}
        for r in range(args.repeat):  # interleaved: a load change on a shared machine hits every row alike
            for i, (name, kind, option, env, writes) in enumerate(plan):
                left = deadline - time.monotonic() if deadline else float(args.timeout)
                if left < 1:
                    row = {"impl": kind, "form": option, "error": "skipped: --deadline_s reached"}
                else:
                    row = run_worker(kind, name, option, args.warmup, args.steps, min(args.timeout, left), env, cpus,
                                     starts[name] if (writes or kind == "torch") else None)
                rounds[i].append(dict(row, case=name))
                print(f"[round {r + 1}/{args.repeat}] " + _progress(rounds[i][-1]), flush=True)
                if args.json:
                    _write_json(args.json, _results(plan, rounds))
    results = _results(plan, rounds)
    print("\n" + table(results))
    if args.json:
        _write_json(args.json, results)
    if args.append:
        path = pathlib.Path(args.append)
        if not path.exists():
            path.write_text("# Benchmarks\n\nWritten by `scripts/benchmark.py`; one section per run.\n")
        with path.open("a") as f:
            f.write(section(results, args))
    return results


def _results(plan, rounds) -> List[Dict[str, Any]]:
    """The merged rows measured so far, completed (FLOPs from the case's JAX or flops row; same-work checks)."""
    results, flops, first_jax = [], {}, {}
    for (name, kind, _, _, _), rows in zip(plan, rounds):
        if not rows:
            continue
        row = merge_rounds(rows)
        if kind in ("jax", "flops") and "error" not in row:
            flops.setdefault(name, row["flops_per_step"])
            if kind == "jax":
                first_jax.setdefault(name, row)
        if kind != "flops":
            results.append(complete(row, flops.get(name), CASES[name].dtype, first_jax.get(name)))
    return results


def _write_json(path: str, results) -> None:
    tmp = f"{path}.tmp"
    pathlib.Path(tmp).write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


def _progress(row: Dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['case']} {row['impl']} {row['form']}: FAILED {row['error']}"
    if row["impl"] == "flops":
        return f"{row['case']}: {row['flops_per_step'] / 1e9:.4g} GFLOP per step"
    return (f"{row['case']} {row['impl']} {row['form']}: {row['step_s']:.3f} s/step, {row['images_per_s']:.1f} img/s, "
            f"compile {row['compile_s']:.1f} s, first-step loss {row['first_loss']:.6g}")


if __name__ == "__main__":
    main()
