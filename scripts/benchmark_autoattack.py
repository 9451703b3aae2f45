"""Times our JAX AutoAttack against the original (Croce & Hein's code, PyPI `pyautoattack` 0.2.0) on the same
weights of an adversarially trained model, standard budget, in one run, as a user would run each.

    python scripts/benchmark_autoattack.py --output=aa.jsonl          # the realistic case (a few minutes to train)
    python scripts/benchmark_autoattack.py --n_examples=8 --batch_size=8 --n_iter=5 --targets=2 --queries=50
                                                                      # a smoke test of the script
    python scripts/benchmark_autoattack.py --worst_case --n_examples=16 --batch_size=16 --n_iter=10 \
        --targets=3 --queries=100                                     # the contrived worst case (below)
    python scripts/benchmark_autoattack.py --batch_curve              # time per example by batch size (below)

Model: RobustBench's WideResNet-10-1 architecture (`model_zoo/architectures/wide_resnet.py`, loaded by path
because `import robustbench` needs torchvision) and its Flax twin (mmard_jax `wide_resnet`, depth 10, width
1), trained here with PGD adversarial training (Madry et al.: PGD-5, step 2/255, eps 8/255, Adam, seeded),
then copied into the PyTorch module (`interop.testing.copy_into_torch`; the logits are checked to agree).
The trained weights are cached in a model directory (`--model_dir`), so a rerun skips training.

Data: no CIFAR copy is available offline, so the task is scikit-learn's bundled digits (mmard_jax's 16x16x3
'digits' split, nearest-neighbour upsampled to 32x32) at a quarter of the contrast (pixels 0.375 .. 0.625):
BatchNorm after the first convolution makes the scale irrelevant to learning, while eps = 8/255 then acts
like 32/255 at full contrast, the radius at which adversarially trained models on digits are CIFAR-like
(clean accuracy about 80%, robust accuracy about half of it). `--n_examples` test images are attacked.

Runs, in this order and on the same 200 images: ours in this process with an empty persistent compile cache
(first run, compilation included), ours again in this process (steady state), ours in a fresh process with
the persistent cache written by the first run (`runtime.enable_compilation_cache`; `--cache_dir`, default a
new temporary directory), then the original `AutoAttack(version='standard').run_standard_evaluation` with
torch on all the machine's cores (`--torch_threads`). Each run records the time of each component (ours:
the cascade's own timing, XLA compilation included, and the compilation time from JAX's monitoring events;
the original: the time in each attack's `perturb`), the robust accuracy after each component, and the
per-example masks, which are compared (the randomised components draw their randomness differently, so a
few examples may differ). A Markdown table is printed; `--output` appends the result as one JSON line.

`--batch_curve`: only the time per example and iteration of our APGD-T and FAB-T programs in one exact batch of
each of the evaluator's shapes from 4 up (20 iterations, one target): the measurement behind the CPU plans
(`evaluator.BATCH_OVERHEAD_EXAMPLES`, `evaluator.cache_cap`: on a CPU a batch costs about its size until its
activations outgrow the last-level cache, so the points still robust go in several cache-sized batches).

`--worst_case`: the old contrived case, kept as a labelled worst case: RobustBench's ResNet-18 with random
weights (non-trivial BatchNorm statistics), uniform random images labelled by the model (clean accuracy
100%), eps = 1e-5, so that no component fools any point and both sides spend every component's whole budget
on every example; at the standard budget this is out of reach on a CPU (pass a reduced one, which the
result labels as custom).
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTRAST = 0.25  # digits pixels mapped to 0.5 + CONTRAST * (p - 0.5)
# Adversarial training of the WRN-10-1 (Madry et al., ICLR 2018, PGD training), sized for a few minutes on a CPU.
TRAIN = {"epochs": 6, "batch": 32, "lr": 2e-3, "pgd_steps": 5, "pgd_step": 2 / 255, "eps": 8 / 255, "seed": 0}
TITLES = {"clean": "clean", "apgd_ce": "APGD-CE", "apgd_t": "APGD-T", "fab_t": "FAB-T", "square": "Square"}
# The original's attack names (pyautoattack/autoattack.py, `_set_version('standard')`) and the objects it calls.
ORIGINAL = {"apgd_ce": "apgd", "apgd_t": "apgd_targeted", "fab_t": "fab", "square": "square"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_examples", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=200)
    parser.add_argument("--eps", default=None, help="L-inf radius (default 8/255; --worst_case: 1e-5)")
    parser.add_argument("--n_iter", type=int, default=100, help="APGD-CE / APGD-T / FAB-T iterations (standard 100)")
    parser.add_argument("--targets", type=int, default=9, help="APGD-T / FAB-T target classes (standard 9)")
    parser.add_argument("--queries", type=int, default=5000, help="Square queries (standard 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="append the result as one JSON line to this file")
    parser.add_argument("--cache_dir", default=None,
                        help="persistent XLA compile cache (default: a new temporary directory, so the first run "
                             "compiles from scratch)")
    parser.add_argument("--model_dir", default=str(pathlib.Path.home() / ".cache/mmard_jax/benchmark_aa_wrn10_1"),
                        help="the trained model is cached here (trained when missing)")
    parser.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: the machine's cores)")
    parser.add_argument("--worst_case", action="store_true", help="the contrived worst case (random ResNet-18)")
    parser.add_argument("--skip_original", action="store_true")
    parser.add_argument("--skip_fresh_process", action="store_true")
    parser.add_argument("--batch_curve", action="store_true",
                        help="only time our APGD-T and FAB-T per example and iteration at the evaluator's batch "
                             "shapes (the CPU plans of evaluator.plan_batches)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the fresh-process run
    args = parser.parse_args(argv)
    args.eps = args.eps or ("1e-5" if args.worst_case else "8/255")
    return args


# ----------------------------------------------------------------------------- data and models


def digits32(split: str):
    """(uint8 [N, 32, 32, 3], int32 [N]): the digits split upsampled 2x to 32x32 at CONTRAST."""
    import numpy as np

    from mmard_jax import data

    ds = data.load_dataset("digits", split)
    up = ds.images.repeat(2, axis=1).repeat(2, axis=2).astype(np.float32) / 255.0
    return np.rint(255.0 * (0.5 + CONTRAST * (up - 0.5))).astype(np.uint8), ds.labels


def robustbench_arch(module: str):
    """RobustBench's `model_zoo/architectures/<module>.py`, executed on its own (as tests/conftest.py does)."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("robustbench is not installed: pip install --no-deps -r requirements-nodeps.txt")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model_zoo" / "architectures" / f"{module}.py"
    loader_spec = importlib.util.spec_from_file_location(f"_rb_arch_{module}", path)
    mod = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(mod)
    return mod


