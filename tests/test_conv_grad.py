"""The convolution input gradient switch: a module attribute (`conv_grad`) of every family, set through
`models.create` and `config.student` / `config.teacher`, resolved by backend at trace time ('auto')."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn

from mmard_jax import cli, config_lib, models, train
from mmard_jax.models import layers

# A small instance of every registered family (the switch is the same attribute in each).
SMALL = {
    "resnet18": {"base_width": 4},
    "resnet50": {"base_width": 4},
    "torchvision_resnet18": {},
    "torchvision_resnet50": {"width_per_group": 16},
    "torchvision_wide_resnet50_2": {},
    "preact_resnet18": {"base_width": 4, "out_shortcut": True},
    "preact_resnet18_saad": {"base_width": 4},
    "preact_resnet18_dgad": {"base_width": 4},
    "mobilenet_v2": {"depthwise": "taps"},
    "wide_resnet": {"depth": 10, "width": 1},
    "dm_wide_resnet": {"depth": 10, "width": 1},
    "dm_preact_resnet": {},
}
SIZE = {"preact_resnet18_dgad": 32}  # its window pool of 4 needs a 4x4 final map (8x8 inputs end at 1x1); else 8


def _conv_fn(conv_grad):
    """A jitted (values, input gradient, kernel gradients) of three `nn.Conv`s of the zoo (stride 1 and 2, torch
    padding, a 1x1) whose factory has `conv_grad`."""
    conv = layers.conv_factory(jnp.float32, conv_grad=conv_grad)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = conv(8, (3, 3), padding=layers.PAD_SAME_TORCH)(x)
            x = conv(8, (3, 3), strides=(2, 2), padding=layers.PAD_SAME_TORCH)(jnp.tanh(x))
            return conv(4, (1, 1))(x)

    net = Net()
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    variables = net.init(jax.random.key(1), x)

    def loss(v, z):
        return jnp.sum(jnp.sin(net.apply(v, z)))

    def run(v, z):
        return net.apply(v, z), jax.grad(loss, argnums=(0, 1))(v, z)

    return jax.jit(run), variables, x


def _custom_vjp_calls(module, size=8) -> int:
    """How many conv2d custom-VJP calls the module's forward traces to (a faked backend is honoured)."""
    x = jnp.ones((1, size, size, 3))
    v = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    return str(jax.make_jaxpr(lambda v, z: module.apply(v, z))(v, x)).count("custom_vjp_call")


def _conv_kernels(module, size=8) -> int:
    """The module's conv kernels, plain and depthwise (MobileNetV2's taps): each should go through the switch."""
    v = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.ones((1, size, size, 3))))
    return sum(1 for a in jax.tree.leaves(v["params"]) if a.ndim == 4)


@pytest.mark.parametrize("arch", sorted(models.MODELS))
def test_every_family_passes_its_conv_grad_to_every_conv(arch):
    """'custom' sends each conv of the model through a custom VJP (plain ones `conv2d`'s, MobileNetV2's depthwise taps
    `depthwise_conv`'s), 'lax' none."""
    assert set(SMALL) == set(models.MODELS)
    custom = models.create(arch, **SMALL[arch], conv_grad="custom")
    lax = models.create(arch, **SMALL[arch], conv_grad="lax")
    assert custom.conv_grad == "custom" and "conv_grad" in models.accepted_arguments(arch)
    size = SIZE.get(arch, 8)
    n = _conv_kernels(custom, size)
    assert n > 0 and _custom_vjp_calls(custom, size) == n
    assert _custom_vjp_calls(lax, size) == 0


def test_conv_grad_auto_resolves_by_backend(monkeypatch):
    """'auto' (the default) is 'custom' on the CPU backend and 'lax' on any other, decided at trace time; an
    explicit setting wins on every backend."""
    assert layers.resolve_conv_grad("auto", "cpu") == "custom"
    assert layers.resolve_conv_grad("auto", "gpu") == "lax" and layers.resolve_conv_grad("auto", "tpu") == "lax"
    assert layers.resolve_conv_grad("custom", "gpu") == "custom" and layers.resolve_conv_grad("lax", "cpu") == "lax"
    model = models.create("wide_resnet", depth=10, width=1)
    assert model.conv_grad == "auto" and _custom_vjp_calls(model) > 0  # this test runs on the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.resolve_conv_grad("auto") == "lax"
    assert _custom_vjp_calls(model) == 0
    assert _custom_vjp_calls(models.create("wide_resnet", depth=10, width=1, conv_grad="custom")) > 0


