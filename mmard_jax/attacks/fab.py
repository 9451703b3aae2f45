"""FAB-T under L-inf and L2: the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020, "Minimally
distorted adversarial examples with a fast adaptive boundary attack"), as AutoAttack runs it.

Each step linearizes the decision boundary between the true class y and the target t at the current
iterate, projects both the iterate and the original point onto that hyperplane (intersected with the
image box) with the smallest L-inf step, and moves to a convex combination of the two projections,
extrapolated by eta, with a weight alpha = min(|d1| / (|d1| + |d2|), alpha_max) that favours staying close to
the original point. When an iterate is misclassified it is kept if it is the closest so far and pulled back
towards the original point by beta. AutoAttack's settings (fra31/auto-attack `fab_base.py`, `autoattack.py`):
100 iterations, alpha_max 0.1, eta 1.05, beta 0.9, no random start in the targeted 'standard' run, targets
the 2nd..10th largest clean logits, success only when the closest adversarial point is within eps.

The L-inf projection onto {z : <w, z> = b, 0 <= z <= 1} is our own: a bisection on the common radius
followed by an exact solve on the linear piece it finds (the reference sorts and bisects over indices;
XLA's sort is slow on CPU); it is checked against a linear program in tests/test_autoattack.py.

L2 (`norm="L2"`, the reference's L2 branch): the projections are the smallest-L2 steps onto the same set
(`project_l2_box`, the counterpart of pyautoattack 0.2.0 fab_projections.py `projection_l2`, lines 62-114; a
bisection again instead of its sort, checked against it in tests/test_autoattack_original_l2.py), and every
distance (the weight alpha, fab_base.py lines 210-212; the closest adversarial point, lines 236-238; the
final test against eps, lines 315-319) is the L2 norm.
"""

from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from mmard_jax.attacks.engine import check_norm, l2_norm

Array = jax.Array
ApplyFn = Callable[[Array], Array]

ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9
NO_ADVERSARIAL = 1e10  # distance recorded while no adversarial point was found


def project_linf_box(t: Array, w: Array, b: Array, bisection_steps: int = 32) -> Array:
    """Smallest-L-inf step d with <w, t + d> = b and t + d in [0, 1], per row of t, w [B, D], b [B].

    Moving coordinate i towards the hyperplane by m_i (at most its room to the box side, cap_i) changes
    <w, t> by |w_i| m_i; with a common radius lam, g(lam) = sum_i |w_i| min(lam, cap_i) is continuous,
    piecewise linear and nondecreasing, and the answer is the smallest lam with g(lam) = |<w, t> - b|.
    Bisection brackets lam (no sort: XLA's sort is slow on CPU), then lam is solved exactly on the linear
    piece the bracket identifies. Where even the whole box cannot reach the hyperplane, every coordinate
    moves to its box side (as the reference does).
    """
    residual = jnp.sum(w * t, axis=1) - b
    side = jnp.where(residual >= 0, 1.0, -1.0).astype(t.dtype)
    direction = -side[:, None] * jnp.sign(w)  # +1: increase the pixel, -1: decrease, 0: w_i = 0
    cap = jnp.where(direction > 0, 1.0 - t, t) * (direction != 0)
    need = jnp.abs(residual)
    aw = jnp.abs(w)

    def reach(lam):
        return jnp.sum(aw * jnp.minimum(lam[:, None], cap), axis=1)

    hi = jnp.max(cap, axis=1)
    feasible = reach(hi) >= need

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        below = reach(mid) < need
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, bisection_steps, bisect, (jnp.zeros_like(hi), hi))
    # On the piece above lo: g(lam) = sum_{cap <= lo} |w| cap + lam * sum_{cap > lo} |w|.
    saturated = cap <= lo[:, None]
    fixed = jnp.sum(jnp.where(saturated, aw * cap, 0.0), axis=1)
    slope = jnp.sum(jnp.where(saturated, 0.0, aw), axis=1)
    lam = jnp.clip((need - fixed) / jnp.where(slope > 0, slope, 1.0), lo, hi)
    lam = jnp.where(feasible, lam, jnp.inf)
    return direction * jnp.minimum(lam[:, None], cap)


# Coordinates whose hyperplane weight is at most this do not move in the L2 projection: fab_projections.py line 114.
TINY_WEIGHT = 1e-8