def train_wrn(images, labels, settings=TRAIN):
    """(module, variables): WRN-10-1 after PGD adversarial training (BatchNorm in train mode in the attack)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mmard_jax import data, losses, models
    from mmard_jax.attacks import engine

    module = models.create("wide_resnet", 10, depth=10, width=1)
    variables = module.init(jax.random.key(settings["seed"]), jnp.zeros((1,) + images.shape[1:]))
    steps = settings["epochs"] * (len(labels) // settings["batch"])
    tx = optax.adam(optax.cosine_decay_schedule(settings["lr"], steps))
    opt = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt, images, y, key):
        x = data.to_float(images)

        def objective(z):
            logits, _ = module.apply(variables, z, train=True, mutable=["batch_stats"])
            return jnp.sum(losses.cross_entropy(logits, y))

        x_adv = engine.pgd(objective, x, eps=settings["eps"], step_size=settings["pgd_step"],
                           steps=settings["pgd_steps"], init="uniform", rng=key)

        def loss_fn(params):
            logits, new = module.apply({**variables, "params": params}, x_adv, train=True, mutable=["batch_stats"])
            return jnp.mean(losses.cross_entropy(logits, y)), new

        grads, new = jax.grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt = tx.update(grads, opt, variables["params"])
        return {"params": optax.apply_updates(variables["params"], updates), **new}, opt

    key = jax.random.key(settings["seed"] + 1)
    start = time.perf_counter()
    for epoch in range(settings["epochs"]):
        order = np.random.default_rng([settings["seed"], epoch]).permutation(len(labels))
        for i in range(len(labels) // settings["batch"]):
            b = order[i * settings["batch"]:(i + 1) * settings["batch"]]
            key, k = jax.random.split(key)
            variables, opt = step(variables, opt, images[b], labels[b], k)
        jax.block_until_ready(variables)
        print(f"training: epoch {epoch + 1}/{settings['epochs']} ({time.perf_counter() - start:.0f} s)", flush=True)
    return module, variables


def trained_wrn(model_dir: str):
    """(module, variables) of the benchmark's WRN-10-1: loaded from `model_dir`, trained and saved if missing."""
    from mmard_jax.models import store

    path = pathlib.Path(model_dir)
    spec = store.model_spec("wide_resnet", 10, {"depth": 10, "width": 1}, benchmark_training=TRAIN,
                            data=f"digits 32x32 contrast {CONTRAST}")
    if (path / store.SPEC_FILE).exists():
        if store.read_spec(path).get("benchmark_training") == TRAIN:
            return store.load_model(path)
        print(f"{path}: trained with other settings, training again", flush=True)
    images, labels = digits32("train")
    module, variables = train_wrn(images, labels)
    store.save_model(path, spec, variables)
    return module, variables


