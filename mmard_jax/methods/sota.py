"""The methods after the paper's baselines: AdaAD, AdaIAD, the IGDM plug-in and PeerAiD, each as its published
code trains it (boyellow/AdaAD @9e5c6e5; IGDM: Xavaitron/VLM_Distillation ICLR_IGDM @a22ed64, the authors'
code, and HongsinLee/saad @295121c; jaewonalive/PeerAiD @cd12e92). Formulas and reductions: docs/design.md.
"""

import jax
import jax.numpy as jnp

from mmard_jax import losses
from mmard_jax.methods.core import KL_REDUCTION, Logits, MethodRow, Objective, kl, needs_of, order_of


def _adaad(lg: Logits, y, state, hp, info):
    # AdaAD main.py:341-353: alpha KL(S(x'), T(x')) + (1 - alpha) KL(S(x), T(x)); nn.KLDivLoss() (mean over
    # B*C) on CIFAR-10 (:342-345), sum / B on CIFAR-100 (:347-351).
    a = hp["alpha"]
    kl_adv = kl(lg.s_adv, lg.t_adv, hp)
    if a == 1.0:
        return kl_adv, {"kl_adv_tadv": kl_adv}, state
    kl_nat = kl(lg.s_nat, lg.t_nat, hp)
    return a * kl_adv + (1.0 - a) * kl_nat, {"kl_adv_tadv": kl_adv, "kl_nat_tnat": kl_nat}, state


def _adaad_needs(hp, phase):
    return frozenset({"s_adv", "t_adv"} | ({"s_nat", "t_nat"} if hp["alpha"] != 1.0 else set()))


def _adaiad_order(hp, phase):
    # AdaAD main.py:359-381: S(x), S(x'), then S(x) as the KL target after IAD_begin, and S(x) for the
    # (weight 0) CE term.
    return ("s_nat", "s_adv") + (("s_nat",) if phase == "main" else ()) + ("s_nat",)


def _igdm(lg: Logits, y, state, hp, info):
    """alpha (epoch / E) KL_batchmean(softmax(T(x') - T(x - d)) || softmax(S(x') - S(x - d))), d = x' - x,
    epoch 1-based (ICLR_IGDM adaad_IGDM_cifar100.py:123-147; saad igdm.py:51-59)."""
    term = jnp.mean(losses.kl_div(lg.s_adv - lg.s_mir, lg.t_adv - lg.t_mir))
    weight = hp["igdm_alpha"] * (info.epoch + 1).astype(jnp.float32) / hp["igdm_epochs"]
    return weight * term, {"igdm": term, "igdm_weight": weight}, state


def _peeraid(lg: Logits, y, state, hp, info):
    """PeerAiD main.py:363, 393-397, one backward through the sum of both losses:
    peer = g_ce CE(P(x')) + g_kl tau^2 KL(P^tau(x'), S^tau(x')), S(x') not detached (it reaches the student);
    student = l_ce CE(S(x')) + l_peer T^2 KL(S^T(x'), P^T(x')) + l_self T^2 KL(S^T(x'), S^T(x)), P(x') detached,
    S(x) not detached."""
    t, tau = hp["temperature"], hp["peer_temperature"]
    peer = (hp["peer_ce"] * jnp.mean(losses.cross_entropy(lg.p_adv, y))
            + hp["peer_kl"] * tau * tau * kl(lg.p_adv, lg.s_adv, hp, tau))
    s_peer = t * t * kl(lg.s_adv, jax.lax.stop_gradient(lg.p_adv), hp, t)
    s_self = t * t * kl(lg.s_adv, lg.s_nat, hp, t)
    student = (hp["student_ce"] * jnp.mean(losses.cross_entropy(lg.s_adv, y))
               + hp["student_peer"] * s_peer + hp["student_self"] * s_self)
    metrics = {"peer_loss": peer, "student_loss": student, "kl_s_peer": s_peer, "kl_s_self": s_self}
    return peer + student, metrics, state


OUTER = {
    # AdaAD: alpha 1 ('--AdaAD_alpha', main.py:41), nn.KLDivLoss() mean over B*C on CIFAR-10 (main.py:342-345);
    # S(x) then S(x') in train mode (main.py:333-334).
    "adaad": Objective("adaad", _adaad, _adaad_needs, order_of("s_nat", "s_adv"),
                       {"alpha": 1.0, "kl_class_mean": True, **KL_REDUCTION}),
    # PeerAiD, ResNet-18 CIFAR-10 (README.md:31): T 5, lambda (0, 1, 1), gamma (1, 0.1), tau 1; nn.KLDivLoss()
    # mean over B*C (main.py:363, 393-397); P(x') (main.py:359), S(x') twice (:361, :376), S(x) (:387).
    "peeraid": Objective("peeraid", _peeraid, needs_of("p_adv", "s_adv", "s_nat"),
                         order_of("p_adv", "s_adv", "s_adv", "s_nat"),
                         {"temperature": 5.0, "student_ce": 0.0, "student_peer": 1.0, "student_self": 1.0,
                          "peer_ce": 1.0, "peer_kl": 0.1, "peer_temperature": 1.0, "kl_class_mean": True,
                          **KL_REDUCTION}),
}