def project_l2_box(t: Array, w: Array, b: Array, bisection_steps: int = 32) -> Array:
    """Smallest-L2 step d with <w, t + d> = b and t + d in [0, 1], per row of t, w [B, D], b [B].

    The minimiser moves coordinate i by alpha |w_i| towards the hyperplane, capped at its room to the box side
    (cap_i): g(alpha) = sum_i |w_i| min(alpha |w_i|, cap_i) is continuous, piecewise linear and nondecreasing,
    with breakpoints cap_i / |w_i|, and the answer is the smallest alpha with g(alpha) = |<w, t> - b|. alpha
    lies between need / ||w||^2 (no coordinate capped) and the largest breakpoint; a bisection on the
    geometric mean brackets it to float precision over that wide range (no sort, as in `project_linf_box`),
    then alpha is solved exactly on the linear piece the bracket identifies. Where even the whole box cannot
    reach the hyperplane, every coordinate moves to its box side; coordinates with |w_i| <= 1e-8 stay (both as
    the reference does: fab_projections.py lines 87, 114).
    """
    residual = jnp.sum(w * t, axis=1) - b
    side = jnp.where(residual >= 0, 1.0, -1.0).astype(t.dtype)
    moves = jnp.abs(w) > TINY_WEIGHT
    direction = -side[:, None] * jnp.sign(w) * moves
    cap = jnp.where(direction > 0, 1.0 - t, t) * moves
    need = jnp.abs(residual)
    aw = jnp.abs(w) * moves

    def reach(alpha):
        return jnp.sum(aw * jnp.minimum(alpha[:, None] * aw, cap), axis=1)

    knee = jnp.where(moves, cap / jnp.where(moves, aw, 1.0), 0.0)
    hi = jnp.max(knee, axis=1)
    feasible = reach(hi) >= need
    lo = jnp.minimum(need / jnp.maximum(jnp.sum(aw * aw, axis=1), jnp.finfo(t.dtype).tiny), hi)

    def bisect(_, bracket):
        lo, hi = bracket
        mid = jnp.sqrt(lo) * jnp.sqrt(hi)
        below = reach(mid) < need
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, bisection_steps, bisect, (lo, hi))
    # On the piece above lo: g(alpha) = sum_{knee <= lo} |w| cap + alpha * sum_{knee > lo} w^2 (knee: breakpoint).
    saturated = knee <= lo[:, None]
    fixed = jnp.sum(jnp.where(saturated, aw * cap, 0.0), axis=1)
    slope = jnp.sum(jnp.where(saturated, 0.0, aw * aw), axis=1)
    alpha = jnp.clip((need - fixed) / jnp.where(slope > 0, slope, 1.0), lo, hi)
    step = jnp.where(feasible[:, None], jnp.minimum(alpha[:, None] * aw, cap), cap)
    return direction * step


def _linf(v: Array) -> Array:
    """Per-example L-inf norm of [B, ...]."""
    return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), axis=1)


DISTANCES = {"Linf": _linf, "L2": l2_norm}
PROJECTIONS = {"Linf": project_linf_box, "L2": project_l2_box}


class _State(NamedTuple):
    i: Array
    x1: Array  # current iterate
    adv: Array  # closest adversarial point so far
    dist: Array  # its distance (L-inf or L2; NO_ADVERSARIAL until one is found)


def fab_targeted(
    apply_fn: ApplyFn,
    x: Array,
    y: Array,
    target: Array,
    *,
    eps: float,
    n_iter: int = 100,
    alpha_max: float = ALPHA_MAX,
    eta: float = ETA,
    beta: float = BETA,
    active: Optional[Array] = None,
    norm: str = "Linf",
) -> Tuple[Array, Array]:
    """FAB towards `target` [B] from x (no random start) under `norm`; returns (x_adv, fooled [B]).

    fooled: a misclassified point within eps was found; x_adv is the closest one found (x elsewhere).
    The loop stops early once every active example has one within eps (later steps only shrink it).
    """
    x = jax.lax.stop_gradient(x)
    b = x.shape[0]
    active = jnp.ones((b,), bool) if active is None else active
    x0 = x.reshape(b, -1)
    rows = jnp.arange(b)
    distance, projection = DISTANCES[check_norm(norm)], PROJECTIONS[norm]

    def diff_and_grad(z):
        def total(z):
            logits = apply_fn(z).astype(jnp.float32)
            diff = logits[rows, target] - logits[rows, y]
            return jnp.sum(diff), diff

        (_, diff), g = jax.value_and_grad(total, has_aux=True)(z)
        return diff, g.reshape(b, -1)

    def cond(s: _State):
        return (s.i < n_iter) & jnp.any(active & (s.dist > eps))

    def body(s: _State) -> _State:
        x1 = s.x1.reshape(b, -1)
        diff, w = diff_and_grad(s.x1)
        # Linearized boundary: diff + <w, z - x1> = 0, i.e. <w, z> = <w, x1> - diff.
        hb = jnp.sum(w * x1, axis=1) - diff
        # Both projections in one call (one compiled bisection; rows are independent), as the reference does
        # (pyautoattack/fab_base.py lines 191-199: `projection_linf(torch.cat((x1, x0), 0), ...)`).
        d1, d2 = jnp.split(projection(jnp.concatenate([x1, x0]), jnp.concatenate([w, w]),
                                      jnp.concatenate([hb, hb])), 2)
        a1 = jnp.maximum(distance(d1), 1e-8)
        a2 = jnp.maximum(distance(d2), 1e-8)
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        x_new = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0).reshape(x.shape)
        is_adv = jnp.argmax(apply_fn(x_new), axis=-1) != y
        dist = distance(x_new - x)
        closer = is_adv & (dist < s.dist)
        adv = jnp.where(closer.reshape((-1,) + (1,) * (x.ndim - 1)), x_new, s.adv)
        x_next = jnp.where(is_adv.reshape((-1,) + (1,) * (x.ndim - 1)), x + (x_new - x) * beta, x_new)
        return _State(s.i + 1, x_next, adv, jnp.where(closer, dist, s.dist))

    dist0 = jnp.zeros((b,), jnp.float32) + NO_ADVERSARIAL
    final = jax.lax.while_loop(cond, body, _State(jnp.zeros((), jnp.int32), x, x, dist0))
    fooled = final.dist <= eps
    x_adv = jnp.where(fooled.reshape((-1,) + (1,) * (x.ndim - 1)), final.adv, x)
    return jax.lax.stop_gradient(x_adv), fooled
