"""ABSLD (NeurIPS 2024, anti-bias soft label distillation) as the row `absld`: RSLAD's distillation from the
teacher's natural soft labels, each example's teacher logits divided by its class's temperature, the per-class
temperatures updated once per epoch from the student's per-class losses of that epoch
(zhaoshiji123/ABSLD @7407c3a; the code files are those of 99ed9cd, the only commit that touches them).

Script facts (`resnet18_absld_cifar10.py`, `absld_loss.py`; docs/design.md, "absld"):
- Temperatures tau_adv, tau_nat: ones at the start (resnet18_absld_cifar10.py:66-67), in [0.5, 5] (:71-72).
- Teacher targets: T(x) (:95) divided in place, row by row, by tau_adv[y] and then by tau_nat[y] (:96-100); the two
  "copies" are `.detach()` views of one tensor, so both terms and the attack read T(x) / tau_adv[y] / tau_nat[y]
  (absld_teacher_temps='aliased'; 'separate' is the paper's reading: T / tau_adv for the adversarial term and
  the attack, T / tau_nat for the natural term).
- Loss: 5/6 mean_{B,C} kl(S(x'), T_adv) + 1/6 mean_{B,C} kl(S(x), T_nat) (:121-125), S untempered.
- Per-class losses: CE(S(x'), y) and CE(S(x), y) of the step's train-mode logits, summed per class over the
  epoch (:113-119); after the epoch, tau <- clip(tau - r (L - mean L) / max|L - mean L|, 0.5, 5) (:177-189) with
  r = 0.1 (:69), x0.1 with the learning rate (:173-176): r follows the coming epoch's learning-rate scale.
"""

import jax.numpy as jnp

from mmard_jax import losses
from mmard_jax.methods.core import (
    KL_REDUCTION,
    EpochState,
    Logits,
    MethodRow,
    Objective,
    Tally,
    check_learned_temperatures,
    kl,
    needs_of,
    order_of,
)

TEACHER_TEMPS = ("aliased", "separate")


def tempered_teachers(value, t_nat, labels, hp):
    """(target of the adversarial term and the attack, target of the natural term): T(x) over the class temperatures.

    'aliased' (resnet18_absld_cifar10.py:96-100, the script): both are T(x) / tau_adv[y] / tau_nat[y], divided in
    that order as the script's in-place loop does; 'separate' (the paper): T / tau_adv[y] and T / tau_nat[y]."""
    t_adv = t_nat / value["temp_adv"][labels][:, None]
    t_nat_over = t_nat / value["temp_nat"][labels][:, None]
    if hp["absld_teacher_temps"] == "aliased":
        both = t_adv / value["temp_nat"][labels][:, None]
        return both, both
    return t_adv, t_nat_over


def _attack_teacher(value, t_nat, labels, hp):
    # absld_loss.py:45-46 is given `teacher_logits_new_adv` (resnet18_absld_cifar10.py:104).
    return tempered_teachers(value, t_nat, labels, hp)[0]


def _absld(lg: Logits, y, state, hp, info):
    # resnet18_absld_cifar10.py:121-125: 5/6 torch.mean(kl(S(x'), T_adv)) + 1/6 torch.mean(kl(S(x), T_nat)), the
    # mean over B*C (kl_class_mean); the exact KL (the script's 1e-5 in the teacher's log: Deviations, as RSLAD's).
    target_adv, target_nat = tempered_teachers(info.epoch_values["absld"], lg.t_nat, y, hp)
    a = hp["alpha"]
    kl_adv, kl_nat = kl(lg.s_adv, target_adv, hp), kl(lg.s_nat, target_nat, hp)
    return a * kl_adv + (1.0 - a) * kl_nat, {"kl_adv_tnat": kl_adv, "kl_nat_tnat": kl_nat}, state


def temperature_update(temp, class_loss, rate, hp):
    """resnet18_absld_cifar10.py:178-180 (and :187-189): tau - rate (L - mean L) / max|L - mean L|, clipped.

    Where every class's loss is equal the script divides 0 by 0 and the temperatures become NaN: followed."""
    gap = class_loss - jnp.mean(class_loss)
    return jnp.clip(temp - rate * gap / jnp.max(jnp.abs(gap)), hp["absld_temp_min"], hp["absld_temp_max"])


