"""Our side of scripts/profile_ops.py: where a student's train-step time goes, per kind of work and per layer type,
JAX vs PyTorch eager (its PyTorch side: tests/peers/torch_profile.py, passed in by the script).

The pieces: the whole student network (forward; forward + input gradient; train-mode forward + parameter gradient),
and the layer types the zoo's students are made of (1x1 convolution and 3x3 depthwise convolution at MobileNetV2's
largest shape, a plain 3x3 convolution of the same width, the 3x3 RGB stem: forward, input gradient, kernel
gradient), each JAX callable jitted and blocking until its result is ready.
Medians of `repeat` timed calls after one warm-up call (XLA compilation excluded); float32 throughout.
JAX is imported inside the functions (the script sets XLA's CPU flags first).
"""

import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

NETWORK_PIECES = ("forward (eval BN)", "forward + input gradient (eval BN, one PGD step)",
                  "train forward + parameter gradient")
LAYER_PIECES = ("forward", "input gradient", "kernel gradient")


def parse_kwargs(text: str) -> Dict[str, int]:
    """'depth=10,width=1' -> {'depth': 10, 'width': 1}; ValueError naming an item that is not name=integer."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not name or not value.lstrip("-").isdigit():
            raise ValueError(f"--arch_kwargs: expected name=integer items, got {item!r}")
        out[name] = int(value)
    return out


def median_seconds(fn, repeat: int) -> float:
    """Median wall time of `fn()` over `repeat` calls after one warm-up call (compilation)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_network(arch: str, depthwise: str, x: np.ndarray, labels: np.ndarray,
                arch_kwargs: Optional[Dict] = None) -> Dict[str, Callable[[], object]]:
    """{piece: callable} of the whole student in JAX, jitted; each callable blocks until its result is ready."""
    import jax
    import jax.numpy as jnp

    from mmard_jax import models

    kwargs = {**(arch_kwargs or {}), **({"depthwise": depthwise} if arch == "mobilenet_v2" else {})}
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
    return dict(zip(NETWORK_PIECES, (
        lambda: forward(variables, x).block_until_ready(),
        lambda: input_grad(x, variables).block_until_ready(),
        lambda: jax.block_until_ready(param_grad(variables["params"], variables, x)),
    )))


STEM_FILTERS = 16  # the stem row's output channels (WRN's and PreAct-ResNet's first convolution at width 1)


def layer_inputs(batch: int, size: int, channels: int) -> Dict[str, np.ndarray]:
    """The layer rows' NHWC inputs and HWIO kernels (seeded): 'x1', 'w1' of a 1x1 conv (channels/6 -> channels),
    'xd', 'wd' of a 3x3 depthwise conv of `channels` at size x size (MobileNetV2's expand and depthwise layers),
    'x3', 'w3' of a plain 3x3 conv channels -> channels at size x size, 'xs', 'ws' of the 3x3 RGB stem
    (3 -> STEM_FILTERS) at twice the size (the network's input)."""
    rng = np.random.default_rng(0)
    cin = channels // 6

    def normal(*shape, scale=1.0):
        return rng.normal(size=shape).astype(np.float32) * np.float32(scale)

    return {"x1": normal(batch, size, size, cin), "w1": normal(1, 1, cin, channels, scale=0.1),
            "xd": normal(batch, size, size, channels), "wd": normal(3, 3, 1, channels, scale=0.1),
            "x3": normal(batch, size, size, channels), "w3": normal(3, 3, channels, channels, scale=0.1),
            "xs": normal(batch, 2 * size, 2 * size, 3), "ws": normal(3, 3, 3, STEM_FILTERS, scale=0.1)}


