"""Loss functions of adversarial robustness distillation, as small pure functions of logits.

Public API: users import these into their own loops. Every function takes float logits [B, C] and
integer labels [B]; all but `trd_loss` return one value per example so the caller chooses the
reduction (training objectives average over the batch, attacks sum so each example keeps its own
gradient scale). Nothing here stops gradients except where a docstring says so: in the inner
maximization MMARD differentiates KL(S(x'), T(x')) through the teacher as well.
"""

from typing import Optional

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


def _check(logits: Array, labels: Optional[Array] = None, *others: Array) -> None:
    """Shape/dtype contract of the public losses (checked at trace time): logits [B, C] floats, labels [B] ints,
    other logits of the same shape."""
    chex.assert_rank(logits, 2)
    chex.assert_type(logits, float)
    if others:
        chex.assert_equal_shape((logits,) + others)
    if labels is not None:
        chex.assert_shape(labels, logits.shape[:1])
        chex.assert_type(labels, int)


def _upcast(x: Array) -> Array:
    """Computes losses in at least float32 (bf16 logits are upcast; float64 stays float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example cross-entropy -log softmax(logits)[y], shape [B]."""
    _check(logits, labels)
    logp = jax.nn.log_softmax(_upcast(logits), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def kl_div(student_logits: Array, teacher_logits: Array, temperature: float = 1.0) -> Array:
    """Per-example KL(softmax(t/T) || softmax(s/T)) summed over classes, shape [B]; the paper's KL(S, T).

    Equals PyTorch's `KLDivLoss(reduction='none')(log_softmax(s/T), softmax(t/T)).sum(1)`. Both
    sides stay differentiable; wrap the teacher in `jax.lax.stop_gradient` where it must be constant.
    """
    _check(student_logits, None, teacher_logits)
    log_ps = jax.nn.log_softmax(_upcast(student_logits) / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(_upcast(teacher_logits) / temperature, axis=-1)
    # log_softmax is finite for finite logits, so p_t = 0 (underflow) contributes exactly 0.
    return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def _unit_residual_probs(logits: Array, labels: Array) -> Array:
    """Unit vector of (softmax(z) - onehot(y)), computed without cancellation.

    p - onehot(y) = (1 - p_y) * (r, -1 at y), where r is the softmax over the wrong classes only, so
    the direction depends on the wrong-class logits alone and never divides by a vanishing norm
    (it stays defined when the model is saturated and p_y rounds to 1 in float32).
    """
    z = _upcast(logits)
    onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    r = jax.nn.softmax(jnp.where(onehot > 0, -jnp.inf, z), axis=-1)  # 0 at y
    d = r - onehot
    return d / jnp.sqrt(jnp.sum(r * r, axis=-1, keepdims=True) + 1.0)


def _unit_residual_logits(logits: Array, labels: Array, eps: float) -> Array:
    """Unit vector of (z - onehot(y)) on raw logits, the norm guarded by eps (an ablation option)."""
    z = _upcast(logits)
    d = z - jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    return d / jnp.sqrt(jnp.sum(d * d, axis=-1, keepdims=True) + eps * eps)


def triangular_cos(
    nat_logits: Array,
    adv_logits: Array,
    labels: Array,
    *,
    use_probs: bool = True,
    eps: float = 1e-8,
) -> Array:
    """Per-example psi of Eq. 5: cosine of the angle at y between p(x) - y and p(x') - y, shape [B].

    `use_probs=False` uses raw logits instead of probabilities (the paper does not publish code;
    probabilities are our default, docs/design.md, "MMARD's unpublished choices").
    """
    _check(nat_logits, labels, adv_logits)
    if use_probs:
        e1 = _unit_residual_probs(nat_logits, labels)
        e2 = _unit_residual_probs(adv_logits, labels)
    else:
        e1 = _unit_residual_logits(nat_logits, labels, eps)
        e2 = _unit_residual_logits(adv_logits, labels, eps)
    return jnp.sum(e1 * e2, axis=-1)


def huber(residual: Array, delta: float = 1.0) -> Array:
    """Elementwise Huber loss l_delta (delta=1 is PyTorch's smooth-L1 with beta=1)."""
    a = jnp.abs(residual)
    return jnp.where(a <= delta, 0.5 * residual * residual, delta * (a - 0.5 * delta))


def trd_loss(
    s_nat: Array,
    s_adv: Array,
    t_nat: Array,
    t_adv: Array,
    labels: Array,
    delta: float = 1.0,
    *,
    use_probs: bool = True,
    reduction: str = "mean",
) -> Array:
    """Triangular relationship distillation loss (Eq. 6): reduce_b Huber_delta(psi_s - psi_t), a scalar.

    The teacher side psi_t is a constant (stop_gradient). `reduction` is 'mean' (our default) or
    'sum' (Eq. 6 read literally).
    """
    psi_s = triangular_cos(s_nat, s_adv, labels, use_probs=use_probs)
    psi_t = jax.lax.stop_gradient(triangular_cos(t_nat, t_adv, labels, use_probs=use_probs))
    per_example = huber(psi_s - psi_t, delta)
    if reduction == "mean":
        return jnp.mean(per_example)
    if reduction == "sum":
        return jnp.sum(per_example)
    raise ValueError(f"trd_loss: reduction must be 'mean' or 'sum', got {reduction!r}")


def _true_and_best_other(logits: Array, labels: Array) -> tuple[Array, Array]:
    """(z_y, max_{j != y} z_j) per example."""
    z = _upcast(logits)
    onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
    z_y = jnp.sum(jnp.where(onehot, z, 0.0), axis=-1)
    z_other = jnp.max(jnp.where(onehot, -jnp.inf, z), axis=-1)
    return z_y, z_other


def margin(logits: Array, labels: Array) -> Array:
    """Per-example z_y - max_{j!=y} z_j, positive while correctly classified (Square's objective, CW's uncapped)."""
    _check(logits, labels)
    z_y, z_other = _true_and_best_other(logits, labels)
    return z_y - z_other


def cw_margin(logits: Array, labels: Array, kappa: float = 50.0) -> Array:
    """Per-example CW margin max(z_y - max_{j!=y} z_j, -kappa); CW_inf attacks minimize it."""
    return jnp.maximum(margin(logits, labels), -kappa)


def dlr_loss(logits: Array, labels: Array) -> Array:
    """Per-example untargeted DLR loss of Croce & Hein (2020), maximized by APGD-DLR.

    -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3 + 1e-12), with z sorted in decreasing order.
    """
    z = _upcast(logits)
    z_sorted = jnp.sort(z, axis=-1)
    z_y, z_other = _true_and_best_other(z, labels)
    return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_loss_targeted(logits: Array, labels: Array, target: Array) -> Array:
    """Per-example targeted DLR loss: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12) (needs C >= 4)."""
    z = _upcast(logits)
    z_sorted = jnp.sort(z, axis=-1)
    z_y = jnp.take_along_axis(z, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    z_t = jnp.take_along_axis(z, target[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def reduce_kl(per_example: Array, num_classes: int, class_mean: bool) -> Array:
    """Batch mean of a per-example KL, optionally also divided by C.

    `class_mean=True` reproduces `torch.mean` over [B, C] / `nn.KLDivLoss()`'s default 'mean', which
    the published ARD, RSLAD and MTARD code use (docs/design.md, "Notation").
    """
    value = jnp.mean(per_example)
    return value / num_classes if class_mean else value


def accuracy(logits: Array, labels: Array, mask: Optional[Array] = None) -> Array:
    """Per-example correctness (float 0/1), zeroed where `mask` is False."""
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return correct if mask is None else correct * mask.astype(jnp.float32)