def realistic_case(args):
    """(module, variables, torch net, uint8 images, labels, description)."""
    from mmard_jax.interop import testing

    module, variables = trained_wrn(args.model_dir)
    net = testing.copy_into_torch(variables, robustbench_arch("wide_resnet").WideResNet(depth=10, widen_factor=1))
    images, labels = digits32("test")
    return (module, variables, net, images[:args.n_examples], labels[:args.n_examples],
            f"RobustBench WRN-10-1, PGD-trained here (digits 32x32, contrast {CONTRAST})")


def worst_case(args):
    """(module, variables, torch net, uint8 images, labels, description): random ResNet-18, random images
    labelled by the model."""
    import numpy as np
    import torch

    from mmard_jax import models
    from mmard_jax.interop import convert, testing

    torch.manual_seed(args.seed)
    rn = robustbench_arch("resnet")
    net = testing.randomize_batch_norm(rn.ResNet(rn.BasicBlock, [2, 2, 2, 2], num_classes=10), args.seed)
    variables = convert.convert_state_dict(net.state_dict(), "resnet18", 10)
    images = np.random.default_rng(args.seed).integers(0, 256, (args.n_examples, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        labels = net(torch_input(images)).argmax(1).numpy().astype(np.int32)
    return (models.create("resnet18", num_classes=10), variables, net, images, labels,
            "worst case: RobustBench ResNet-18, random weights, random images labelled by the model")


def torch_input(images):
    """uint8 NHWC -> float NCHW tensor in [0, 1] (mmard_jax's `to_float` then a transpose)."""
    import numpy as np
    import torch

    from mmard_jax import data

    return torch.tensor(np.asarray(data.to_float(images))).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- the two AutoAttacks


@contextlib.contextmanager
def compile_clock():
    """Yields a dict that accumulates JAX's compile-time events (tracing, lowering, XLA) by the key its
    'bucket' entry names while they happen."""
    from jax import monitoring

    totals = {"bucket": None}

    def listener(event, seconds, **_):
        if event.startswith("/jax/core/compile/") and totals["bucket"] is not None:
            totals[totals["bucket"]] = totals.get(totals["bucket"], 0.0) + seconds

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield totals
    finally:
        monitoring.unregister_event_duration_listener(listener)


def run_ours(ev, variables, config, seed: int):
    """One run of our clean pass + AutoAttack cascade on the evaluator's split: times, compile times and masks."""
    import numpy as np

    with compile_clock() as compiled:
        original_map = ev.map_points

        def timed_map(kind, name, *a, **k):  # attribute compile events to the component that caused them
            compiled["bucket"] = name
            return original_map(kind, name, *a, **k)

        ev.map_points = timed_map
        try:
            start = time.perf_counter()
            clean = ev.correct(variables, "clean", seed)
            clean_s = time.perf_counter() - start
            result = ev.autoattack(variables, clean, seed)
            total = time.perf_counter() - start
        finally:
            del ev.map_points
    seconds = {"clean": clean_s, **result.seconds}
    compile_s = {k: v for k, v in compiled.items() if k != "bucket"}
    return {
        "total_s": total, "seconds": seconds, "compile_s": compile_s,
        "accuracy": {"clean": float(np.mean(clean)), **result.accuracies()},
        "masks": {"clean": clean, **result.after, "aa": result.robust},
    }


def run_original(net, images, labels, eps: float, batch: int, config, seed: int):
    """The original AutoAttack 'standard' on `net` (budget from `config`): per-component times and masks."""
    import numpy as np
    import torch

    pyautoattack = _import_peer("pyautoattack")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32, as ours
    net = net.to(device)
    x_host = torch_input(images)
    x, y = x_host.to(device), torch.tensor(labels).long().to(device)
    aa = pyautoattack.AutoAttack(net, norm="Linf", eps=eps, version="standard", seed=seed, device=device)
    for attack in (aa.apgd, aa.apgd_targeted):  # the checkpoint schedule follows n_iter (autopgd_base.py 153-155)
        attack.n_iter = config.n_iter
        attack.n_iter_2, attack.n_iter_min = max(int(0.22 * config.n_iter), 1), max(int(0.06 * config.n_iter), 1)
        attack.size_decr = max(int(0.03 * config.n_iter), 1)
    aa.fab.n_iter = config.n_iter
    aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = config.n_target_classes
    aa.square.n_queries = config.square_queries
    with torch.no_grad():
        robust = (net(x).argmax(1) == y).cpu().numpy()
    masks, seconds = {"clean": robust.copy()}, {}
    state = {"name": None, "todo": None, "at": 0}

    def track(name, perturb):
        """Wraps an attack's perturb: times it and keeps our copy of the original's robust flags, which
        it updates as the original does (the batches of a component are its robust points in index order,
        taken when the component starts)."""

        def wrapped(xb, yb, *a, **k):
            if state["name"] != name:
                state.update(name=name, todo=np.flatnonzero(robust), at=0)
            idx = state["todo"][state["at"]:state["at"] + len(yb)]
            state["at"] += len(yb)
            if not torch.equal(xb.cpu(), x_host[idx]):
                raise RuntimeError(f"original {name}: batch is not the robust points in index order")
            start = time.perf_counter()
            adv = perturb(xb, yb, *a, **k)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            with torch.no_grad():
                robust[idx[(net(adv).argmax(1) != yb).cpu().numpy()]] = False
            masks[name] = robust.copy()
            return adv

        return wrapped

    for ours, attr in ORIGINAL.items():
        attack = getattr(aa, attr)
        attack.perturb = track(ours, attack.perturb)
    start = time.perf_counter()
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch)
    if device == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    with torch.no_grad():
        final = (net(x_adv).argmax(1) == y).cpu().numpy()
    if not np.array_equal(final, robust):
        raise RuntimeError("the original's final adversarial points disagree with the tracked robust flags")
    for name in ORIGINAL:
        masks.setdefault(name, robust.copy())
    masks["aa"] = robust
    return {"total_s": total, "seconds": seconds,
            "accuracy": {k: float(np.mean(v)) for k, v in masks.items()}, "masks": masks}


def batch_curve(module, variables, images, labels, sizes, eps: float, n_iter: int = 20, rounds: int = 2):
    """Rows {batch, apgd_t, fab_t}: ms per example and iteration of our APGD-T and FAB-T programs (one target run,
    `n_iter` iterations) on the first `batch` correctly classified images, in an evaluator of that batch size
    (one exact batch, no padding), best of `rounds` after a compiling run."""
    import dataclasses

    import jax
    import numpy as np

    from mmard_jax import evaluator
    from mmard_jax.attacks import autoattack

    config = dataclasses.replace(autoattack.STANDARD, n_iter=n_iter)
    rows = []
    for size in sorted(sizes):
        ev = evaluator.Evaluator(module, images, labels, batch_size=size, eps=eps, aa_config=config, progress=False)
        ev.split_batches = False  # one batch of `size`, whatever the cache
        points = np.flatnonzero(ev.correct(variables, "clean"))[:size]
        row = {"batch": len(points)}
        for name in ("apgd_t", "fab_t"):
            ev.map_points("aa", name, variables, points, jax.random.key(0), 1)
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                ev.map_points("aa", name, variables, points, jax.random.key(0), 1)
                best = min(best, time.perf_counter() - start)
            row[name] = 1e3 * best / (n_iter * len(points))
        rows.append(row)
        print(f"batch {row['batch']:4d}: APGD-T {row['apgd_t']:.3f}, FAB-T {row['fab_t']:.3f} ms per example and "
              "iteration", flush=True)
    return rows


def _import_peer(name: str):
    if importlib.util.find_spec(name) is None:
        raise SystemExit(f"{name} is not installed: pip install --no-deps -r requirements-nodeps.txt")
    return importlib.import_module(name)


def fresh_process(argv, cache_dir: str):
    """Ours once more in a new Python process with the persistent compile cache of this run."""
    cmd = [sys.executable, __file__, *argv, "--child", f"--cache_dir={cache_dir}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def summary(run):
    """A run without its masks (JSON)."""
    return {k: v for k, v in run.items() if k != "masks"}


def markdown(result) -> str:
    """The table of times per component and accuracies for every run."""
    names = ["clean", "apgd_ce", "apgd_t", "fab_t", "square"]
    head = "| run | total | " + " | ".join(TITLES[n] for n in names) + " | AA accuracy | original / this |"
    rows = [head, "|---|" + "---:|" * (len(names) + 3)]
    base = result["runs"].get("original", {}).get("total_s")
    for label, run in result["runs"].items():
        cells = []
        for n in names:
            s = run["seconds"].get(n)
            c = run.get("compile_s", {}).get(n)
            cells.append("" if s is None else f"{s:.1f} s" + (f" ({c:.1f} compile)" if c and c >= 0.05 else ""))
        ratio = f"{base / run['total_s']:.2f}x" if base else ""
        rows.append(f"| {label} | {run['total_s']:.1f} s | " + " | ".join(cells)
                    + f" | {run['accuracy']['aa']:.2%} | {ratio} |")
    return "\n".join(rows)


def compare_masks(ours, theirs):
    """Per component, the number of examples whose robustness differs between two runs."""
    return {k: int((ours[k] != theirs[k]).sum()) for k in ours if k in theirs}


# ----------------------------------------------------------------------------- main


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from mmard_jax import xla_env

    xla_env.apply_cpu_defaults()
    import jax

    from mmard_jax import cli, data, evaluator, parallel, runtime
    from mmard_jax.attacks import autoattack

    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="mmard_aa_benchmark_xla_")
    cache_was_empty = not any(pathlib.Path(cache_dir).glob("*")) if pathlib.Path(cache_dir).exists() else True
    runtime.enable_compilation_cache(cache_dir)
    eps = cli.parse_eps(args.eps)
    config = dataclasses.replace(autoattack.STANDARD, n_iter=args.n_iter, n_target_classes=args.targets,
                                 square_queries=args.queries)

    import numpy as np
    import torch

    torch.set_num_threads(args.torch_threads or os.cpu_count())
    module, variables, net, images, labels, description = (worst_case if args.worst_case else realistic_case)(args)
    mesh = parallel.data_mesh()
    batch = args.batch_size - args.batch_size % mesh.devices.size
    ev = evaluator.Evaluator(module, images, labels, mesh=mesh, batch_size=batch, eps=eps, aa_config=config,
                             progress=not args.child)
    variables = parallel.put_replicated(variables, mesh)
    if args.batch_curve:
        sizes = [s for s in ev.shapes if s >= 4 * mesh.devices.size]
        rows = batch_curve(module, variables, images, labels, sizes, eps)
        if args.output:
            with open(args.output, "a") as f:
                f.write(json.dumps({"date": time.strftime("%Y-%m-%d"), "host_cpus": os.cpu_count(),
                                    "model": description, "batch_curve": rows}) + "\n")
        return
    if args.child:
        print(json.dumps(summary(run_ours(ev, variables, config, args.seed))))
        return

    with torch.no_grad():
        theirs = net(torch_input(images)).numpy()
    ours = np.asarray(jax.jit(lambda v, z: module.apply(v, data.to_float(z), train=False))(variables, images))
    result = {
        "date": time.strftime("%Y-%m-%d"), "host_cpus": os.cpu_count(), "platform": platform.platform(),
        "processor": platform.processor(), "jax_device": str(jax.devices()[0].device_kind),
        "jax_devices": mesh.devices.size, "torch_threads": torch.get_num_threads(),
        "torch_device": "cuda" if torch.cuda.is_available() else "cpu", "model": description,
        "n_examples": len(labels), "batch_size": batch, "eps": eps, "settings": autoattack.describe(config),
        "max_logit_diff": float(np.abs(ours - theirs).max()), "jax": jax.__version__, "torch": torch.__version__,
        "cache_was_empty": cache_was_empty, "runs": {},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    runs = {}
    for label in ("ours, first run", "ours, second run"):
        runs[label] = run_ours(ev, variables, config, args.seed)
        print(f"{label}: {runs[label]['total_s']:.1f} s, AA {runs[label]['accuracy']['aa']:.2%}", flush=True)
    if not args.skip_fresh_process:
        label = "ours, fresh process, warm cache"
        runs[label] = fresh_process(argv, cache_dir)
        print(f"{label}: {runs[label]['total_s']:.1f} s", flush=True)
    if not args.skip_original:
        runs["original"] = run_original(net, images, labels, eps, batch, config, args.seed)
        print(f"original: {runs['original']['total_s']:.1f} s, AA {runs['original']['accuracy']['aa']:.2%}",
              flush=True)
        result["differing_masks"] = compare_masks(runs["ours, first run"]["masks"], runs["original"]["masks"])
    result["ours_runs_agree"] = compare_masks(runs["ours, first run"]["masks"], runs["ours, second run"]["masks"])
    result["runs"] = {k: summary(v) for k, v in runs.items()}
    print(json.dumps(result), flush=True)
    print(markdown(result))
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
