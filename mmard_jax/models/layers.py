"""Layer factories shared by the model zoo: PyTorch-equivalent Conv/BatchNorm/Dense, padding and pooling.

Every architecture here mirrors a PyTorch peer (RobustBench, kuangliu/pytorch-cifar) so that converted
weights give the same logits; the PyTorch conventions live in this one file:
BatchNorm momentum 0.1 (Flax 0.9), epsilon 1e-5; explicit symmetric padding (PyTorch `padding=1` pads
(1, 1) even at stride 2, where Flax 'SAME' pads (0, 1)); PyTorch's default initializers.
"""

import functools
import math
import os
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

ModuleDef = Any
Dtype = Any

# PyTorch `padding=1` on a 3x3 kernel: one row/column on both sides at every stride.
PAD_SAME_TORCH = ((1, 1), (1, 1))
# DeepMind's WideResNet pads by hand before a padding-0 stride-2 conv: nothing before, one after.
PAD_DM_STRIDE2 = ((0, 1), (0, 1))

# PyTorch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# TRADES/RobustBench WideResNet conv init: N(0, sqrt(2 / (k * k * out_channels))).
WRN_CONV_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_bias_init(fan_in: int) -> Callable:
    """PyTorch's default Linear bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)); Flax's bias init lacks fan_in."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv_factory(dtype: Dtype, kernel_init: Callable = TORCH_DEFAULT_KERNEL_INIT, conv_grad: str = "auto") -> ModuleDef:
    """Bias-free Conv computing in `dtype` with float32 parameters, as every conv of the zoo; `conv_grad` picks how
    its input gradient is computed ('auto' | 'custom' | 'lax', see `resolve_conv_grad`)."""
    return functools.partial(
        nn.Conv, use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
        conv_general_dilated=CONV_GENERAL_DILATED[check_conv_grad(conv_grad)],
    )


def batch_norm_factory(train: bool, dtype: Dtype, axis_name: Optional[str], bn_grad: Optional[str] = None) -> ModuleDef:
    """BatchNorm2d with PyTorch's defaults; `axis_name` averages batch statistics across devices; `bn_grad` picks how
    its train mode is differentiated ('auto' | 'custom' | 'flax', see `resolve_bn_grad`; None: `default_bn_grad()`)."""
    return functools.partial(
        BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=axis_name,
        grad=check_bn_grad(bn_grad if bn_grad is not None else default_bn_grad()),
    )


BN_GRAD_ENV = "MMARD_JAX_BN_GRAD"
BN_GRAD_MODES = ("auto", "custom", "flax")


def check_bn_grad(setting: str, key: str = "bn_grad") -> str:
    """`setting` if it is a bn_grad mode; else a one-line ValueError naming `key`."""
    return _check_mode(setting, BN_GRAD_MODES, key)


def default_bn_grad() -> str:
    """The zoo's BatchNorm gradient setting: $MMARD_JAX_BN_GRAD if set, else 'auto'. Read when a model is traced:
    both modes agree to float rounding, so the switch, like the XLA flags', belongs to the process, not the config."""
    return _env_mode(BN_GRAD_ENV, BN_GRAD_MODES)


def resolve_bn_grad(setting: str, backend: Optional[str] = None) -> str:
    """How a train-mode BatchNorm is differentiated: 'custom' (`batch_norm_train`'s hand-written VJP: per layer two
    reductions and two elementwise passes, forward and backward; measured on XLA:CPU) or 'flax' (`nn.BatchNorm`
    and autodiff). 'auto' is 'custom' on the CPU backend and 'flax' on every other until measured there."""
    return _resolve_mode(check_bn_grad(setting), BN_GRAD_MODES, backend)


def _sums(*xs, axes):
    """The sums of equally shaped arrays over `axes` in one (variadic) reduction: one pass over the inputs."""
    zero = tuple(jnp.zeros((), x.dtype) for x in xs)
    return jax.lax.reduce(xs, zero, lambda a, b: tuple(u + v for u, v in zip(a, b)), axes)


