"""The one projected-gradient engine: gradient ascent on any scalar objective of x under L-inf or L2.

Training's inner maximization and the evaluation attacks (FGSM, PGD, CW) all run through `pgd`.
The objective is a function of the input alone (model parameters are closed over), so `jax.grad`
computes input gradients only: no weight-gradient convolutions inside the loop.

Under L-inf a step moves every pixel by step_size along the gradient's sign; under L2 (Madry et al. 2018;
the `robustness` library's L2Step) it moves by step_size along the gradient normalised per example to unit
L2 norm. Either way the iterate is projected onto the eps-ball around x, then onto the image box [0, 1].
"""

from typing import Any, Callable, Optional, Union

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

INITS = ("none", "uniform", "gaussian")
NORMS = ("Linf", "L2")
# Added to a per-example norm before dividing by it: pyautoattack 0.2.0 autopgd_base.py line 188 (`normalize`).
NORM_FLOOR = 1e-12


def check_norm(norm: str) -> str:
    """The threat model's name, validated: one of NORMS (AutoAttack's spelling, 'Linf' or 'L2')."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def l2_norm(v: Array) -> Array:
    """Per-example L2 norm [B] of a batch [B, ...], computed in float32."""
    return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)).reshape(v.shape[0], -1), axis=1))


def per_example(v: Array, x: Array) -> Array:
    """A per-example vector [B] shaped to broadcast against x [B, ...], in x's dtype."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def l2_normalize(v: Array) -> Array:
    """v / (||v||_2 + 1e-12) per example: the unit direction of a gradient or a perturbation (APGD's `normalize`,
    pyautoattack 0.2.0 autopgd_base.py lines 180-188)."""
    return v / per_example(l2_norm(v) + NORM_FLOOR, v)


def project(x_adv: Array, x: Array, eps: float, norm: str = "Linf") -> Array:
    """Projects onto the eps-ball around x (L-inf or L2), then clips to the image box [0, 1].

    L2: x + d / (||d|| + 1e-12) * min(eps, ||d||) with d = x_adv - x, the original's APGD projection
    (pyautoattack 0.2.0 autopgd_base.py lines 338-340); the box clip only shortens d.
    """
    if norm == "Linf":
        return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)
    check_norm(norm)
    d = x_adv - x
    radius = jnp.minimum(l2_norm(d), eps)
    return jnp.clip(x + l2_normalize(d) * per_example(radius, x), 0.0, 1.0)


def ascent_direction(g: Array, norm: str) -> Array:
    """The steepest-ascent direction of unit norm: sign(g) under L-inf, g / ||g||_2 per example under L2."""
    return jnp.sign(g) if check_norm(norm) == "Linf" else l2_normalize(g)


def uniform_l2_ball(key: Array, shape, eps: float, dtype) -> Array:
    """One point uniform in the L2 ball of radius eps in R^shape: a gaussian direction, radius eps * U^(1/D)."""
    direction_key, radius_key = jax.random.split(key)
    z = jax.random.normal(direction_key, shape, dtype)
    radius = eps * jax.random.uniform(radius_key, (), dtype) ** (1.0 / z.size)
    return z * (radius / (jnp.sqrt(jnp.sum(jnp.square(z))) + NORM_FLOOR))


def initial_point(
    rng: Optional[Array], x: Array, eps: float, init: str, gaussian_scale: float = 1e-3, norm: str = "Linf"
) -> Array:
    """Start of the ascent: x itself, uniform in the eps-ball (L-inf or L2), or x + gaussian_scale * N(0, 1),
    projected.

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

    l2_ball = init == "uniform" and check_norm(norm) == "L2"
    if l2_ball and rng.shape == ():
        rng = jax.random.split(rng, x.shape[0])  # the L2 ball is per example: one draw each

    def draw(key, shape):
        if l2_ball:
            return uniform_l2_ball(key, shape, eps, x.dtype)
        if init == "uniform":
            return jax.random.uniform(key, shape, x.dtype, -eps, eps)
        return gaussian_scale * jax.random.normal(key, shape, x.dtype)

    if rng.shape == ():
        noise = draw(rng, x.shape)
    elif rng.shape == x.shape[:1]:
        noise = jax.vmap(lambda k: draw(k, x.shape[1:]))(rng)
    else:
        raise ValueError(f"pgd: rng must be one key or one key per example, got key shape {rng.shape} for x {x.shape}")
    return project(x + noise, x, eps, norm)


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
    norm: str = "Linf",
):
    """Maximizes `objective(x')` over the eps-ball around x (and [0,1]) by `steps` steps of size step_size:
    signed under `norm="Linf"`, along the L2-normalised gradient under `norm="L2"` (`ascent_direction`).

    `objective` maps a batch [B, ...] to a scalar; sum per-example losses so each example keeps its own
    gradient sign. With `carry` given, `objective(x', carry) -> (scalar, new_carry)` threads state through
    the iterates (the student's BatchNorm statistics when it attacks in train mode) and `pgd` returns
    (x', final carry). Runs in `lax.fori_loop` (`unroll` is passed through: a measured setting, see
    BENCHMARKS.md). x' comes back with gradients stopped.
    """
    chex.assert_type(x, float)
    check_norm(norm)
    x = jax.lax.stop_gradient(x)
    threaded = carry is not None
    grad_fn = jax.grad(objective if threaded else (lambda z, c: (objective(z), c)), has_aux=True)

    def body(_, state):
        x_adv, c = state
        g, c = grad_fn(x_adv, c)
        return project(x_adv + step_size * ascent_direction(g, norm).astype(x_adv.dtype), x, eps, norm), c

    x0 = initial_point(rng, x, eps, init, gaussian_scale, norm)
    state = (x0, carry if threaded else ())
    x_adv, carry = jax.lax.fori_loop(0, steps, body, state, unroll=unroll) if steps > 0 else state
    x_adv = jax.lax.stop_gradient(x_adv)
    return (x_adv, carry) if threaded else x_adv
