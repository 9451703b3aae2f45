"""DGAD (ECCV 2024, dynamic guidance adversarial distillation) as the row `dgad`: AdaAD's attack; the batch split by
the teacher's clean mistakes (those examples distil at x, the rest at x'), the teacher's wrong predictions corrected
by swapping logits, and a consistency term between S(x) and S(x') (kunsaram01/DGAD @a0329c8, `main.py`,
`AT_helper.py`; `main_tiny.py` is the same step for Tiny-ImageNet).

Script facts (main.py, `--method DGAD`, :390-447; docs/design.md, "dgad"):
- Attack: `adaad_inner_loss` (main.py:391-392, AT_helper.py:8-48), AdaAD's: sum KL(S(x'), T(x')) through both
  networks, both in eval mode, start x + 0.001 N(0, 1), eps 8/255, step 2/255, 10 steps (main.py:55-57, /255 at
  :391-392).
- Forwards: S(x) then S(x') in train mode (:397-398); T(x) and T(x') in eval mode, no gradient (:403-406).
- Split (MAP): Lambda_i = 1 where argmax T(x)_i != y_i, n = sum Lambda (:409-413).
- Swap (ELS) on T(x): where Lambda_i, the logit of y and the largest logit trade places (:416-419). On T(x'): where
  T(x')_y < max_{c != y} T(x')_c (the teacher wrong at x'), the logit of y and the largest other trade places
  (:422-427), on every example (only those with Lambda_i = 0 reach the loss).
- Loss: clean = sum_i Lambda_i KL_i(S(x), T~(x)) / (n + 1e-10) (:429-431); adv = sum_i (1 - Lambda_i) KL_i(S(x'),
  T~(x')) / (B - n) (:433-434); PCR = mean_{B,C} (softmax S(x') - softmax S(x))^2 (:437, nn.MSELoss(), both sides
  differentiated); loss = n/B clean + (B - n)/B adv + ALP_beta PCR (:444-445), ALP_beta 1 (:42), `--alp on` (:43).
  KL untempered, summed over classes (nn.KLDivLoss(reduction='none') ... .sum(dim=1), :400, :430, :434).
"""

import jax
import jax.numpy as jnp

from mmard_jax import losses
from mmard_jax.methods.core import Logits, MethodRow, Objective, as_global_sum, needs_of, order_of

# How the terms combine (hp 'dgad_form'): 'script' main.py:444-445 (every student but MobileNetV2); 'mobilenetv2_script'
# main.py:440-441, the script's MobileNetV2 branch as written, 0.5 (n/B clean + (B - n)/B) adv + beta PCR (a
# misplaced parenthesis); 'mobilenetv2_halved' its evident intent, 0.5 (n/B clean + (B - n)/B adv) + beta PCR.
FORMS = ("script", "mobilenetv2_script", "mobilenetv2_halved")


def teacher_mistakes(t_nat, labels):
    """Lambda (main.py:409-412): 1.0 where the teacher's clean prediction is not the label."""
    return (jnp.argmax(t_nat, axis=-1) != labels).astype(jnp.float32)


def _trade(logits, mask, i, j):
    """`logits` with, in the rows where `mask`, the entries at columns i and j exchanged (exact: no arithmetic)."""
    cols = jnp.arange(logits.shape[-1])[None, :]
    at_i, at_j = cols == i[:, None], cols == j[:, None]
    li = jnp.take_along_axis(logits, i[:, None], axis=-1)
    lj = jnp.take_along_axis(logits, j[:, None], axis=-1)
    m = mask[:, None]
    return jnp.where(m & at_i, lj, jnp.where(m & at_j, li, logits))


def swap_clean(t_nat, labels):
    """main.py:416-419: where the teacher is wrong at x, T(x)'s logit of y and its largest logit trade places."""
    top = jnp.argmax(t_nat, axis=-1)
    return _trade(t_nat, top != labels, labels, top)


