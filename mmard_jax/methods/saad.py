"""SAAD (TMLR 2026, sample-wise adaptive adversarial distillation) as the row `saad`: each example's KL to the
teacher at x' and its IGDM term weighted by the teacher's entropy at x', the attack against the teacher's logits
corrected to first order by the teacher's input gradient (HongsinLee/saad @295121c; docs/design.md, "saad").

Script facts (file:line of that commit):
- Forwards: T(x) and the input gradient of its label logit (attacks.py:152-163, the teacher in eval mode; saad.py:54
  runs T(x) once more without gradient: the same logits, shared here); the attack's S(x'_k) in eval mode
  (attacks.py:149, :179); T(x'), T(x - d), d = x' - x (saad.py:60-62, no_grad); S(x'), S(x - d), S(x) in train mode,
  in that order (saad.py:64-66); the mirrored point is not clipped.
- Weights: H = the Renyi entropy of order gamma of softmax(T(x')) (saad.py:68; utils.py:43-53: Shannon, with
  log(p + 1e-12), where |gamma - 1| < 1e-6); w = 5 (H - min_batch H), clamped at 0 (saad.py:75-77; the 5 is a
  literal there, `--entropy_scale` (args.py:13, default 5) is never read); w_norm = (w - min w) / (max w - min w
  + 1e-8) (:78). Min and max are over the global batch.
- Loss: mean_batch[w (KL(T(x') || S(x')) + igdm_alpha (epoch / E) KL(T(x') - T(x - d) || S(x') - S(x - d)))
  + beta (1 - w_norm) KL(T(x) || S(x))] (saad.py:69-73, 81-82; utils.py:26-41: each KL summed over classes),
  epoch 1-based (saad.py:46), E = --epochs (200, args.py:20). The adversarial terms carry w itself, not w_norm.
"""

import jax
import jax.numpy as jnp

from mmard_jax import losses
from mmard_jax.methods.core import Logits, MethodRow, Objective, StepInfo, order_of, weighted_mean

ENTROPY_EPS = 1e-12  # saad utils.py:43 (inside the log)
WEIGHT_EPS = 1e-8  # saad saad.py:78 (the min-max normalisation's denominator)


def renyi_entropy(logits, order):
    """utils.py:43-53 `samplewise_renyi_entropy`: log(sum_c p_c^order + 1e-12) / (1 - order), or Shannon's
    -sum_c p_c log(p_c + 1e-12) where |order - 1| < 1e-6; shape [B]."""
    p = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    if abs(order - 1.0) < 1e-6:
        return -jnp.sum(p * jnp.log(p + ENTROPY_EPS), axis=-1)
    return jnp.log(jnp.sum(p ** order, axis=-1) + ENTROPY_EPS) / (1.0 - order)


def _global(reduce, value, info: StepInfo):
    """The batch minimum or maximum over the global batch (across devices when the step is data-parallel)."""
    local = reduce(value)
    if info.axis_name is None:
        return local
    return (jax.lax.pmin if reduce is jnp.min else jax.lax.pmax)(local, info.axis_name)


def sample_weights(t_adv, hp, info: StepInfo):
    """saad.py:68, 75-78: (w, w_norm) from the teacher's entropy at x', per example, constant (teacher only)."""
    h = renyi_entropy(jax.lax.stop_gradient(t_adv), hp["gamma"])
    w = jnp.maximum(hp["entropy_scale"] * (h - _global(jnp.min, h, info)), 0.0)
    w_min, w_max = _global(jnp.min, w, info), _global(jnp.max, w, info)
    return w, (w - w_min) / (w_max - w_min + WEIGHT_EPS)


def _saad(lg: Logits, y, state, hp, info: StepInfo):
    # saad.py:68-82; the teacher logits come from no_grad forwards (saad.py:53-54, 59-62).
    w, w_norm = sample_weights(lg.t_adv, hp, info)
    kl_adv = losses.kl_div(lg.s_adv, lg.t_adv)
    igdm = losses.kl_div(lg.s_adv - lg.s_mir, lg.t_adv - lg.t_mir)
    igdm_weight = hp["igdm_alpha"] * (info.epoch + 1).astype(jnp.float32) / hp["igdm_epochs"]
    per_example = w * (kl_adv + igdm_weight * igdm)
    metrics = {"kl_adv_tadv": jnp.mean(kl_adv), "igdm": jnp.mean(igdm), "igdm_weight": igdm_weight,
               "saad_w": jnp.mean(w)}
    if hp["beta"] != 0.0:
        kl_nat = losses.kl_div(lg.s_nat, lg.t_nat)
        per_example = per_example + hp["beta"] * (1.0 - w_norm) * kl_nat
        metrics["kl_nat_tnat"] = jnp.mean(kl_nat)
    return weighted_mean(per_example, info), metrics, state


def _needs(hp, phase):
    # S(x) and T(x) enter the loss only through beta (saad.py:81); main.sh:9 runs beta 0.
    return frozenset({"s_adv", "s_mir", "t_adv", "t_mir"} | ({"s_nat", "t_nat"} if hp["beta"] != 0.0 else set()))


def _check(hp):
    if hp["gamma"] <= 0.0:
        raise ValueError(f"gamma (the Renyi order of SAAD's entropy) must be > 0 (order 0 is log C for every "
                         f"example: all weights 0), got {hp['gamma']}")
    if hp["entropy_scale"] <= 0.0:
        raise ValueError(f"entropy_scale must be > 0 (<= 0 clamps every SAAD weight to 0), got {hp['entropy_scale']}")
    if hp["beta"] < 0.0 or hp["igdm_alpha"] < 0.0:
        raise ValueError(f"SAAD's beta and igdm_alpha must be >= 0, got {hp['beta']}, {hp['igdm_alpha']}")
    if hp["igdm_epochs"] <= 0.0:
        raise ValueError(f"igdm_epochs (E of the IGDM weight epoch / E) must be > 0, got {hp['igdm_epochs']}")


OUTER = {
    # igdm_alpha 1 (args.py:7, main.sh:8), beta 0 (main.sh:9; args.py:9 has no default), gamma 1 (main.sh:10; no
    # default, args.py:11), entropy_scale 5 (saad.py:76 literal = args.py:13 default), E = 200 (args.py:20,
    # main.sh:17). Train-mode forwards S(x'), S(x - d), S(x) (saad.py:64-66; S(x) runs at beta 0 too, moving the
    # BatchNorm statistics the eval-mode attack reads; train_forwards='needed' drops it).
    "saad": Objective("saad", _saad, _needs, order_of("s_adv", "s_mir", "s_nat"),
                      {"igdm_alpha": 1.0, "beta": 0.0, "gamma": 1.0, "entropy_scale": 5.0, "igdm_epochs": 200.0},
                      check=_check),
}

ROWS = {
    # attacks.py:138-194 via saad.py:56: student in eval (:149), start x + 0.001 N(0, 1) not clipped (:164), 10 sign
    # steps of 2/255 in the 8/255 ball, clipped to [0, 1] (:186-189), on sum KL(corrected T || S(x')) (:182-185).
    "saad": MethodRow("kl_teacher_linearized", "saad", "gaussian", "eval",
                      source="HongsinLee/saad saad.py, attacks.py, utils.py, args.py, main.sh"),
}

# saad.py:72: "args.igdm_alpha = 1 for cifar10, 10 for cifar100, tinyimagenet" (the script's only word on it).
DATASET_HPARAMS = {("saad", "cifar100"): {"igdm_alpha": 10.0}, ("saad", "tiny_imagenet"): {"igdm_alpha": 10.0}}
