"""Auto-PGD under L-inf and L2 (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", Algorithm 1), untargeted (APGD-CE) and targeted (APGD-T, DLR).

Written from the paper and checked against the reference implementation (fra31/auto-attack
`autoattack/autopgd_base.py`) for the settings the paper leaves open: step size 2 eps, momentum 0.75 (none on
the first step), checkpoints after 22%, then windows shrinking by 3% of the iterations down to 6%, the
oscillation test "at most rho * window increases in the window" and the no-improvement test
(rho = 0.75), restart from the best point with half the step after a failed checkpoint, the start point
x + eps * u / max|u| with u uniform in [-1, 1], and targets chosen as the k-th largest clean logits.

L2 (`norm="L2"`, the reference's L2 branch): the step follows the gradient normalised to unit L2 norm
(pyautoattack 0.2.0 autopgd_base.py line 337), both projections are the radial one onto the L2 ball then the
box clip (lines 338-344; `engine.project`), the start is x + eps * n / ||n||_2 with n standard normal, clipped
(lines 210-213, 228), and everything else (step size 2 eps, line 293; momentum; checkpoints) is shared.

Everything is per example and batched: one `lax.while_loop`, static shapes, per-example step sizes and
per-example random keys, so an example's result does not depend on the rest of its batch. The loop stops
early once every active example of the batch is misclassified (APGD never un-fools a point: the last
misclassified iterate is kept).
"""

from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mmard_jax import losses
from mmard_jax.attacks import counter_rng
from mmard_jax.attacks.engine import ascent_direction, check_norm, l2_normalize, project

Array = jax.Array
ApplyFn = Callable[[Array], Array]
LossFn = Callable[[Array], Array]  # logits [B, C] -> per-example loss [B], maximized

RHO = 0.75
MOMENTUM = 0.75


def checkpoint_schedule(n_iter: int) -> Tuple[np.ndarray, np.ndarray]:
    """(is_checkpoint bool [n_iter], window int [n_iter]): where APGD tests its step size, and over how many steps.

    The first window is 22% of the iterations; each next one is 3% shorter, never below 6% (each at least 1),
    as in the reference: for 100 iterations the tests fall after iterations 22, 41, 57, 70, 80, 87, 93, 99.
    """
    first, minimum, decrement = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    is_check = np.zeros(n_iter, bool)
    window = np.zeros(n_iter, np.int32)
    k, since = first, 0
    for i in range(n_iter):
        since += 1
        if since == k:
            is_check[i], window[i] = True, k
            since, k = 0, max(k - decrement, minimum)
    return is_check, window


def random_start(keys: Array, x: Array, eps: float, norm: str = "Linf") -> Array:
    """x + eps * u / max|u| (u uniform in [-1, 1] per pixel, hashed from the example's key: counter_rng),
    clipped to [0, 1]; under L2 x + eps * n / (||n||_2 + 1e-12), n standard normal (autopgd_base.py lines 210-213)."""
    if check_norm(norm) == "L2":
        n = counter_rng.normal(keys, counter_rng.APGD_START_L2, x.shape[1:], x.dtype)
        return jnp.clip(x + eps * l2_normalize(n), 0.0, 1.0)
    u = counter_rng.uniform(keys, counter_rng.APGD_START, x.shape[1:], x.dtype, -1.0, 1.0)
    scale = jnp.max(jnp.abs(u).reshape(u.shape[0], -1), axis=1)
    return jnp.clip(x + eps * u / (scale.reshape((-1,) + (1,) * (x.ndim - 1)) + 1e-12), 0.0, 1.0)