def adv_mistakes(t_adv, labels):
    """main.py:422-425: the mask of the swap on T(x'), T(x')_y < max_{c != y} T(x')_c (a tie is not swapped)."""
    cols = jnp.arange(t_adv.shape[-1])[None, :]
    others = jnp.where(cols == labels[:, None], -jnp.inf, t_adv)
    true = jnp.take_along_axis(t_adv, labels[:, None], axis=-1)[:, 0]
    return true < jnp.max(others, axis=-1), jnp.argmax(others, axis=-1)


def swap_adv(t_adv, labels):
    """main.py:422-427: where T(x')_y < max_{c != y} T(x')_c, the logit of y and the largest other trade places."""
    mask, top = adv_mistakes(t_adv, labels)
    return _trade(t_adv, mask, labels, top)


def _dgad(lg: Logits, y, state, hp, info):
    lam = teacher_mistakes(lg.t_nat, y)
    kl_nat = losses.kl_div(lg.s_nat, jax.lax.stop_gradient(swap_clean(lg.t_nat, y)))
    kl_adv = losses.kl_div(lg.s_adv, jax.lax.stop_gradient(swap_adv(lg.t_adv, y)))
    # n and B of the global batch (the script's one batch): summed over the data axis.
    n_local = jnp.sum(lam)
    if info.axis_name is None:
        n, bs = n_local, float(y.shape[0])
    else:
        n, bs = jax.lax.psum(n_local, info.axis_name), float(y.shape[0] * jax.lax.axis_size(info.axis_name))
    clean = as_global_sum(jnp.sum(lam * kl_nat), info) / (n + 1e-10)  # main.py:429-431
    # main.py:433-434 divides by B - n: a batch the teacher gets all wrong raises ZeroDivisionError there; its
    # weight (B - n)/B is 0, so the term is 0 here (docs/design.md "Deviations").
    adv = as_global_sum(jnp.sum((1.0 - lam) * kl_adv), info) / jnp.maximum(bs - n, 1.0)
    pcr = jnp.mean(jnp.square(jax.nn.softmax(lg.s_adv.astype(jnp.float32), axis=-1)
                              - jax.nn.softmax(lg.s_nat.astype(jnp.float32), axis=-1)))  # main.py:437
    w_clean, w_adv = n / bs, (bs - n) / bs
    form = hp["dgad_form"]
    if form == "script":
        distil = w_clean * clean + w_adv * adv  # main.py:444-445
    elif form == "mobilenetv2_script":
        distil = 0.5 * (w_clean * clean + w_adv) * adv  # main.py:440-441, as written
    else:
        distil = 0.5 * (w_clean * clean + w_adv * adv)
    loss = distil + hp["alp_beta"] * pcr
    # Examples distilled at x' whose T(x') the swap corrected (summed over the data axis as n).
    swapped = jnp.sum((1.0 - lam) * adv_mistakes(lg.t_adv, y)[0])
    swapped = swapped if info.axis_name is None else jax.lax.psum(swapped, info.axis_name)
    metrics = {"dgad_clean": clean, "dgad_adv": adv, "dgad_pcr": pcr, "dgad_teacher_mistakes": n,
               "dgad_adv_swapped": swapped}
    return loss, metrics, state


def _check(hp):
    if hp["dgad_form"] not in FORMS:
        raise ValueError(f"dgad_form must be one of {FORMS}, got {hp['dgad_form']!r}")


OUTER = {
    # ALP_beta 1 (main.py:42) with `--alp on` (:43; off = alp_beta 0); the script's form for every student but
    # MobileNetV2 (:444-445). Forwards: S(x), S(x') in train mode (:397-398), T(x), T(x') (:405-406).
    "dgad": Objective("dgad", _dgad, needs_of("s_nat", "s_adv", "t_nat", "t_adv"), order_of("s_nat", "s_adv"),
                      {"alp_beta": 1.0, "dgad_form": "script"}, check=_check),
}

ROWS = {
    # AdaAD's attack (AT_helper.py:8-48, called at main.py:391-392): student and teacher in eval mode (:20-24),
    # start x + 0.001 N(0, 1) (:26-27), the gradient of sum KL(S(x'), T(x')) through both (:33-36).
    "dgad": MethodRow("kl_teacher_adv", "dgad", "gaussian", "eval", source="kunsaram01/DGAD main.py, AT_helper.py"),
}