def test_environment_is_the_config_default_only(monkeypatch):
    """$MMARD_JAX_CONV_GRAD is read when a config is built (both blocks' default), never while tracing."""
    monkeypatch.delenv(layers.CONV_GRAD_ENV, raising=False)
    c = config_lib.base_config("mmard", "resnet18", "cifar10")
    assert c.student.conv_grad == "auto" and c.teacher.conv_grad == "auto"
    monkeypatch.setenv(layers.CONV_GRAD_ENV, " LAX ")
    c = config_lib.base_config("mmard", "resnet18", "cifar10")
    assert c.student.conv_grad == "lax" and c.teacher.conv_grad == "lax"
    # A model traced now keeps its own attribute: 'auto' on the CPU is still the custom gradient.
    assert _custom_vjp_calls(models.create("wide_resnet", depth=10, width=1)) > 0


def test_conv_grad_rejects_unknown_values(monkeypatch):
    """A bad value is a one-line error naming where it came from: the attribute, the variable, the config key."""
    with pytest.raises(ValueError) as err:  # (JAX adds a note on its filtered traceback: not the message)
        models.create("resnet18", base_width=4, conv_grad="fast").init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    assert str(err.value) == "conv_grad must be one of auto, custom, lax, got 'fast'"
    monkeypatch.setenv(layers.CONV_GRAD_ENV, "fast")
    with pytest.raises(ValueError, match=r"^\$MMARD_JAX_CONV_GRAD must be one of auto, custom, lax, got 'fast'$"):
        config_lib.base_config("mmard", "resnet18", "cifar10")
    monkeypatch.delenv(layers.CONV_GRAD_ENV)
    for block in ("student", "teacher"):
        config = config_lib.base_config("mmard", "resnet18", "cifar10")
        config[block].conv_grad = "fast"
        with pytest.raises(cli.UserError) as err:
            train.check_config(config)
        assert str(err.value) == f"--config.{block}.conv_grad='fast' is not one of: auto, custom, lax"


def test_build_networks_passes_the_config_blocks_conv_grad():
    """The student and its peer take config.student.conv_grad (also for evaluation)."""
    config = config_lib.base_config("peeraid", "resnet18", "cifar10")
    config.student.kwargs = {"base_width": 4}
    config.student.conv_grad = "lax"
    nets, frozen, spec = train.build_networks(config, config_lib.resolve_method(config.method), 10, (8, 8, 3))
    assert nets.student.conv_grad == nets.peer.conv_grad == "lax" and not frozen
    assert "conv_grad" not in spec["kwargs"]  # a run's setting, not the model directory's