PLUGINS = {
    # IGDM: alpha 1 on CIFAR-10 (saad main.sh:8), E = 200 (adaad_IGDM_cifar100.py:147; 300 for RSLAD+IGDM,
    # rslad_IGDM_cifar100.py:124); S(x') and S(x - d) in train mode (saad igdm.py:55-56), teacher in
    # inference mode; the mirrored point is not clipped to [0, 1] (adaad_IGDM_cifar100.py:123-133).
    "igdm": Objective("igdm", _igdm, needs_of("s_adv", "s_mir", "t_adv", "t_mir"), order_of("s_adv", "s_mir"),
                      {"igdm_alpha": 1.0, "igdm_epochs": 200.0}),
}

ROWS = {
    # The student (eval, AT_helper.py:14, 20-21) and the teacher attacked together, start x + 0.001 N(0, 1)
    # (AT_helper.py:26-27).
    "adaad": MethodRow("kl_teacher_adv", "adaad", "gaussian", "eval", source="boyellow/AdaAD main.py, AT_helper.py"),
    # AdaAD's attack with IAD-I's outer objective on T(x'): temp 30 (main.py:38), IAD_begin 60 (:44),
    # IAD_alpha 1 (:45), IAD_beta 0.1 (:46); KL summed over classes / B (:371-381).
    "adaiad": MethodRow("kl_teacher_adv", "iad", "gaussian", "eval", order=_adaiad_order,
                        hparams={"iad_form": "iad1", "iad_teacher_input": "adv", "tau": 30.0, "beta": 0.1,
                                 "warmup_epochs": 60, "alpha": 1.0, "kl_class_mean": False},
                        source="boyellow/AdaAD main.py (--method AdaAD_with_IAD1)"),
    # IGDM on AdaAD, the published CIFAR-10 script (HongsinLee/saad igdm.py): its AdaAD term is batchmean
    # (igdm.py:57, as ICLR_IGDM adaad_IGDM_cifar100.py:142-143), not AdaAD's mean over B*C; its train-mode
    # forwards are S(x + d) and S(x - d) only (igdm.py:55-56), not AdaAD's S(x) first.
    "igdm": MethodRow("kl_teacher_adv", "adaad", "gaussian", "eval", plugins=("igdm",),
                      hparams={"kl_class_mean": False}, order=order_of("s_adv", "s_mir"),
                      source="HongsinLee/saad igdm.py; ICLR_IGDM adaad_IGDM_cifar100.py"),
    # The student attacked against the peer's clean logits, student in eval mode (attack_function.py:59-84),
    # start x + 0.001 N(0, 1) (attack_function.py:71-72).
    "peeraid": MethodRow("kl_peer_nat", "peeraid", "gaussian", "eval", source="jaewonalive/PeerAiD main.py"),
}

DATASET_HPARAMS = {
    ("adaad", "cifar100"): {"kl_class_mean": False},  # AdaAD main.py:347-351: sum / B
    # AdaAD's own main.py trains no Tiny-ImageNet or SVHN model (its loss is defined for CIFAR-10/100 only,
    # main.py:341-351); SAAD's adaad.py, which does, uses nn.KLDivLoss(reduction="batchmean") (saad adaad.py:40, 54).
    ("adaad", "tiny_imagenet"): {"kl_class_mean": False},
    ("adaad", "svhn"): {"kl_class_mean": False},
    ("peeraid", "cifar100"): {"peer_kl": 1.0},  # PeerAiD README.md:39
    # PeerAiD README.md:46 (ResNet-18) and :65 (WRN-34-10), Tiny-ImageNet: --temperature 1 --gamma1 1 --gamma2 100
    # --re_kd_temperature 1 --lamb1 0.035 --lamb2 35 --lamb3 20 (main.py:363, 393-397 use them as named here).
    ("peeraid", "tiny_imagenet"): {"temperature": 1.0, "peer_ce": 1.0, "peer_kl": 100.0, "peer_temperature": 1.0,
                                   "student_ce": 0.035, "student_peer": 35.0, "student_self": 20.0},
}
# The same for plug-ins, on whichever method they are added to: (plug-in, dataset) -> hyper-parameters.
PLUGIN_DATASET_HPARAMS = {
    ("igdm", "cifar100"): {"igdm_alpha": 20.0},  # ICLR_IGDM cifar100.sh:3
}
