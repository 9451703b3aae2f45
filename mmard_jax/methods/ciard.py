"""CIARD (ICCV 2025, cyclic iterative adversarial robustness distillation) as the row `ciard`: a clean teacher and a
robust teacher that keeps training during distillation, a push term away from the clean teacher where it is wrong
at x', and teacher temperatures balanced by the teachers' entropies (eminentgu/CIARD @93a9a2d, `CIARD.py`,
`mtard_loss.py`; CIARD2025/CIARD holds the same commit).

Script facts (docs/design.md, "ciard"):
- Networks: the student; the robust teacher R (`rteacher`, trained: it starts from config.teacher's checkpoint, runs
  in train mode throughout, CIARD.py:151, :194, mtard_loss.py:54, and has its own SGD, CIARD.py:148-149); the clean
  teacher T2 (config.teacher2, eval mode, CIARD.py:165).
- Forwards: S(x) and R(x) in train mode before the attack (CIARD.py:201, :204; R(x) under no_grad, read by nothing:
  its BatchNorm update only), T2(x) (:203); the attack (CE on S in eval mode, start x + 0.001 N(0, 1), mtard_loss.py:
  40-51); then S(x'), R(x') in train mode and T2(x') (mtard_loss.py:60-62).
- Loss (CIARD.py:212-251): mean_{B,C} kl(S(x'), R(x') / tau_adv) + mean_{B,C} kl(S(x), T2(x) / tau_nat)
  - w mean_{n,C} kl(S(x') / 5, T2(x')) over the n examples T2 gets wrong at x' (push_loss, :111-122), with the
  script's kl(a, b) = -a b + log(b + 1e-5) b (:91-93), R and T2 detached; w = 10^(min(m1, m2) - m3), m = floor(log10|
  value|) of the three terms (scale_to_magnitude, :99-109; constant). The MTARD weights the script updates (:226-241)
  are never read (:242): the loss is 1 x + 1 x.
- Temperatures (:175-179, :216-221): tau <- clip(tau -+ r sign(H_adv / H_nat - 1), 1, 10) after the loss, H the mean
  of p log(p + 1e-5) of each tempered teacher; r = 0.001 (:169), x0.1 at every STEP of the 1-based epochs 215, 260,
  285 (:283-285, inside the step loop): method state, checkpointed.
- The robust teacher: CE(R(x'), y) (:290), stepped only when the 1-based epoch > 50 (:291-293): before that its
  parameters and optimizer state are held (phase 'warmup'), its BatchNorm statistics still move.
"""

import jax
import jax.numpy as jnp

from mmard_jax import losses
from mmard_jax.methods.core import Logits, MethodRow, Objective, as_global_sum, check_learned_temperatures, global_mean

# The 1-based epochs whose steps multiply the temperature rate by 0.1 (CIARD.py:283-285).
TEMP_MILESTONES = (215, 260, 285)
# hp 'ciard_temp_decay': 'per_step' the script (x0.1 after every step of a milestone epoch: the rate is ~0 from the
# first milestone on), 'per_epoch' its evident intent (x0.1 once at each milestone epoch).
TEMP_DECAYS = ("per_step", "per_epoch")
EPS = 1e-5  # CIARD.py:92, :96: log(b + 1e-5)


def script_kl(log_p_student, p_teacher):
    """CIARD.py:91-93 elementwise, -a b + log(b + 1e-5) b: the KL plus a constant of the teacher (its value sets w)."""
    return -log_p_student * p_teacher + jnp.log(p_teacher + EPS) * p_teacher


def neg_entropy(p):
    """CIARD.py:95-97 and :216-217: the mean over B*C of p log(p + 1e-5) (the negative entropy / C)."""
    return jnp.mean(jnp.log(p + EPS) * p)


def magnitude(value):
    """floor(log10|v|) with 0 replaced by 1e-7 (CIARD.py:100-106: math.isclose(v, 0, rel_tol=1e-9) is v == 0)."""
    return jnp.floor(jnp.log10(jnp.abs(jnp.where(value == 0.0, 1e-7, value))))


