"""Times our JAX AutoAttack against torchattacks' AutoAttack on the same ResNet-18 weights, same device, same run.

    python scripts/benchmark_autoattack.py                      # the full case: 1000 examples, standard AA (a GPU)
    python scripts/benchmark_autoattack.py --n_examples=16 --n_iter=10 --targets=3 --queries=100 \
        --batch_size=16                                         # what fits a 2-core CPU

Model: RobustBench's ResNet-18 (`model_zoo/architectures/resnet.py`, loaded by path because `import
robustbench` needs torchvision) with seeded random weights and non-trivial BatchNorm statistics, copied into
our Flax ResNet-18 by the naming rule; the logits are checked to agree before timing. Data: CIFAR-shaped
uniform random images, labelled with the model's own predictions (clean accuracy 100%).

Work: the time of AutoAttack is the time it spends on the points it cannot fool. With --eps tiny (default
1e-5) no component fools any point, so every component runs its full budget on every example on both sides:
the worst case, and the same work for both (the script prints how many points each side fooled). Pass
--eps=8/255 with --checkpoint (a converted ResNet-18 model directory) and --dataset=cifar10 for a real run.

Both sides get the standard settings (fra31/auto-attack 'standard': APGD-CE and APGD-T and FAB-T 100
iterations, 9 targets, Square 5000 queries with the fixed schedule); torchattacks' own AutoAttack defaults to
10 iterations and the rescaled Square schedule, so its components are set to the standard values. Ours is
timed twice: the first run includes XLA compilation, the second is steady state.
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def paired_resnet18(seed: int, num_classes: int, checkpoint=None):
    """(Flax module, variables, torch model in eval mode) holding the same weights."""
    import torch

    from mmard_jax import models
    from mmard_jax.interop import convert, testing
    from mmard_jax.models import store

    import torch_reference  # scripts/torch_reference.py: RobustBench's ResNet-18, loaded by path

    torch.manual_seed(seed)
    net = torch_reference.build_model("resnet18", num_classes)
    if checkpoint:
        module, variables = store.load_model(checkpoint)
        return module, variables, testing.copy_into_torch(variables, net)
    net = testing.randomize_batch_norm(net, seed)
    variables = convert.convert_state_dict(net.state_dict(), "resnet18", num_classes)
    return models.create("resnet18", num_classes=num_classes), variables, net


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_examples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--eps", default="1e-5", help="L-inf radius (tiny: every point stays robust, full work)")
    parser.add_argument("--n_iter", type=int, default=100, help="APGD-CE / APGD-T / FAB-T iterations (standard 100)")
    parser.add_argument("--targets", type=int, default=9, help="APGD-T / FAB-T target classes (standard 9)")
    parser.add_argument("--queries", type=int, default=5000, help="Square queries (standard 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="a ResNet-18 model directory instead of random weights")
    parser.add_argument("--dataset", default=None, help="cifar10: real test images and labels (with --checkpoint)")
    parser.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--output", default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args()

    import dataclasses

    import jax
    import numpy as np
    import torch
    import torchattacks

    from mmard_jax import data, evaluate, parallel
    from mmard_jax.attacks import autoattack, suite

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eps = evaluate.parse_eps(args.eps)
    module, variables, net = paired_resnet18(args.seed, 10, args.checkpoint)
    net = net.to(device)

    if args.dataset:
        test = data.load_dataset(args.dataset, "test")
        images, labels = test.images[: args.n_examples], test.labels[: args.n_examples]
    else:
        rng = np.random.default_rng(args.seed)
        images = rng.integers(0, 256, (args.n_examples, 32, 32, 3), dtype=np.uint8)
        labels = None
    x = np.asarray(data.to_float(images))
    xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous().to(device)
    with jax.default_matmul_precision("float32"):
        ours_logits = np.asarray(jax.jit(lambda v, z: module.apply(v, z, train=False))(variables, x))
    with torch.no_grad():
        chunks = [net(xt[i:i + args.batch_size]) for i in range(0, len(xt), args.batch_size)]
        torch_logits = torch.cat(chunks).cpu().numpy()
    max_diff = float(np.abs(ours_logits - torch_logits).max())
    if labels is None:
        labels = torch_logits.argmax(1).astype(np.int32)
    yt = torch.tensor(labels).long().to(device)

    config = dataclasses.replace(autoattack.STANDARD, n_iter=args.n_iter, n_target_classes=args.targets,
                                 square_queries=args.queries)
    mesh = parallel.data_mesh()
    batch = args.batch_size - args.batch_size % mesh.devices.size
    result = {
        "date": time.strftime("%Y-%m-%d"), "host_cpus": os.cpu_count(), "platform": platform.platform(),
        "jax_device": str(jax.devices()[0].device_kind), "jax_devices": mesh.devices.size, "torch_device": device,
        "torch_threads": torch.get_num_threads(),
        "model": "RobustBench ResNet-18 " + (f"({args.checkpoint})" if args.checkpoint else "(random weights)"),
        "n_examples": len(labels), "batch_size": batch, "eps": eps, "settings": autoattack.describe(config),
        "max_logit_diff": max_diff, "jax": jax.__version__, "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)

    evaluators = {}
    for run in ("ours_cold_s", "ours_warm_s"):
        start = time.perf_counter()
        out = suite.evaluate_split(module, variables, images, labels, ["clean", "aa"], eps=eps,
                                   batch_size=batch, seed=args.seed, mesh=mesh, progress=True,
                                   evaluators=evaluators, aa_config=config)
        result[run] = time.perf_counter() - start
        result["ours_clean"], result["ours_aa"] = float(out["clean"].mean()), float(out["aa"].mean())
        print(f"\nours ({run}): {result[run]:.1f} s, clean {result['ours_clean']:.2%}, "
              f"AA {result['ours_aa']:.2%}", flush=True)

    if not args.skip_torch:
        aa = torchattacks.AutoAttack(net, norm="Linf", eps=eps, version="standard", n_classes=10, seed=args.seed)
        apgd_ce, apgd_t, fab_t, square = aa._autoattack.attacks
        for attack in (apgd_ce, apgd_t, fab_t):
            attack.steps = args.n_iter
        apgd_t.n_target_classes = fab_t.n_target_classes = args.targets
        square.n_queries = args.queries
        square.rescale_schedule = False
        start = time.perf_counter()
        correct = []
        for i in range(0, len(labels), batch):
            adv = aa(xt[i:i + batch], yt[i:i + batch])
            with torch.no_grad():
                correct.append((net(adv).argmax(1) == yt[i:i + batch]).cpu().numpy())
            if device == "cuda":
                torch.cuda.synchronize()
            done = i + len(correct[-1])
            print(f"torchattacks: {done}/{len(labels)} ({time.perf_counter() - start:.1f} s)", flush=True)
        result["torch_s"] = time.perf_counter() - start
        result["torch_aa"] = float(np.concatenate(correct).mean())
        result["torch_over_ours_warm"] = result["torch_s"] / result["ours_warm_s"]
        result["torch_over_ours_cold"] = result["torch_s"] / result["ours_cold_s"]
    print(json.dumps(result), flush=True)
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
