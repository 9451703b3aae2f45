"""Where a student's train-step time goes, per kind of work and per layer type, JAX vs PyTorch eager, on this device.

    python scripts/profile_ops.py --arch=mobilenet_v2 --batch=128 --size=16 --output=profile.md

The MMARD step is 10 PGD steps (teacher and student: forward + input gradient, inference-mode BN) plus a
train-mode forward and backward of the student. This script times those pieces of the student alone, whole
network (forward; forward + input gradient; train-mode forward + parameter gradient), and the layer types
MobileNetV2 is made of at its largest shape (1x1 convolution, 3x3 depthwise convolution: forward, input
gradient, kernel gradient), for JAX (each `depthwise` implementation) and PyTorch eager, same shapes, float32.
Medians of `--repeat` timed calls after one warm-up call; XLA compilation excluded. Writes a Markdown table.
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # mmard_jax, and the PyTorch peers (`peers`)

from mmard_jax import xla_env  # noqa: E402 - the entry point's CPU XLA defaults, before JAX starts

xla_env.apply_cpu_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmard_jax import models  # noqa: E402
from mmard_jax.models import layers  # noqa: E402
from peers.architectures import build_model  # noqa: E402


def median_seconds(fn, repeat: int) -> float:
    """Median wall time of `fn()` over `repeat` calls after one warm-up call (compilation)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_network(arch: str, depthwise: str, x: np.ndarray, labels: np.ndarray):
    """{piece: callable} of the whole student in JAX, jitted; each callable blocks until its result is ready."""
    kwargs = {"depthwise": depthwise} if arch == "mobilenet_v2" else {}
    module = models.create(arch, 10, **kwargs)
    variables = jax.jit(lambda k: module.init(k, jnp.zeros((1,) + x.shape[1:])))(jax.random.key(0, impl="rbg"))
    x, y = jnp.asarray(x), jnp.asarray(labels)

    def xent(logits):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    forward = jax.jit(lambda v, z: module.apply(v, z))
    input_grad = jax.jit(jax.grad(lambda z, v: xent(module.apply(v, z))))

    def train_loss(params, v, z):
        logits, _ = module.apply({**v, "params": params}, z, train=True, mutable=["batch_stats"])
        return xent(logits)

    param_grad = jax.jit(jax.grad(train_loss))
    return {
        "forward (eval BN)": lambda: forward(variables, x).block_until_ready(),
        "forward + input gradient (eval BN, one PGD step)": lambda: input_grad(x, variables).block_until_ready(),
        "train forward + parameter gradient": lambda: jax.block_until_ready(
            param_grad(variables["params"], variables, x)),
    }


def torch_network(arch: str, x: np.ndarray, labels: np.ndarray):
    """The same pieces for the PyTorch peer (`peers.architectures`), eager float32."""
    net = build_model(arch, 10)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(labels).long()

    def forward():
        net.eval()
        with torch.no_grad():
            net(xt)

    def input_grad():
        net.eval()
        z = xt.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net(z), yt), z)
        return grad

    def param_grad():
        net.train()
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(xt), yt).backward()

    return {"forward (eval BN)": forward, "forward + input gradient (eval BN, one PGD step)": input_grad,
            "train forward + parameter gradient": param_grad}