def _bcast(v: Array, x: Array) -> Array:
    """Per-example vector [B] shaped to broadcast against x [B, ...]."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _where(cond: Array, a: Array, b: Array) -> Array:
    """Per-example select: cond [B], a and b [B, ...]."""
    return jnp.where(_bcast(cond, a), a, b)


class _State(NamedTuple):
    i: Array
    x_adv: Array  # current iterate
    x_prev: Array  # previous iterate (for the momentum term)
    grad: Array
    x_best: Array  # highest-loss point so far, with its gradient and loss
    grad_best: Array
    loss_best: Array
    x_fooled: Array  # last misclassified iterate
    fooled: Array
    step: Array  # per-example step size
    history: Array  # [n_iter + 1, B] loss at the start point and after every step
    loss_best_at_check: Array
    reduced_at_check: Array


def apgd(
    loss_fn: Callable[[Array], Array],
    apply_fn: ApplyFn,
    x: Array,
    y: Array,
    keys: Array,
    *,
    eps: float,
    n_iter: int = 100,
    rho: float = RHO,
    active: Optional[Array] = None,
    norm: str = "Linf",
) -> Tuple[Array, Array]:
    """Maximizes the per-example `loss_fn(logits)` over the eps-ball (L-inf or L2: `norm`) by APGD; returns
    (x_adv, fooled [B]).

    x_adv is the last misclassified iterate where fooled, else x. `keys` are per-example PRNG keys for
    the start point; `active` (bool [B], default all) marks the examples that keep the loop running
    (padding and already-fooled examples do not).
    """
    x = jax.lax.stop_gradient(x)
    b = x.shape[0]
    active = jnp.ones((b,), bool) if active is None else active
    is_check, window = (jnp.asarray(a) for a in checkpoint_schedule(n_iter))
    steps_idx = jnp.arange(n_iter)[:, None]

    def loss_grad(z):
        def total(z):
            logits = apply_fn(z)
            per_example = loss_fn(logits).astype(jnp.float32)
            return jnp.sum(per_example), (per_example, logits)

        (_, (per_example, logits)), g = jax.value_and_grad(total, has_aux=True)(z)
        return per_example, jnp.argmax(logits, axis=-1) != y, g

    x0 = random_start(keys, x, eps, norm)
    loss0, wrong0, g0 = loss_grad(x0)
    zeros_b = jnp.zeros_like(loss0)
    state = _State(
        i=jnp.zeros((), jnp.int32), x_adv=x0, x_prev=x0, grad=g0, x_best=x0, grad_best=g0, loss_best=loss0,
        x_fooled=x0, fooled=wrong0, step=zeros_b + 2.0 * eps,
        history=jnp.zeros((n_iter + 1,) + loss0.shape, loss0.dtype).at[0].set(loss0),
        loss_best_at_check=loss0, reduced_at_check=zeros_b == 0.0,  # the first test cannot fail for "no improvement"
    )

    def cond(s: _State):
        return (s.i < n_iter) & jnp.any(active & ~s.fooled)

    def body(s: _State) -> _State:
        a = jnp.where(s.i > 0, MOMENTUM, 1.0).astype(x.dtype)
        z = project(s.x_adv + _bcast(s.step, x).astype(x.dtype) * ascent_direction(s.grad, norm), x, eps, norm)
        x_new = project(s.x_adv + a * (z - s.x_adv) + (1 - a) * (s.x_adv - s.x_prev), x, eps, norm)
        loss, wrong, g = loss_grad(x_new)
        history = s.history.at[s.i + 1].set(loss)
        improved = loss > s.loss_best
        x_best = _where(improved, x_new, s.x_best)
        grad_best = _where(improved, g, s.grad_best)
        loss_best = jnp.where(improved, loss, s.loss_best)

        # Checkpoint: count the loss increases over the last `k` steps (Algorithm 1, conditions 1 and 2).
        k = window[s.i]
        in_window = (steps_idx > s.i - k) & (steps_idx <= s.i)
        increases = jnp.sum((history[1:] > history[:-1]) & in_window, axis=0)
        oscillating = increases <= k * rho
        stalled = ~s.reduced_at_check & (s.loss_best_at_check >= loss_best)
        check = is_check[s.i]
        reduce = check & (oscillating | stalled)
        return _State(
            i=s.i + 1,
            x_adv=_where(reduce, x_best, x_new),
            x_prev=s.x_adv,
            grad=_where(reduce, grad_best, g),
            x_best=x_best, grad_best=grad_best, loss_best=loss_best,
            x_fooled=_where(wrong, x_new, s.x_fooled),
            fooled=s.fooled | wrong,
            step=jnp.where(reduce, s.step / 2, s.step),
            history=history,
            loss_best_at_check=jnp.where(check, loss_best, s.loss_best_at_check),
            reduced_at_check=jnp.where(check, oscillating | stalled, s.reduced_at_check),
        )

    final = jax.lax.while_loop(cond, body, state)
    x_adv = _where(final.fooled, final.x_fooled, x)
    return jax.lax.stop_gradient(x_adv), final.fooled


def target_classes(logits: Array, rank: Array) -> Array:
    """The class with the `rank`-th largest logit per example (rank 2 = the best wrong class of a correct point)."""
    order = jnp.argsort(logits, axis=-1)
    return jnp.take(order, logits.shape[-1] - rank, axis=-1)


def apgd_ce(apply_fn: ApplyFn, x: Array, y: Array, keys: Array, *, eps: float, n_iter: int = 100,
            rho: float = RHO, active: Optional[Array] = None, norm: str = "Linf") -> Tuple[Array, Array]:
    """APGD on the cross-entropy loss."""
    return apgd(lambda logits: losses.cross_entropy(logits, y), apply_fn, x, y, keys,
                eps=eps, n_iter=n_iter, rho=rho, active=active, norm=norm)


def apgd_targeted(apply_fn: ApplyFn, x: Array, y: Array, keys: Array, rank: Array, *, eps: float,
                  n_iter: int = 100, rho: float = RHO, active: Optional[Array] = None,
                  norm: str = "Linf") -> Tuple[Array, Array]:
    """APGD on the targeted DLR loss towards the class of the `rank`-th largest clean logit (rank 2..C)."""
    target = target_classes(apply_fn(x), rank)
    return apgd(lambda logits: losses.dlr_loss_targeted(logits, y, target), apply_fn, x, y, keys,
                eps=eps, n_iter=n_iter, rho=rho, active=active, norm=norm)


def apgd_ce_or_targeted(apply_fn: ApplyFn, x: Array, y: Array, keys: Array, rank: Array, *, eps: float,
                        n_iter: int = 100, rho: float = RHO, active: Optional[Array] = None,
                        norm: str = "Linf") -> Tuple[Array, Array]:
    """APGD-CE where `rank` (traced int) is 0, APGD-T towards the `rank`-th largest clean logit elsewhere: one
    compiled program for both components (each compilation costs seconds on a CPU). The per-example loss is
    a select between the two, so each example follows exactly the loss of its component."""
    logits_x = apply_fn(x)
    if logits_x.shape[-1] < 4:  # the targeted DLR loss needs 4 classes: only APGD-CE can run (autoattack.num_runs)
        return apgd_ce(apply_fn, x, y, keys, eps=eps, n_iter=n_iter, rho=rho, active=active, norm=norm)
    target = target_classes(logits_x, jnp.maximum(rank, 2))

    def loss_fn(logits):
        ce = losses.cross_entropy(logits, y).astype(jnp.float32)
        dlr = losses.dlr_loss_targeted(logits, y, target).astype(jnp.float32)
        return jnp.where(rank == 0, ce, dlr)

    return apgd(loss_fn, apply_fn, x, y, keys, eps=eps, n_iter=n_iter, rho=rho, active=active, norm=norm)

