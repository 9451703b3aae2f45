"""The PyTorch side of scripts/benchmark_autoattack.py: the models in PyTorch (RobustBench's architectures) and the
original AutoAttack (Croce & Hein's code, PyPI `pyautoattack`) timed per component with its robust flags."""

import os
import platform
import time

import numpy as np
import torch

from mmard_jax import data, models
from mmard_jax.interop import convert
from peers.interop import copy_into_torch, randomize_batch_norm
from peers.packages import import_peer
from peers.robustbench import load_arch

# The original's attack names (pyautoattack/autoattack.py, `_set_version('standard')`) and the objects it calls.
ORIGINAL = {"apgd_ce": "apgd", "apgd_t": "apgd_targeted", "fab_t": "fab", "square": "square"}


def torch_input(images):
    """uint8 NHWC -> float NCHW tensor in [0, 1] (mmard_jax's `to_float` then a transpose)."""
    return torch.tensor(np.asarray(data.to_float(images))).permute(0, 3, 1, 2).contiguous()


def robustbench_wrn10_1(variables) -> torch.nn.Module:
    """RobustBench's WideResNet-10-1 with our Flax `variables` copied in (eval mode)."""
    return copy_into_torch(variables, load_arch("wide_resnet").WideResNet(depth=10, widen_factor=1))


def worst_case(n_examples: int, seed: int):
    """(module, variables, torch net, uint8 images, labels, description): RobustBench's ResNet-18 with random weights
    (non-trivial BatchNorm statistics), uniform random images labelled by the model."""
    torch.manual_seed(seed)
    rn = load_arch("resnet")
    net = randomize_batch_norm(rn.ResNet(rn.BasicBlock, [2, 2, 2, 2], num_classes=10), seed)
    variables = convert.convert_state_dict(net.state_dict(), "resnet18", 10)
    images = np.random.default_rng(seed).integers(0, 256, (n_examples, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        labels = net(torch_input(images)).argmax(1).numpy().astype(np.int32)
    return (models.create("resnet18", num_classes=10), variables, net, images, labels,
            "worst case: RobustBench ResNet-18, random weights, random images labelled by the model")


def run_original(net, images, labels, eps: float, batch: int, config, seed: int):
    """The original AutoAttack 'standard' on `net` (budget from `config`): per-component times and masks."""
    pyautoattack = import_peer("pyautoattack")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32, as ours
    net = net.to(device)
    x_host = torch_input(images)
    x, y = x_host.to(device), torch.tensor(labels).long().to(device)
    aa = pyautoattack.AutoAttack(net, norm=config.norm, eps=eps, version="standard", seed=seed, device=device)
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


def compare(case, ev, variables, config, eps: float, seed: int, fresh_process=None, skip_original: bool = False,
            header=None, say=print):
    """Ours twice in this process, ours in a fresh process (`fresh_process()`, if given), then the original, on
    `case` = (module, variables, torch net, images, labels, description) and the evaluator `ev` of its images:
    the result (JSON) with every run's times, accuracies and the differing masks; `header` is called once with the
    settings before the first run."""
    import jax  # noqa: PLC0415 - after the caller's XLA settings

    from mmard_jax.attacks import autoattack  # noqa: PLC0415
    from mmard_jax.tools import aa_bench  # noqa: PLC0415

    module, _, net, images, labels, description = case
    with torch.no_grad():
        theirs = net(torch_input(images)).numpy()
    ours = np.asarray(jax.jit(lambda v, z: module.apply(v, data.to_float(z), train=False))(variables, images))
    result = {
        "date": time.strftime("%Y-%m-%d"), "host_cpus": os.cpu_count(), "platform": platform.platform(),
        "processor": platform.processor(), "jax_device": str(jax.devices()[0].device_kind),
        "jax_devices": ev.mesh.devices.size, "torch_threads": torch.get_num_threads(),
        "torch_device": "cuda" if torch.cuda.is_available() else "cpu", "model": description,
        "n_examples": len(labels), "batch_size": ev.batch_size, "norm": config.norm, "eps": eps,
        "settings": autoattack.describe(config),
        "max_logit_diff": float(np.abs(ours - theirs).max()), "jax": jax.__version__, "torch": torch.__version__,
        "runs": {},
    }
    if header:
        header(result)
    runs = {}
    for label in ("ours, first run", "ours, second run"):
        runs[label] = aa_bench.run_ours(ev, variables, config, seed)
        say(f"{label}: {runs[label]['total_s']:.1f} s, AA {runs[label]['accuracy']['aa']:.2%}")
    if fresh_process:
        label = "ours, fresh process, warm cache"
        runs[label] = fresh_process()
        say(f"{label}: {runs[label]['total_s']:.1f} s")
    if not skip_original:
        runs["original"] = run_original(net, images, labels, eps, ev.batch_size, config, seed)
        say(f"original: {runs['original']['total_s']:.1f} s, AA {runs['original']['accuracy']['aa']:.2%}")
        result["differing_masks"] = aa_bench.compare_masks(runs["ours, first run"]["masks"], runs["original"]["masks"])
    result["ours_runs_agree"] = aa_bench.compare_masks(runs["ours, first run"]["masks"],
                                                       runs["ours, second run"]["masks"])
    result["runs"] = {k: aa_bench.summary(v) for k, v in runs.items()}
    return result