def push_weight(kl_adv, kl_nat, push):
    """scale_to_magnitude (CIARD.py:99-109): 10^(min(m(kl_adv), m(kl_nat)) - m(push)), a constant ("not lambda")."""
    return 10.0 ** (jnp.minimum(magnitude(kl_adv), magnitude(kl_nat)) - magnitude(push))


def temperature_update(state, h_adv, h_nat, hp):
    """CIARD.py:218-221: each temperature moves by the rate against the sign of its entropy ratio - 1, clipped."""
    r, lo, hi = state["temp_rate"], hp["ciard_temp_min"], hp["ciard_temp_max"]
    temp_adv = jnp.clip(state["temp_adv"] - r * jnp.sign(h_adv / h_nat - 1.0), lo, hi)
    temp_nat = jnp.clip(state["temp_nat"] - r * jnp.sign(h_nat / h_adv - 1.0), lo, hi)
    return temp_adv, temp_nat


def next_rate(state, epoch, hp):
    """The temperature rate of the next step: 'per_step' x0.1 after each step of a 1-based milestone epoch
    (CIARD.py:283-285); 'per_epoch' the base rate x0.1 per milestone reached, the next step's epoch being this one."""
    one_based = epoch + 1
    if hp["ciard_temp_decay"] == "per_step":
        hit = jnp.any(one_based == jnp.asarray(TEMP_MILESTONES))
        return jnp.where(hit, state["temp_rate"] * 0.1, state["temp_rate"])
    passed = jnp.sum(one_based >= jnp.asarray(TEMP_MILESTONES))
    return hp["ciard_temp_lr"] * 0.1 ** passed.astype(jnp.float32)


def _init_state(hp):
    # CIARD.py:175-176 (both temperatures 1), :169 (rate 0.001).
    return {"temp_adv": jnp.asarray(hp["ciard_temp_init"], jnp.float32),
            "temp_nat": jnp.asarray(hp["ciard_temp_init"], jnp.float32),
            "temp_rate": jnp.asarray(hp["ciard_temp_lr"], jnp.float32)}


def _ciard(lg: Logits, y, state, hp, info):
    c = lg.s_adv.shape[-1]
    p_adv = jax.nn.softmax(jax.lax.stop_gradient(lg.r_adv) / state["temp_adv"], axis=-1)  # :212
    p_nat = jax.nn.softmax(jax.lax.stop_gradient(lg.t2_nat) / state["temp_nat"], axis=-1)  # :213
    kl_adv = jnp.mean(script_kl(jax.nn.log_softmax(lg.s_adv, axis=-1), p_adv))  # :212, :214
    kl_nat = jnp.mean(script_kl(jax.nn.log_softmax(lg.s_nat, axis=-1), p_nat))  # :213, :215
    # push_loss(T2(x'), S(x'), y) (:245, :111-122): the examples the clean teacher gets wrong at x' (global batch).
    wrong = jnp.argmax(lg.t2_adv, axis=-1) != y
    elems = script_kl(jax.nn.log_softmax(lg.s_adv / hp["push_temperature"], axis=-1),
                      jax.nn.softmax(jax.lax.stop_gradient(lg.t2_adv), axis=-1))
    local_sum = jnp.sum(jnp.where(wrong[:, None], elems, 0.0))
    local_nan = jnp.sum(jnp.where(wrong[:, None], jnp.isnan(elems), False))
    n, n_nan = jnp.sum(wrong), local_nan
    if info.axis_name is not None:
        n, n_nan = jax.lax.psum(n, info.axis_name), jax.lax.psum(n_nan, info.axis_name)
    denom = jnp.maximum(n, 1).astype(elems.dtype) * c
    push = as_global_sum(local_sum, info) / denom  # its pmean over devices: the global batch's mean over n*C
    push_value = jax.lax.stop_gradient(global_mean(push, info))
    used = (n > 0) & (n_nan == 0)  # :246-247: no term on an empty selection or a NaN
    weight = push_weight(jax.lax.stop_gradient(global_mean(kl_adv, info)),
                         jax.lax.stop_gradient(global_mean(kl_nat, info)), push_value)
    weight = jnp.where(used, weight, 0.0)
    student = kl_adv + kl_nat - hp["ciard_push_lambda"] * weight * jnp.where(used, push, 0.0)  # :242, :251
    # The temperatures of the next step, from this step's tempered teachers (:216-221), and the rate (:283-285).
    h_adv = jax.lax.stop_gradient(global_mean(neg_entropy(p_adv), info))
    h_nat = jax.lax.stop_gradient(global_mean(neg_entropy(p_nat), info))
    temp_adv, temp_nat = temperature_update(state, h_adv, h_nat, hp)
    new_state = {"temp_adv": temp_adv, "temp_nat": temp_nat, "temp_rate": next_rate(state, info.epoch, hp)}
    # The robust teacher's CE (:290), its gradient reaching it only (the KL reads R(x') detached); from epoch 51.
    teacher_ce = jnp.mean(losses.cross_entropy(lg.r_adv, y))
    total = student + (teacher_ce if info.phase == "main" else 0.0)
    metrics = {"student_loss": student, "kl_adv_radv": kl_adv, "kl_nat_t2nat": kl_nat, "push": push_value,
               "push_weight": weight, "push_examples": n.astype(jnp.float32), "teacher_ce": teacher_ce,
               "temp_adv": state["temp_adv"], "temp_nat": state["temp_nat"]}
    return total, metrics, new_state