def _global_count(x: jax.Array, axis_name: Optional[str]) -> int:
    """The number of values per channel of the (global) batch: all but the last axis, times the devices."""
    return math.prod(x.shape[:-1]) * (jax.lax.axis_size(axis_name) if axis_name is not None else 1)


def _bn_stats(x: jax.Array, acc: Dtype, axis_name: Optional[str]):
    """(mean, mean of squares, biased variance) over all but the last axis and the devices of `axis_name`, in `acc`:
    flax's `_compute_stats` (fast variance, clipped at 0), to rounding (it averages per-device means; here both sums
    go through one psum and are scaled by 1 / the global count, so the scaling fuses into their consumers)."""
    xf = x.astype(acc)
    axes = tuple(range(x.ndim - 1))
    sums = _sums(xf, jnp.square(xf), axes=axes)
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    inv_count = 1.0 / _global_count(x, axis_name)
    mean, mean_sq = (s * inv_count for s in sums)
    return mean, mean_sq, jnp.maximum(0.0, mean_sq - jnp.square(mean))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: Optional[str],
                     acc: Dtype, out_dtype: Dtype):
    """Train-mode BatchNorm over the last axis: (y, batch mean, biased batch variance), the values of flax's
    `nn.BatchNorm` (statistics in `acc`, `y = (x - mean) * (rsqrt(var + eps) * scale) + bias` cast to `out_dtype`),
    with a hand-written VJP: the cotangent sums (g, g * (x - mean)) in one reduction, the input gradient in one
    elementwise pass, where autodiff of flax's module leaves dozens of small fusions per layer on XLA:CPU."""
    return _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name, acc, out_dtype)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name, acc, out_dtype):
    mean, mean_sq, var = _bn_stats(x, acc, axis_name)
    rstd = jax.lax.rsqrt(var + epsilon)
    mul = rstd * scale
    y = ((x - mean) * mul + bias).astype(out_dtype)
    return (y, mean, var), (x, scale, bias, mean, mean_sq, rstd)