def _init(hp, num_classes):
    # resnet18_absld_cifar10.py:66-67 (ones), :85-86 (the epoch's sums start at zero).
    temps = {k: jnp.full((num_classes,), hp["absld_temp_init"], jnp.float32) for k in ("temp_adv", "temp_nat")}
    return {"sums": {k: jnp.zeros((num_classes,), jnp.float32) for k in ("loss_adv", "loss_nat")}, "value": temps}


def _accumulate(tally: Tally, hp):
    """This device's per-class sums of CE(S(x'), y) and CE(S(x), y), train-mode logits (script :113-119)."""
    lg = tally.logits
    onehot = (tally.labels[:, None] == jnp.arange(lg.s_adv.shape[-1])[None, :]).astype(jnp.float32)
    per_class = {"loss_adv": losses.cross_entropy(lg.s_adv, tally.labels),
                 "loss_nat": losses.cross_entropy(lg.s_nat, tally.labels)}
    return {k: jnp.sum(onehot * v.astype(jnp.float32)[:, None], axis=0) for k, v in per_class.items()}


def _epoch_update(state, hp, lr_scale):
    """The next epoch's temperatures from this epoch's per-class losses (script :173-189); the sums restart at 0."""
    rate = hp["absld_temp_lr"] * lr_scale
    sums, value = state["sums"], state["value"]
    new = {"temp_adv": temperature_update(value["temp_adv"], sums["loss_adv"], rate, hp),
           "temp_nat": temperature_update(value["temp_nat"], sums["loss_nat"], rate, hp)}
    return {"sums": {k: jnp.zeros_like(v) for k, v in sums.items()}, "value": new}


def _summary(state, hp):
    """The temperatures used this epoch and the epoch's per-class losses (the script prints both, :181-193)."""
    out = {}
    for part in ("adv", "nat"):
        out[f"absld_temp_{part}"] = [float(v) for v in state["value"][f"temp_{part}"]]
        out[f"absld_loss_{part}"] = [float(v) for v in state["sums"][f"loss_{part}"]]
    return out


def _check(hp):
    if hp["absld_teacher_temps"] not in TEACHER_TEMPS:
        raise ValueError(f"absld_teacher_temps must be one of {TEACHER_TEMPS}, got {hp['absld_teacher_temps']!r}")
    check_learned_temperatures(hp, "absld", "ABSLD")

OUTER = {
    # alpha 5/6 (resnet18_absld_cifar10.py:125), torch.mean over B*C (:123-124); temperatures ones (:66-67),
    # rate 0.1 (:69), bounds [0.5, 5] (:71-72); both terms and the attack read T / tau_adv / tau_nat (:96-100, :104).
    # Forwards: T(x) (:95), S(x') (absld_loss.py:53, :58), S(x) (resnet18_absld_cifar10.py:105-106), train mode.
    "absld": Objective(
        "absld", _absld, needs_of("s_adv", "s_nat", "t_nat"), order_of("s_adv", "s_nat"),
        {"alpha": 5.0 / 6.0, "kl_class_mean": True, **KL_REDUCTION, "absld_temp_init": 1.0, "absld_temp_lr": 0.1,
         "absld_temp_min": 0.5, "absld_temp_max": 5.0, "absld_teacher_temps": "aliased"},
        check=_check, epoch_state=EpochState(_init, _accumulate, _epoch_update, frozenset(), _summary),
        attack_teacher=_attack_teacher),
}

ROWS = {
    # absld_loss.py:37 model.eval(), :40 start x + 0.001 N(0, 1), :45-47 sum KL(S(x'), T_adv) over B*C; eps 8/255,
    # step 2/255, 10 steps (resnet18_absld_cifar10.py:22, :104).
    "absld": MethodRow("kl_teacher_nat", "absld", "gaussian", "eval",
                       source="zhaoshiji123/ABSLD resnet18_absld_cifar10.py, absld_loss.py"),
}
