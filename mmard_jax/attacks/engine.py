"""The one projected-gradient engine: signed-gradient ascent on any scalar objective of x under L-inf.

Training's inner maximization and the evaluation attacks (FGSM, PGD, CW) all run through `pgd`.
The objective is a function of the input alone (model parameters are closed over), so `jax.grad`
computes input gradients only: no weight-gradient convolutions inside the loop.
"""

from typing import Any, Callable, Optional, Union

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

INITS = ("none", "uniform", "gaussian")


def project(x_adv: Array, x: Array, eps: float) -> Array:
    """Projects onto the L-inf ball of radius eps around x, then clips to the image box [0, 1]."""
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def initial_point(
    rng: Optional[Array], x: Array, eps: float, init: str, gaussian_scale: float = 1e-3
) -> Array:
    """Start of the ascent: x itself, uniform in the eps-ball, or x + gaussian_scale * N(0, 1), projected.

    `rng` is one key for the batch or one key per example (shape [B]); per-example keys make the
    start independent of how the batch is split over devices. The published TRADES/RSLAD/ARD code
    does not clip the start; we project it so every iterate is a feasible point (the difference is
    at most one 0.001-size nudge before the first step).
    """
    if init == "none":
        return x
    if init not in INITS:
        raise ValueError(f"pgd: init must be one of {INITS}, got {init!r}")
    if rng is None:
        raise ValueError(f"pgd: init={init!r} needs an rng key")

    def draw(key, shape):
        if init == "uniform":
            return jax.random.uniform(key, shape, x.dtype, -eps, eps)
        return gaussian_scale * jax.random.normal(key, shape, x.dtype)

    if rng.shape == ():
        noise = draw(rng, x.shape)
    elif rng.shape == x.shape[:1]:
        noise = jax.vmap(lambda k: draw(k, x.shape[1:]))(rng)
    else:
        raise ValueError(f"pgd: rng must be one key or one key per example, got key shape {rng.shape} for x {x.shape}")
    return project(x + noise, x, eps)


def pgd(
    objective: Callable,
    x: Array,
    *,
    eps: float,
    step_size: float,
    steps: int,
    init: str = "none",
    rng: Optional[Array] = None,
    gaussian_scale: float = 1e-3,
    unroll: Union[int, bool] = 1,
    carry: Any = None,
):
    """Maximizes `objective(x')` over the L-inf eps-ball around x (and [0,1]) by `steps` signed steps.

    `objective` maps a batch [B, ...] to a scalar; sum per-example losses so each example keeps its own
    gradient sign. With `carry` given, `objective(x', carry) -> (scalar, new_carry)` threads state through
    the iterates (the student's BatchNorm statistics when it attacks in train mode) and `pgd` returns
    (x', final carry). Runs in `lax.fori_loop` (`unroll` is passed through: a measured setting, see
    BENCHMARKS.md). x' comes back with gradients stopped.
    """
    chex.assert_type(x, float)
    x = jax.lax.stop_gradient(x)
    threaded = carry is not None
    grad_fn = jax.grad(objective if threaded else (lambda z, c: (objective(z), c)), has_aux=True)

    def body(_, state):
        x_adv, c = state
        g, c = grad_fn(x_adv, c)
        return project(x_adv + step_size * jnp.sign(g).astype(x_adv.dtype), x, eps), c

    x0 = initial_point(rng, x, eps, init, gaussian_scale)
    state = (x0, carry if threaded else ())
    x_adv, carry = jax.lax.fori_loop(0, steps, body, state, unroll=unroll) if steps > 0 else state
    x_adv = jax.lax.stop_gradient(x_adv)
    return (x_adv, carry) if threaded else x_adv