def _needs(hp, phase):
    return frozenset({"s_adv", "s_nat", "r_adv", "t2_nat", "t2_adv"})


def _pre_attack(hp, phase):
    # CIARD.py:201 S(x) (train mode; the attack's eval-mode student then reads its statistics), :204 R(x) (train
    # mode, no_grad: its output feeds only the commented-out kl_Loss4, :252-260).
    return ("s_nat", "r_nat")


def _order(hp, phase):
    return ("s_adv", "r_adv")  # mtard_loss.py:60-61 (robust_inner_loss_push)


def _phase(hp, epoch):
    # CIARD.py:291: the robust teacher steps when the 1-based epoch > 50, i.e. from 0-based epoch 50.
    return "warmup" if epoch < hp["ciard_teacher_start"] else "main"


def _held(hp, phase):
    return frozenset({"rteacher"}) if phase == "warmup" else frozenset()


def _check(hp):
    if hp["ciard_temp_decay"] not in TEMP_DECAYS:
        raise ValueError(f"ciard_temp_decay must be one of {TEMP_DECAYS}, got {hp['ciard_temp_decay']!r}")
    check_learned_temperatures(hp, "ciard", "CIARD")
    if hp["push_temperature"] <= 0.0:
        raise ValueError(f"push_temperature must be > 0, got {hp['push_temperature']}")
    if hp["ciard_teacher_start"] < 0:
        raise ValueError(f"ciard_teacher_start must be >= 0 (the 0-based epoch the robust teacher starts training), "
                         f"got {hp['ciard_teacher_start']}")


OUTER = {
    # Temperatures 1 in [1, 10] (CIARD.py:175-179), rate 0.001 (:169); push T 5 (:111), lambda 1 (:250's comment);
    # the robust teacher trains from 0-based epoch 50 (:291).
    "ciard": Objective(
        "ciard", _ciard, _needs, _order,
        {"push_temperature": 5.0, "ciard_push_lambda": 1.0, "ciard_temp_init": 1.0, "ciard_temp_min": 1.0,
         "ciard_temp_max": 10.0, "ciard_temp_lr": 0.001, "ciard_temp_decay": "per_step", "ciard_teacher_start": 50},
        phases=("warmup", "main"), phase=_phase, init_state=_init_state, check=_check, pre_attack=_pre_attack,
        held=_held),
}

ROWS = {
    # mtard_loss.py:40 model.eval(), :42 start x + 0.001 N(0, 1), :47 CE(S(x'), y); eps 8/255, step 2/255, 10 steps
    # (CIARD.py:209-210).
    "ciard": MethodRow("ce", "ciard", "gaussian", "eval", source="eminentgu/CIARD CIARD.py, mtard_loss.py"),
}
