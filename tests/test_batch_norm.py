"""The zoo's BatchNorm (`layers.BatchNorm`): its hand-written train-mode VJP against flax's `nn.BatchNorm`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from mmard_jax import parallel
from mmard_jax.models import layers

SHAPE = (4, 3, 5, 6)  # per device: N, H, W, C


def _flax_bn(dtype, axis_name):
    return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                        axis_name=axis_name)


def _value_and_grads(module, variables, x, w, a, b):
    """(y, new batch_stats, d/dx, d/dparams) of sum(y * w) + sum(a * mean' + b * var'): the output's and the running
    statistics' cotangents both reach the VJP."""

    def loss(x, params):
        y, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])
        stats = upd["batch_stats"]
        return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(a * stats["mean"] + b * stats["var"]), (y, stats)

    (_, (y, stats)), (gx, gp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, variables["params"])
    return y, stats, gx, gp


def _inputs(dtype, devices):
    keys = jax.random.split(jax.random.key(7), 6)
    shape = (SHAPE[0] * devices,) + SHAPE[1:]
    # A shifted, channel-scaled input (statistics far from 0 and 1) and one constant channel (variance exactly 0).
    x = 3.0 + jax.random.normal(keys[0], shape) * jnp.linspace(0.5, 2.0, SHAPE[-1])
    x = x.at[..., 0].set(1.5).astype(dtype)
    params = {"scale": 1.0 + 0.3 * jax.random.normal(keys[1], SHAPE[-1:]),
              "bias": jax.random.normal(keys[2], SHAPE[-1:])}
    stats = {"mean": jnp.full(SHAPE[-1:], 0.2), "var": jnp.full(SHAPE[-1:], 1.3)}
    w = jax.random.normal(keys[3], shape)
    a, b = jax.random.normal(keys[4], SHAPE[-1:]), jax.random.normal(keys[5], SHAPE[-1:])
    return x, {"params": params, "batch_stats": stats}, w, a, b


def _close(got, want, dtype):
    """`got` equals `want` to `dtype`'s rounding, relative to each channel's largest value (the constant channel's
    input gradient is ~300 times the others')."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5  # bfloat16: one ulp is 0.4%; flax's dx adds two rounded parts
    scale = np.maximum(1.0, np.abs(want).max(axis=tuple(range(want.ndim - 1)), keepdims=True))
    np.testing.assert_array_less(np.abs(got - want), np.broadcast_to(tol * scale, want.shape))


@pytest.mark.parametrize("dtype,devices", [(jnp.float32, 1), (jnp.float32, 2), (jnp.bfloat16, 2)])
def test_custom_train_mode_matches_flax(dtype, devices):
    """Values, new batch_stats and input/scale/bias gradients equal flax's, in float32 and bfloat16, on one device
    and inside shard_map over 2 devices averaging the statistics over the axis; the variables are flax's."""
    axis = "data" if devices > 1 else None
    ours = layers.batch_norm_factory(True, dtype, axis, bn_grad="custom")()
    ref = _flax_bn(dtype, axis)
    x, variables, w, a, b = _inputs(dtype, devices)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, ref.init(
        jax.random.key(0), x))
    runs = []
    for module in (ours, ref):
        fn = functools.partial(_value_and_grads, module)
        if devices > 1:
            mesh = parallel.data_mesh(jax.devices()[:devices])
            fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data"), P("data"), P(), P()),
                               out_specs=(P("data"), P(), P("data"), P()))
            x, w = parallel.put_batch(x, mesh), parallel.put_batch(w, mesh)
            variables, a, b = parallel.put_replicated((variables, a, b), mesh)
        runs.append(jax.jit(fn)(variables, x, w, a, b))
    (y, stats, gx, gp), (y_ref, stats_ref, gx_ref, gp_ref) = runs
    assert y.dtype == y_ref.dtype == dtype and gx.dtype == gx_ref.dtype == dtype
    _close(y, y_ref, dtype)  # flax's operations, but the global mean as the psum of the sums: to rounding
    _close(gx, gx_ref, dtype)
    for tree, tree_ref in ((stats, stats_ref), (gp, gp_ref)):
        for k in tree_ref:
            _close(tree[k], tree_ref[k], jnp.float32)
    assert float(jnp.abs(gx.astype(jnp.float32)).max()) > 0.1  # the gradient check is not vacuous


def test_zoo_uses_it_and_the_switch_resolves(monkeypatch):
    """Every zoo BatchNorm is `layers.BatchNorm` (still an `nn.BatchNorm`); 'auto' is custom on the CPU only; the
    environment switch is read and checked; only 'custom' in train mode runs the hand-written VJP."""
    norm = layers.batch_norm_factory(True, jnp.float32, None)()
    assert isinstance(norm, layers.BatchNorm) and isinstance(norm, nn.BatchNorm) and norm.grad == "auto"
    assert layers.resolve_bn_grad("auto", "cpu") == "custom" and layers.resolve_bn_grad("auto", "gpu") == "flax"
    assert layers.resolve_bn_grad("flax", "cpu") == "flax"
    monkeypatch.setenv(layers.BN_GRAD_ENV, "flax")
    assert layers.batch_norm_factory(True, jnp.float32, None)().grad == "flax"
    x = jnp.ones((2, 3, 3, 4))
    for mode, train, hand_written in (("custom", True, True), ("flax", True, False), ("custom", False, False)):
        bn = layers.batch_norm_factory(train, jnp.float32, None, bn_grad=mode)()
        variables = bn.init(jax.random.key(0), x)
        jaxpr = str(jax.make_jaxpr(lambda v: bn.apply(v, x, mutable=["batch_stats"]))(variables))
        assert ("custom_vjp_call" in jaxpr) == hand_written, (mode, train)
    monkeypatch.setenv(layers.BN_GRAD_ENV, "fast")
    with pytest.raises(ValueError, match="MMARD_JAX_BN_GRAD must be one of auto, custom, flax"):
        layers.default_bn_grad()