def jax_layer_pieces(inputs: Dict[str, np.ndarray]) -> Dict[str, Dict[Tuple[str, str], Callable[[], object]]]:
    """{layer: {(row name, piece): callable}}: the 1x1 conv, the plain 3x3 conv and the RGB stem (`layers.conv2d`,
    the CPU's hand-written input gradient) and the 3x3 depthwise conv (the library's grouped convolution,
    `layers.depthwise_taps` under autodiff and `layers.depthwise_conv`'s hand-written VJP), loss sum(sin(out)) for
    the gradients."""
    import jax
    import jax.numpy as jnp

    from mmard_jax.models import layers

    def conv1x1(x, w):
        return layers.conv2d(x, w, (1, 1), ((0, 0), (0, 0)))

    def conv3x3(x, w):
        return layers.conv2d(x, w, (1, 1), layers.PAD_SAME_TORCH)

    def depthwise_lib(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=x.shape[-1])

    def depthwise_taps(x, w):
        return layers.depthwise_taps(x, w, 1, ((1, 1), (1, 1)))

    def depthwise_taps_vjp(x, w):
        return layers.depthwise_conv(x, w, 1, ((1, 1), (1, 1)))

    x1, xd, w1, wd, x3, w3, xs, ws = (inputs[k] for k in ("x1", "xd", "w1", "wd", "x3", "w3", "xs", "ws"))
    jax_fns = {"1x1 conv": {"": (conv1x1, x1, w1)}, "3x3 conv": {"": (conv3x3, x3, w3)},
               "3x3 stem": {"": (conv3x3, xs, ws)},
               "3x3 depthwise": {"library": (depthwise_lib, xd, wd), "taps, autodiff": (depthwise_taps, xd, wd),
                                 "taps, hand-written VJP": (depthwise_taps_vjp, xd, wd)}}
    out = {}
    for layer, impls in jax_fns.items():
        out[layer] = {}
        for impl, (fn, x, w) in impls.items():
            xj, wj = jnp.asarray(x), jnp.asarray(w)
            jax_pieces = {
                "forward": jax.jit(fn),
                "input gradient": jax.jit(jax.grad(lambda a, b, fn=fn: jnp.sum(jnp.sin(fn(a, b))), argnums=0)),
                "kernel gradient": jax.jit(jax.grad(lambda a, b, fn=fn: jnp.sum(jnp.sin(fn(a, b))), argnums=1)),
            }
            name = f"{layer} ({impl})" if impl else layer
            for piece, jfn in jax_pieces.items():
                out[layer][(name, piece)] = lambda f=jfn, a=xj, b=wj: f(a, b).block_until_ready()
    return out


def profile(arch: str, batch: int, size: int, channels: int, repeat: int, torch_network: Callable,
            torch_layer_pieces: Callable, arch_kwargs: Optional[Dict] = None) -> List[Tuple[str, str, float, float]]:
    """(what, piece, JAX seconds, PyTorch seconds) rows: the whole network (`models.create(arch, 10, **arch_kwargs)`;
    each `depthwise` implementation of MobileNetV2), then the layer types at size/2 (the stem at size).
    `torch_network(arch, x, labels, arch_kwargs)` -> {piece: callable} and `torch_layer_pieces(inputs, channels)` ->
    {layer: {piece: callable}} are the PyTorch side (peers.torch_profile)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=batch).astype(np.int32)
    rows = []
    impls = ("taps", "conv") if arch == "mobilenet_v2" else ("",)
    for piece, tfn in torch_network(arch, x, labels, arch_kwargs).items():
        t_torch = median_seconds(tfn, repeat)
        for impl in impls:
            t_jax = median_seconds(jax_network(arch, impl or "auto", x, labels, arch_kwargs)[piece], repeat)
            rows.append((f"{arch} ({impl})" if impl else arch, piece, t_jax, t_torch))
    inputs = layer_inputs(batch, size // 2, channels)
    torch_layers = torch_layer_pieces(inputs, channels)
    for layer, pieces in jax_layer_pieces(inputs).items():
        for (name, piece), jfn in pieces.items():
            rows.append((name, piece, median_seconds(jfn, repeat), median_seconds(torch_layers[layer][piece], repeat)))
    return rows


def table(rows: List[Tuple[str, str, float, float]], arch: str, batch: int, size: int, channels: int,
          torch_threads: int, arch_kwargs: Optional[Dict] = None) -> str:
    """The Markdown section: a header naming the device and the shapes, one line per (what, piece)."""
    import jax

    kw = "".join(f" {k}={v}" for k, v in (arch_kwargs or {}).items())
    header = (f"\n### Per-piece profile: {arch}{kw}, batch {batch}, {size}x{size}, float32 "
              f"({jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, torch threads {torch_threads}, "
              f"{time.strftime('%Y-%m-%d')}; `scripts/profile_ops.py`)\n\n"
              f"Layer rows: batch {batch}, {size // 2}x{size // 2}, {channels} channels "
              f"(1x1: {channels // 6} -> {channels}; 3x3 conv: {channels} -> {channels}); stem: 3 -> {STEM_FILTERS} at "
              f"{size}x{size}; loss sum(sin(out)).\n\n"
              "| what | piece | JAX (ms) | PyTorch eager (ms) | JAX / PyTorch time |\n|---|---|---:|---:|---:|\n")
    return header + "".join(f"| {a} | {b} | {j * 1e3:.1f} | {t * 1e3:.1f} | {j / t:.2f} |\n" for a, b, j, t in rows)