def layer_pieces(batch: int, size: int, channels: int):
    """{(layer, piece): (jax callable, torch callable)} for a 1x1 conv (channels/6 -> channels) and a 3x3 depthwise
    conv of `channels` at size x size: MobileNetV2's expand and depthwise layers."""
    rng = np.random.default_rng(0)
    cin = channels // 6
    x1 = rng.normal(size=(batch, size, size, cin)).astype(np.float32)
    xd = rng.normal(size=(batch, size, size, channels)).astype(np.float32)
    w1 = rng.normal(size=(1, 1, cin, channels)).astype(np.float32) * 0.1
    wd = rng.normal(size=(3, 3, 1, channels)).astype(np.float32) * 0.1
    out = {}

    def conv1x1(x, w):
        return layers.conv2d(x, w, (1, 1), ((0, 0), (0, 0)))

    def depthwise_lib(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=x.shape[-1])

    def depthwise_taps(x, w):
        return layers.depthwise_taps(x, w, 1, ((1, 1), (1, 1)))

    t1, td = torch.from_numpy(x1.transpose(0, 3, 1, 2).copy()), torch.from_numpy(xd.transpose(0, 3, 1, 2).copy())
    tw1 = torch.from_numpy(w1.transpose(3, 2, 0, 1).copy())
    twd = torch.from_numpy(wd.transpose(3, 2, 0, 1).copy())
    torch_fns = {"1x1 conv": (lambda x, w: F.conv2d(x, w), t1, tw1),
                 "3x3 depthwise": (lambda x, w: F.conv2d(x, w, padding=1, groups=channels), td, twd)}
    jax_fns = {"1x1 conv": {"": (conv1x1, x1, w1)},
               "3x3 depthwise": {"library": (depthwise_lib, xd, wd), "taps": (depthwise_taps, xd, wd)}}
    for layer, impls in jax_fns.items():
        tfn, tx, tw = torch_fns[layer]

        def tgrad(wrt, f=tfn, a=tx, b=tw):
            a, b = a.clone().requires_grad_(wrt == 0), b.clone().requires_grad_(wrt == 1)
            torch.autograd.grad(torch.sin(f(a, b)).sum(), a if wrt == 0 else b)

        torch_pieces = {"forward": lambda f=tfn, a=tx, b=tw: f(a, b), "input gradient": lambda g=tgrad: g(0),
                        "kernel gradient": lambda g=tgrad: g(1)}
        for impl, (fn, x, w) in impls.items():
            xj, wj = jnp.asarray(x), jnp.asarray(w)
            jax_pieces = {
                "forward": jax.jit(fn),
                "input gradient": jax.jit(jax.grad(lambda a, b, fn=fn: jnp.sum(jnp.sin(fn(a, b))), argnums=0)),
                "kernel gradient": jax.jit(jax.grad(lambda a, b, fn=fn: jnp.sum(jnp.sin(fn(a, b))), argnums=1)),
            }
            name = f"{layer} ({impl})" if impl else layer
            for piece, jfn in jax_pieces.items():
                out[(name, piece)] = (lambda f=jfn, a=xj, b=wj: f(a, b).block_until_ready(), torch_pieces[piece])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=192, help="layer-type rows: channels of the depthwise layer")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--output", default=None, help="append the Markdown table to this file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=args.batch).astype(np.int32)
    rows = []
    impls = ("taps", "conv") if args.arch == "mobilenet_v2" else ("",)
    torch_net = torch_network(args.arch, x, labels)
    for piece, tfn in torch_net.items():
        t_torch = median_seconds(tfn, args.repeat)
        for impl in impls:
            t_jax = median_seconds(jax_network(args.arch, impl or "auto", x, labels)[piece], args.repeat)
            rows.append((f"{args.arch} ({impl})" if impl else args.arch, piece, t_jax, t_torch))
    for (layer, piece), (jfn, tfn) in layer_pieces(args.batch, args.size // 2, args.channels).items():
        rows.append((layer, piece, median_seconds(jfn, args.repeat), median_seconds(tfn, args.repeat)))
    header = (f"\n### Per-piece profile: {args.arch}, batch {args.batch}, {args.size}x{args.size}, float32 "
              f"({jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
              f"{time.strftime('%Y-%m-%d')}; `scripts/profile_ops.py`)\n\n"
              f"Layer rows: batch {args.batch}, {args.size // 2}x{args.size // 2}, {args.channels} channels "
              f"(1x1: {args.channels // 6} -> {args.channels}); loss sum(sin(out)).\n\n"
              "| what | piece | JAX (ms) | PyTorch eager (ms) | JAX / PyTorch time |\n|---|---|---:|---:|---:|\n")
    table = header + "".join(f"| {a} | {b} | {j * 1e3:.1f} | {t * 1e3:.1f} | {j / t:.2f} |\n" for a, b, j, t in rows)
    print(table)
    if args.output:
        with open(args.output, "a") as f:
            f.write(table)


if __name__ == "__main__":
    main()