def _batch_norm_train_bwd(epsilon, axis_name, acc, out_dtype, residuals, cts):
    """The chain rule of `_batch_norm_train_fwd` written out: the per-channel sums of the cotangent reach the
    statistics (through the clip, as `jnp.maximum` passes half at a tie, and over the global batch, as JAX transposes
    flax's pmean under `shard_map`), and x's gradient is `g * mul + c0 + c1 * x` with per-channel c0, c1."""
    x, scale, bias, mean, mean_sq, rstd = residuals
    g, ct_mean, ct_var = cts
    xf, gf = x.astype(acc), g.astype(acc)
    axes = tuple(range(x.ndim - 1))
    mul = rstd * scale
    # One reduction; summed over the devices where g varies and the statistics do not (`_cotangent_like`).
    sum_g, sum_gx = _sums(gf, gf * (x - mean), axes=axes)
    sum_g, sum_gx = _cotangent_like(sum_g, bias), _cotangent_like(sum_gx, scale)
    d_scale = sum_gx * rstd
    diff = mean_sq - jnp.square(mean)
    clip = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0)).astype(acc)
    d_var = (ct_var + sum_gx * scale * (-0.5) * rstd ** 3) * clip  # rstd = (var + eps)^(-1/2)
    d_mean = ct_mean - sum_g * mul - 2.0 * mean * d_var
    inv_count = 1.0 / _global_count(x, axis_name)
    c0, c1 = d_mean * inv_count, 2.0 * d_var * inv_count
    dx = gf * mul + c0 + c1 * xf
    return dx.astype(x.dtype), _cotangent_like(d_scale, scale), _cotangent_like(sum_g, bias)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` (same attributes, variables and values) whose train mode, where `resolve_bn_grad(grad)` is
    'custom' and the configuration is the zoo's (features last, scale and bias, fast variance, no mask or groups),
    runs `batch_norm_train`; otherwise flax's own code. A subclass, so `isinstance(m, nn.BatchNorm)` (SWA's
    statistics recompute) holds."""

    grad: str = "auto"

    def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
        train = not nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        zoo_form = (self.axis in (-1, x.ndim - 1) and self.use_scale and self.use_bias and self.use_fast_variance
                    and self.force_float32_reductions and self.axis_index_groups is None and mask is None)
        if not (train and zoo_form and resolve_bn_grad(self.grad) == "custom"):
            return super().__call__(x, use_running_average, mask=mask)
        return self._train_custom(x)

    @nn.compact
    def _train_custom(self, x):
        """Train mode through `batch_norm_train`, with flax's variables in flax's order and its running update."""
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        acc = jnp.promote_types(self.dtype if self.dtype is not None else x.dtype, jnp.float32)
        out_dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        axis_name = None if self.is_initializing() else self.axis_name
        y, mean, var = batch_norm_train(x, scale, bias, float(self.epsilon), axis_name, acc, out_dtype)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def classifier(
    x: jax.Array,
    num_classes: int,
    dtype: Dtype,
    name: str,
    use_bias: bool = True,
    bias_init: Optional[Callable] = None,
) -> jax.Array:
    """Final Linear layer (PyTorch default init) whose logits are always float32."""
    dense = nn.Dense(
        num_classes,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=TORCH_DEFAULT_KERNEL_INIT,
        bias_init=bias_init if bias_init is not None else torch_bias_init(x.shape[-1]),
        name=name,
    )
    return dense(x).astype(jnp.float32)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Spatial mean of NHWC features: PyTorch's `AdaptiveAvgPool2d((1, 1))` at any input size (and its final
    `avg_pool2d(out, 4 or 8)` where that window covers the whole map, as on 32x32 inputs)."""
    return jnp.mean(x, axis=(1, 2))


def window_avg_pool_flatten(x: jax.Array, window: int) -> jax.Array:
    """PyTorch's `F.avg_pool2d(out, window)` (stride = window, no padding, rounding down) then `out.view(N, -1)`:
    the pooled map flattened channel-major as PyTorch's NCHW lays it out, so a converted Linear reads the same
    features (e.g. an 8x8x512 map, window 4 -> 2x2x512 = 2048 features)."""
    height, width = x.shape[1:3]
    if window < 1 or window > min(height, width):
        raise ValueError(f"pool window {window} does not fit the final {height}x{width} feature map "
                         f"(a larger input image is needed, or the global mean)")
    pooled = nn.avg_pool(x, (window, window), strides=(window, window), padding="VALID")
    return jnp.transpose(pooled, (0, 3, 1, 2)).reshape(x.shape[0], -1)


DEPTHWISE_IMPLS = ("auto", "taps", "conv")


def _tap_slices(x: jax.Array, kh: int, kw: int, strides, out_h: int, out_w: int):
    """The kh*kw shifted, strided [N, out_h, out_w, C] slices of an (already padded) NHWC map, row-major by tap
    (`strides`: one int or a (height, width) pair)."""
    sh, sw = (strides, strides) if isinstance(strides, int) else strides
    return [[x[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
             for j in range(kw)] for i in range(kh)]


def _padded_taps(x: jax.Array, kernel_hw: Tuple[int, int], strides: Tuple[int, int], padding, barrier: bool = False):
    """`_tap_slices` of x zero padded by `padding` ((top, bottom), (left, right); negative pads crop); with `barrier`
    the padded map is materialised first (`optimization_barrier`: no producer fused into the slices' readers)."""
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    xp = jax.lax.optimization_barrier(xp) if barrier else xp
    out_h, out_w = ((xp.shape[1 + a] - kernel_hw[a]) // strides[a] + 1 for a in range(2))
    return _tap_slices(xp, *kernel_hw, strides, out_h, out_w)


def depthwise_taps(x: jax.Array, kernel: jax.Array, strides: int, padding) -> jax.Array:
    """Depthwise convolution (kernel [kh, kw, 1, C]) as the sum over the kh*kw taps of a shifted, strided
    slice of the padded input times that tap's per-channel weights: the values of `lax.conv` with
    `feature_group_count=C`, as fusible elementwise work."""
    kh, kw = kernel.shape[:2]
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    out_h = (x.shape[1] - kh) // strides + 1
    out_w = (x.shape[2] - kw) // strides + 1
    out = None
    for i, row in enumerate(_tap_slices(x, kh, kw, strides, out_h, out_w)):
        for j, tap in enumerate(row):
            term = tap * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def depthwise_input_grad(g: jax.Array, kernel: jax.Array, in_hw: Tuple[int, int], strides: int, padding) -> jax.Array:
    """Input gradient of `depthwise_taps` for output gradient `g`: a stride-1 tap sum of the flipped kernel over
    `g` dilated by the stride and padded as the transposed convolution needs (`_transpose_padding`), i.e. the
    forward's own fusible form instead of the scatter (interior pads of every tap) that autodiff produces."""
    kh, kw = kernel.shape[:2]
    pads = [_transpose_padding(in_hw[a], (kh, kw)[a], strides, tuple(padding[a])) for a in range(2)]
    zero = jnp.zeros((), g.dtype)
    dilated = jax.lax.pad(g, zero, ((0, 0, 0), pads[0] + (strides - 1,), pads[1] + (strides - 1,), (0, 0, 0)))
    out = None
    for i, row in enumerate(_tap_slices(dilated, kh, kw, 1, in_hw[0], in_hw[1])):
        for j, tap in enumerate(row):
            term = tap * kernel[kh - 1 - i, kw - 1 - j, 0].astype(g.dtype)
            out = term if out is None else out + term
    return out


def depthwise_kernel_grad(x: jax.Array, g: jax.Array, kernel_hw: Tuple[int, int], strides: int, padding) -> jax.Array:
    """Kernel gradient [kh, kw, 1, C] of `depthwise_taps`: per tap, the product of its input slice with `g` summed
    over height and width (on maps up to 32x32 within XLA:CPU's 32-wide reduction window: no reduce-window rewrite),
    the [N, kh*kw*C] partial sums then over the batch in one reduction (accumulated in at least float32)."""
    kh, kw = kernel_hw
    acc = jnp.promote_types(g.dtype, jnp.float32)
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    taps = [t for row in _tap_slices(xp, kh, kw, strides, g.shape[1], g.shape[2]) for t in row]
    partial = jnp.concatenate([jnp.sum(t * g, axis=(1, 2), dtype=acc) for t in taps], axis=-1)
    return jnp.sum(partial, axis=0).reshape(kh, kw, 1, g.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: Tuple[Tuple[int, int], ...]) -> jax.Array:
    """`depthwise_taps` with a hand-written VJP (`depthwise_input_grad`, `depthwise_kernel_grad`): the same values
    as autodiff of the tap sum, in forms XLA's CPU backend runs faster (BENCHMARKS.md, "Measured alternatives")."""
    return depthwise_taps(x, kernel, strides, padding)


def _depthwise_conv_fwd(x, kernel, strides, padding):
    return depthwise_taps(x, kernel, strides, padding), (x, kernel)


def _cotangent_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """`ct` as the cotangent of `primal`: in its dtype and, inside `shard_map`, summed over the mapped axes along which
    `ct` varies and `primal` does not (the transpose of the broadcast JAX inserts where a replicated parameter meets
    per-device data: a kernel's gradient is the sum over the devices); elsewhere unchanged."""
    ct = ct.astype(primal.dtype)
    _, pull = jax.vjp(lambda p: p + 0 * ct, primal)
    return pull(ct)[0]


def _depthwise_conv_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    dx = depthwise_input_grad(g, kernel, x.shape[1:3], strides, padding)
    dk = depthwise_kernel_grad(x, g, kernel.shape[:2], strides, padding)
    return _cotangent_like(dx, x), _cotangent_like(dk, kernel)


depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


class DepthwiseConv(nn.Module):
    """Bias-free depthwise conv with `nn.Conv(feature_group_count=C)`'s parameter (name, shape, init), so
    checkpoints and conversion are unchanged; `impl` picks how it is computed, `conv_grad` how the taps are
    differentiated.

    XLA's CPU backend runs grouped convolutions ~20x slower than PyTorch (3x3, 192 channels, 16x16,
    batch 128: 223 ms vs 11.6 ms forward); the tap sum takes 8.6 ms (BENCHMARKS.md). 'auto' uses the
    taps on CPU and the library convolution (cuDNN) elsewhere. Where `resolve_conv_grad(conv_grad)` is 'custom'
    (the CPU's default) the taps go through `depthwise_conv`'s hand-written VJP, else through autodiff.
    """

    kernel_size: tuple
    strides: int = 1
    padding: Any = PAD_SAME_TORCH
    dtype: Dtype = jnp.float32
    kernel_init: Callable = TORCH_DEFAULT_KERNEL_INIT
    impl: str = "auto"
    conv_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.impl not in DEPTHWISE_IMPLS:
            raise ValueError(f"depthwise impl must be one of {DEPTHWISE_IMPLS}, got {self.impl!r}")
        channels = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, tuple(self.kernel_size) + (1, channels), jnp.float32)
        x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
        impl = self.impl if self.impl != "auto" else ("taps" if jax.default_backend() == "cpu" else "conv")
        if impl == "taps":
            padding = tuple(tuple(int(p) for p in pair) for pair in self.padding)
            taps = depthwise_conv if resolve_conv_grad(self.conv_grad) == "custom" else depthwise_taps
            return taps(x, kernel, int(self.strides), padding)
        return jax.lax.conv_general_dilated(
            x, kernel, (self.strides, self.strides), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
        )


NHWC_HWIO = ("NHWC", "HWIO", "NHWC")
CONV_GRAD_ENV = "MMARD_JAX_CONV_GRAD"
CONV_GRAD_MODES = ("auto", "custom", "lax")


def check_conv_grad(setting: str, key: str = "conv_grad") -> str:
    """`setting` if it is a conv_grad mode; else a one-line ValueError naming `key`."""
    return _check_mode(setting, CONV_GRAD_MODES, key)


def default_conv_grad() -> str:
    """The default of the configs' `conv_grad` fields: $MMARD_JAX_CONV_GRAD if set, else 'auto'.

    Read when a config is built (never while tracing), so that a GPU run can time both modes without editing it.
    """
    return _env_mode(CONV_GRAD_ENV, CONV_GRAD_MODES)


def resolve_conv_grad(setting: str, backend: Optional[str] = None) -> str:
    """How a model's convolutions are differentiated under its `conv_grad` setting: 'custom' (`conv2d`'s hand-written
    input gradient for plain 2-D convolutions, `depthwise_conv`'s VJP for MobileNetV2's depthwise taps; measured
    faster on XLA:CPU only) or 'lax' (the library convolution and JAX's own transpose rule, autodiff of the taps).
    'auto' is 'custom' on the CPU backend and 'lax' on every other (`backend`, default `jax.default_backend()` at
    trace time); 'custom' or 'lax' force one, so that a GPU run can time both."""
    return _resolve_mode(check_conv_grad(setting), CONV_GRAD_MODES, backend)


# The hand-written-gradient switches (conv_grad, bn_grad) share one form: modes ('auto', 'custom', the library's).

def _check_mode(setting: str, modes: Tuple[str, ...], key: str) -> str:
    if setting not in modes:
        raise ValueError(f"{key} must be one of {', '.join(modes)}, got {setting!r}")
    return setting


def _env_mode(env: str, modes: Tuple[str, ...]) -> str:
    """The mode $`env` names (case and spaces ignored), 'auto' when unset or empty."""
    return _check_mode(os.environ.get(env, "auto").strip().lower() or "auto", modes, f"${env}")


def _resolve_mode(setting: str, modes: Tuple[str, ...], backend: Optional[str]) -> str:
    """'auto' -> 'custom' (modes[1]) on the CPU backend, the library's form (modes[2]) elsewhere; others as they are."""
    if setting != "auto":
        return setting
    return modes[1] if (backend or jax.default_backend()) == "cpu" else modes[2]


def _transpose_padding(n: int, k: int, stride: int, pad: Tuple[int, int]) -> Tuple[int, int]:
    """Padding of the stride-dilated output gradient so that a stride-1 conv with the flipped kernel
    returns the input gradient (size n) of a conv with kernel k, `stride` and padding `pad`."""
    m = (n + pad[0] + pad[1] - k) // stride + 1
    return k - 1 - pad[0], n - 1 + pad[0] - (m - 1) * stride


# Input channels up to which `conv2d`'s input gradient is a dot and a patch scatter (`patch_input_grad`): the RGB
# stems. Their flipped-kernel convolution has 3 output channels, which XLA:CPU runs 2.4-4.8x slower (3x3 stem, batch
# 128: 2.72 -> 1.15 ms at 16x16, 9.06 -> 2.17 ms at 32x32 with 16 filters, 25.6 -> 5.3 ms with 64; 7x7 stride 2,
# 64x64: equal; BENCHMARKS.md "The stem's input gradient").
PATCH_GRAD_MAX_CHANNELS = 4

# Terms per output value (kernel height x width x input channels) up to which `conv2d`'s forward, with at most
# PATCH_GRAD_MAX_CHANNELS input channels, is a tap sum (`tap_sum_conv`): the 3x3 RGB stems, whose XLA:CPU convolution
# is 1.3-3.6x slower than the fused sum (batch 56, 32x32: 3->16 1.94 -> 0.54 ms, 3->64 2.82 -> 2.12 ms, 4 channels
# (36 terms) 2.02 -> 1.36 ms; WRN-10-1 forward 12.7 -> 11.5 ms), where a 7x7 stem's 147 terms are 3x slower as a sum
# and a 1x1 shortcut's 16 channels slow the WRN-10-1 forward back to 12.7 ms (BENCHMARKS.md "The stem's forward").
TAP_SUM_MAX_TERMS = 36


def tap_sum_conv(x: jax.Array, w: jax.Array, strides: Tuple[int, int], padding) -> jax.Array:
    """conv(x, w) (NHWC x HWIO) as the sum over taps and input channels of a shifted, strided input channel times
    that tap's weight row: one elementwise loop for XLA:CPU, faster than its convolution with few terms
    (`TAP_SUM_MAX_TERMS`); low-precision inputs sum in float32, as the convolution does."""
    kh, kw, ci, _ = w.shape
    out_dtype = jnp.result_type(x, w)
    acc = jnp.promote_types(out_dtype, jnp.float32)
    # The padded input is read kh*kw*ci times per output value: materialised once, so that no producer (Square's L2
    # candidate) is fused into the sum and recomputed per read (its WRN-10-1 query 235 -> 240 us per example without
    # the barrier, 231 with it).
    out = None
    for i, row in enumerate(_padded_taps(x.astype(acc), (kh, kw), strides, padding, barrier=True)):
        for j, tap in enumerate(row):
            for c in range(ci):
                term = tap[..., c:c + 1] * w[i, j, c].astype(acc)
                out = term if out is None else out + term
    return out.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, w: jax.Array, strides: Tuple[int, int], padding: Tuple[Tuple[int, int], ...], precision=None):
    """NHWC x HWIO convolution whose input gradient is a plain stride-1 convolution of the (stride-dilated)
    output gradient with the flipped kernel: the same values as JAX's own transpose rule, but a form XLA's
    CPU backend runs 3x faster inside loops (an 8-conv stack, 10 PGD steps in a rolled `fori_loop`:
    4.2 s with JAX's rule, 1.24 s with this one, 1.25 s fully unrolled; BENCHMARKS.md); with at most
    PATCH_GRAD_MAX_CHANNELS input channels, a dot and a patch scatter instead (`patch_input_grad`). With at most
    TAP_SUM_MAX_TERMS terms per output value the forward is a tap sum (`tap_sum_conv`)."""
    if w.shape[2] <= PATCH_GRAD_MAX_CHANNELS and math.prod(w.shape[:3]) <= TAP_SUM_MAX_TERMS:
        return tap_sum_conv(x, w, strides, padding)
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC_HWIO, precision=precision)


def _conv2d_fwd(x, w, strides, padding, precision):
    return conv2d(x, w, strides, padding, precision), (x, w)


def _patches(x: jax.Array, kernel_hw: Tuple[int, int], strides: Tuple[int, int], padding) -> jax.Array:
    """[N, H', W', kh*kw*C]: each output pixel's receptive field (taps in kernel order, channels last), zero padded."""
    return jnp.concatenate([tap for row in _padded_taps(x, kernel_hw, strides, padding) for tap in row], axis=-1)


def patch_input_grad(g: jax.Array, w: jax.Array, x: jax.Array, strides, padding, precision=None) -> jax.Array:
    """The input gradient of conv(x, w) as the transpose of `_patches` applied to g . W^T (each output pixel's patch
    gradient, added back where the patch came from): the conv's own transpose for few input channels, faster there."""
    kh, kw, ci, co = w.shape
    acc = jnp.promote_types(g.dtype, jnp.float32)  # low-precision inputs: the tap sums in float32, as the conv does
    patch_grad = jnp.dot(g, w.reshape(kh * kw * ci, co).astype(g.dtype).T, precision=precision,
                         preferred_element_type=acc)
    # vjp, not linear_transpose: it keeps the cotangent's sharding-axis type inside shard_map; the unused forward
    # patches are dead code under jit.
    _, scatter = jax.vjp(lambda u: _patches(u, (kh, kw), strides, padding), x.astype(acc))
    return scatter(patch_grad)[0].astype(x.dtype)


def _conv2d_bwd(strides, padding, precision, residuals, g):
    x, w = residuals
    kh, kw = w.shape[:2]
    if x.shape[-1] <= PATCH_GRAD_MAX_CHANNELS:
        dx = patch_input_grad(g, w, x, strides, padding, precision)
    else:
        pads = [_transpose_padding(x.shape[1 + i], (kh, kw)[i], strides[i], padding[i]) for i in range(2)]
        flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
        dx = jax.lax.conv_general_dilated(g, flipped.astype(g.dtype), (1, 1), pads, lhs_dilation=strides,
                                          dimension_numbers=NHWC_HWIO, precision=precision)
    _, weight_vjp = jax.vjp(
        lambda v: jax.lax.conv_general_dilated(x, v, strides, padding, dimension_numbers=NHWC_HWIO,
                                               precision=precision), w)
    return dx.astype(x.dtype), weight_vjp(g)[0]


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, conv_grad="auto", **kwargs):
    """`lax.conv_general_dilated` for `nn.Conv`: plain 2-D NHWC/HWIO convolutions go through `conv2d`
    (fast input gradient on XLA:CPU) where `resolve_conv_grad(conv_grad)` is 'custom', anything else (dilation,
    groups, other layouts, or mode 'lax') to lax unchanged."""
    simple = (
        resolve_conv_grad(conv_grad) == "custom"
        and lhs.ndim == 4 and feature_group_count == 1 and not kwargs
        and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC_HWIO)
    )
    if not simple:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision, **kwargs)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), padding, precision)


# `nn.Conv`'s convolution for each conv_grad setting: one function object per mode, so equal modules compare equal.
CONV_GENERAL_DILATED = {mode: functools.partial(conv_general_dilated, conv_grad=mode) for mode in CONV_GRAD_MODES}