def test_conv_grad_modes_agree_on_values_and_gradients():
    """On the CPU the hand-written input gradient and the library's give the same values and gradients."""
    out = {}
    for mode in ("custom", "lax"):
        fn, variables, x = _conv_fn(mode)
        out[mode] = jax.device_get(fn(variables, x))
    flat_custom, flat_lax = jax.tree.leaves(out["custom"]), jax.tree.leaves(out["lax"])
    assert len(flat_custom) == len(flat_lax) == 1 + 3 + 1  # values, three kernels, the input gradient
    for a, b in zip(flat_custom, flat_lax):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_conv_grad_modes_agree_on_a_model():
    """A whole model (stride-2 convs, 1x1 shortcuts, BatchNorm in training mode): same logits, same parameter
    and input gradients under either mode."""
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    results = []
    for mode in ("custom", "lax"):
        model = models.create("wide_resnet", depth=10, width=1, conv_grad=mode)
        variables = model.init(jax.random.key(1), x)

        def loss(params, z, model=model, variables=variables):
            logits, _ = model.apply({**variables, "params": params}, z, train=True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(logits)), logits

        results.append(jax.device_get(jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# (input size, stride, padding) of the depthwise VJP checks: MobileNetV2's torch padding at both strides, and an odd
# size at stride 2 with an asymmetric padding (DeepMind's stride-2 form).
DEPTHWISE_CASES = ((9, 1, ((1, 1), (1, 1))), (8, 2, ((1, 1), (1, 1))), (7, 2, ((0, 1), (0, 1))))
TOLERANCE = {"float64": {"rtol": 1e-12, "atol": 1e-12}, "float32": {"rtol": 1e-5, "atol": 1e-6}}


def _torch_conv_vjp(x, w, cotangent, strides, padding, groups=1):
    """(values, input gradient, kernel gradient) of PyTorch's `F.conv2d(groups=groups)` (the padding applied by
    `F.pad`) on the same NHWC/HWIO arrays."""
    xt = torch.tensor(np.transpose(x, (0, 3, 1, 2)), requires_grad=True)
    wt = torch.tensor(np.transpose(w, (3, 2, 0, 1)), requires_grad=True)  # (out, in / groups, kh, kw)
    (top, bottom), (left, right) = padding
    y = F.conv2d(F.pad(xt, (left, right, top, bottom)), wt, stride=strides, groups=groups)
    y.backward(torch.tensor(np.transpose(cotangent, (0, 3, 1, 2))))
    return (np.transpose(y.detach().numpy(), (0, 2, 3, 1)), np.transpose(xt.grad.numpy(), (0, 2, 3, 1)),
            np.transpose(wt.grad.numpy(), (2, 3, 1, 0)))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _depthwise_vjps(x, w, cotangent, strides, padding):
    """(values, input gradient, kernel gradient) of `layers.depthwise_conv` and of lax's grouped convolution."""
    lax_conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(strides, strides), padding=padding,
                                 dimension_numbers=layers.NHWC_HWIO, feature_group_count=x.shape[-1])
    out = []
    for fn in (lambda a, b: layers.depthwise_conv(a, b, strides, padding), lax_conv):
        y, vjp = jax.vjp(fn, x, w)
        out.append((y, *vjp(cotangent)))
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_depthwise_vjp_equals_lax_and_torch(dtype):
    """`layers.depthwise_conv`'s hand-written input and kernel gradients (and its values) equal autodiff of
    `lax.conv_general_dilated(feature_group_count=C)` and PyTorch's `F.conv2d(groups=C)` on the same arrays."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(dtype == "float64"):
        for size, strides, padding in DEPTHWISE_CASES:
            x = rng.normal(size=(2, size, size, 5)).astype(dtype)
            w = rng.normal(size=(3, 3, 1, 5)).astype(dtype)
            out_size = (size + sum(padding[0]) - 3) // strides + 1
            cotangent = rng.normal(size=(2, out_size, out_size, 5)).astype(dtype)
            ours, lax_ref = _depthwise_vjps(x, w, cotangent, strides, padding)
            assert all(a.dtype == np.dtype(dtype) for a in ours)
            for reference in (lax_ref, _torch_conv_vjp(x, w, cotangent, strides, padding, groups=x.shape[-1])):
                for a, b in zip(ours, reference):
                    np.testing.assert_allclose(a, b, **TOLERANCE[dtype])


def test_depthwise_conv_grad_switch(monkeypatch):
    """A depthwise layer's `conv_grad`: 'custom' (the CPU's 'auto') differentiates the taps by `depthwise_conv`'s
    hand-written VJP, 'lax' by autodiff of the tap sum; the library form (impl 'conv') never (MobileNetV2 passes its
    own attribute on: test_every_family_passes_its_conv_grad_to_every_conv)."""
    x = jnp.ones((1, 5, 5, 4))

    def custom_calls(**kwargs):
        layer = layers.DepthwiseConv((3, 3), 1, **kwargs)
        v = jax.eval_shape(layer.init, jax.random.key(0), x)
        return str(jax.make_jaxpr(layer.apply)(v, x)).count("custom_vjp_call")

    assert custom_calls(impl="taps", conv_grad="custom") == custom_calls(impl="taps") == 1
    assert custom_calls(impl="taps", conv_grad="lax") == custom_calls(impl="conv", conv_grad="custom") == 0
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert custom_calls(impl="taps") == 0 and custom_calls(impl="taps", conv_grad="custom") == 1


def test_depthwise_vjp_inside_shard_map():
    """Inside `shard_map` (the train step's data parallelism) the replicated kernel's hand-written gradient is the sum
    over the devices, typed as the kernel (a per-device one is refused by JAX), equal to autodiff's outside."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",))
    rng = np.random.default_rng(1)
    x = jax.device_put(rng.normal(size=(2, 6, 6, 3)).astype("float32"), NamedSharding(mesh, P("data")))
    w = jax.device_put(rng.normal(size=(3, 3, 1, 3)).astype("float32"), NamedSharding(mesh, P()))

    def grads(fn):
        return jax.grad(lambda k, z: jnp.sum(jnp.sin(fn(z, k, 2, ((1, 1), (1, 1))))), argnums=(0, 1))

    mapped = jax.jit(jax.shard_map(grads(layers.depthwise_conv), mesh=mesh, in_specs=(P(), P("data")),
                                   out_specs=(P(), P("data"))))(w, x)
    for a, b in zip(mapped, jax.jit(grads(layers.depthwise_taps))(w, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# (kernel, input channels, input h x w, stride, padding) of the few-channel input gradient checks: the 3x3 RGB stem at
# both strides, an asymmetric padding, a 7x7 stride-2 stem (ImageNet ResNets), a 1x1 stride-2 shortcut, 1 channel.
PATCH_CASES = ((3, 3, (9, 10), 1, ((1, 1), (1, 1))), (3, 3, (9, 9), 2, ((1, 1), (1, 1))),
               (3, 2, (8, 7), 2, ((0, 1), (0, 1))), (7, 3, (13, 14), 2, ((3, 3), (3, 3))),
               (1, 4, (7, 7), 2, ((0, 0), (0, 0))), (3, 1, (6, 7), 1, ((2, 0), (1, 2))))


# Sums of up to 7 x 7 x 6 float32 products of N(0, 1) values (gradients up to ~30) in another order.
PATCH_TOLERANCE = {"float64": {"rtol": 1e-12, "atol": 1e-12}, "float32": {"rtol": 1e-5, "atol": 1e-5}}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_few_channel_input_grad_equals_lax_and_torch(dtype):
    """With at most PATCH_GRAD_MAX_CHANNELS input channels `conv2d`'s input gradient is `patch_input_grad` (a dot
    and a patch scatter); it equals autodiff of `lax.conv_general_dilated` and PyTorch's on the same arrays."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(dtype == "float64"):
        for k, channels, hw, strides, padding in PATCH_CASES:
            assert channels <= layers.PATCH_GRAD_MAX_CHANNELS
            x = rng.normal(size=(2, *hw, channels)).astype(dtype)
            w = rng.normal(size=(k, k, channels, 6)).astype(dtype)
            out_hw = [(hw[i] + sum(padding[i]) - k) // strides + 1 for i in range(2)]
            cotangent = rng.normal(size=(2, *out_hw, 6)).astype(dtype)
            ours = jax.vjp(lambda u: layers.conv2d(u, w, (strides, strides), padding), x)[1](cotangent)[0]
            lax_ref = jax.vjp(lambda u: jax.lax.conv_general_dilated(
                u, w, (strides, strides), padding, dimension_numbers=layers.NHWC_HWIO), x)[1](cotangent)[0]
            assert ours.dtype == np.dtype(dtype)
            for reference in (lax_ref, _torch_conv_vjp(x, w, cotangent, strides, padding)[1]):
                np.testing.assert_allclose(ours, reference, **PATCH_TOLERANCE[dtype])


def _assert_rounded_once_to_bfloat16(ours, ref):
    """`ours` (bfloat16) is the float32 result `ref` rounded once: within half a bfloat16 ulp of it (8 significant
    bits), plus float32 reordering."""
    ref = np.asarray(ref, np.float64)
    half_ulp = 2.0 ** (np.floor(np.log2(np.abs(ref))) - 8)
    assert np.all(np.abs(np.asarray(ours, np.float64) - ref) <= half_ulp + 1e-6 * np.abs(ref))


def test_few_channel_input_grad_is_a_dot_and_keeps_bfloat16_sums_in_float32():
    """The input gradient of a conv with 4 input channels is one dot, no convolution; 5 channels bring the
    flipped-kernel convolution back. In bfloat16 it is the float32 gradient rounded once: within half a bfloat16 ulp
    of it (plus float32 reordering), where a scatter adding in bfloat16 misses that on over half the elements."""
    def bwd_ops(channels):
        x, w = jnp.ones((2, 8, 8, channels)), jnp.ones((3, 3, channels, 4))
        bwd = functools.partial(layers._conv2d_bwd, (1, 1), ((1, 1), (1, 1)), None)
        text = str(jax.make_jaxpr(bwd)((x, w), jnp.ones((2, 8, 8, 4))))
        return text.count("conv_general_dilated"), text.count("dot_general")

    assert layers.PATCH_GRAD_MAX_CHANNELS == 4
    (convs_4, dots_4), (convs_5, dots_5) = bwd_ops(4), bwd_ops(5)
    assert convs_5 == convs_4 + 1 and dots_4 == 1 and dots_5 == 0
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 8), jnp.bfloat16)
    g = jax.random.normal(jax.random.key(2), (2, 9, 9, 8), jnp.bfloat16)
    ours = jax.vjp(lambda u: layers.conv2d(u, w, (1, 1), ((1, 1), (1, 1))), x)[1](g)[0]
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    ref = jax.vjp(lambda u: jax.lax.conv_general_dilated(
        u, f32(w), (1, 1), ((1, 1), (1, 1)), dimension_numbers=layers.NHWC_HWIO), f32(x))[1](f32(g))[0]
    assert ours.dtype == jnp.bfloat16
    _assert_rounded_once_to_bfloat16(ours, ref)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tap_sum_forward_equals_lax_and_torch(dtype):
    """`tap_sum_conv` (the few-term forward of `conv2d`) equals `lax.conv_general_dilated` and PyTorch's conv2d on the
    same arrays, for every stem shape of PATCH_CASES (the 7x7 one and 1x1 too, which `conv2d` leaves to lax), and
    `conv2d`'s forward equals them whichever form it takes."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(dtype == "float64"):
        for k, channels, hw, strides, padding in PATCH_CASES:
            x = rng.normal(size=(2, *hw, channels)).astype(dtype)
            w = rng.normal(size=(k, k, channels, 6)).astype(dtype)
            out_hw = [(hw[i] + sum(padding[i]) - k) // strides + 1 for i in range(2)]
            torch_out = _torch_conv_vjp(x, w, np.zeros((2, *out_hw, 6), dtype), strides, padding)[0]
            lax_out = jax.lax.conv_general_dilated(x, w, (strides, strides), padding,
                                                   dimension_numbers=layers.NHWC_HWIO)
            for ours in (layers.tap_sum_conv(x, w, (strides, strides), padding),
                         layers.conv2d(x, w, (strides, strides), padding)):
                assert ours.dtype == np.dtype(dtype) and ours.shape == lax_out.shape
                for reference in (lax_out, torch_out):
                    np.testing.assert_allclose(ours, reference, **PATCH_TOLERANCE[dtype])


def test_tap_sum_forward_only_for_few_terms_and_keeps_bfloat16_sums_in_float32():
    """`conv2d`'s forward is a tap sum (no convolution) with at most PATCH_GRAD_MAX_CHANNELS input channels and
    TAP_SUM_MAX_TERMS terms (the 3x3 stems of 3 and 4 channels), and lax's convolution otherwise (a 7x7 stem, 5
    channels, a 1x1 shortcut of 16); in bfloat16 the tap sum is the float32 sum rounded once (half a bfloat16 ulp)."""
    def convs(k, channels):
        x, w = jnp.ones((2, 8, 8, channels)), jnp.ones((k, k, channels, 4))
        return str(jax.make_jaxpr(lambda u: layers.conv2d(u, w, (1, 1), ((1, 1), (1, 1))))(x)).count(
            "conv_general_dilated")

    assert (layers.PATCH_GRAD_MAX_CHANNELS, layers.TAP_SUM_MAX_TERMS) == (4, 36)
    assert [convs(3, 3), convs(3, 4), convs(7, 3), convs(3, 5), convs(1, 16)] == [0, 0, 1, 1, 1]
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 8), jnp.bfloat16)
    ours = layers.conv2d(x, w, (1, 1), ((1, 1), (1, 1)))
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    ref = jax.lax.conv_general_dilated(f32(x), f32(w), (1, 1), ((1, 1), (1, 1)), dimension_numbers=layers.NHWC_HWIO)
    assert ours.dtype == jnp.bfloat16
    _assert_rounded_once_to_bfloat16(ours, ref)
