"""The outer objectives and table rows of the MMARD paper's methods: Nature, SAT, TRADES, ARD, IAD, RSLAD,
MTARD and MMARD (docs/design.md, "Methods", has every formula with its reduction).

Every default cites the published file it comes from; `ROWS` also records each method's attack start,
student BatchNorm mode during the attack, and published order of train-mode forwards.
"""

import jax
import jax.numpy as jnp

from mmard_jax import losses
from mmard_jax.methods.core import (
    KL_REDUCTION,
    Logits,
    MethodRow,
    Objective,
    as_global_sum,
    global_mean,
    kl,
    needs_of,
    order_of,
    weighted_ce,
    weighted_kl,
    weighted_mean,
)


def _nature(lg: Logits, y, state, hp, info):
    loss = jnp.mean(losses.cross_entropy(lg.s_nat, y))
    return loss, {"ce_nat": loss}, state


def _sat(lg: Logits, y, state, hp, info):
    loss = jnp.mean(losses.cross_entropy(lg.s_adv, y))
    return loss, {"ce_adv": loss}, state


def _trades(lg: Logits, y, state, hp, info):
    # yaodongyu/TRADES trades.py:79-83: CE(S(x)) + beta * (1/B) * KLDivLoss(size_average=False)(S(x'), S(x));
    # S(x) is not detached, so both sides carry gradient.
    ce = jnp.mean(losses.cross_entropy(lg.s_nat, y))
    kl_adv = kl(lg.s_adv, lg.s_nat, hp)
    return ce + hp["beta"] * kl_adv, {"ce_nat": ce, "kl_adv_nat": kl_adv}, state


def _ard(lg: Logits, y, state, hp, info):
    # goldblum/AdversariallyRobustDistillation main.py:127: alpha T^2 KLDivLoss()(S^T(x'), T^T(x))
    # + (1 - alpha) CE(S(x)); KLDivLoss() averages over B*C (main.py:113).
    # Fair-ARD.py:140-148 (plugins=fair): each example's KL and CE times its class weight (info.example_weights).
    tau, a = hp["tau"], hp["alpha"]
    kl_adv = weighted_kl(lg.s_adv, lg.t_nat, hp, info, tau)
    loss, metrics = a * tau * tau * kl_adv, {"kl_adv_tnat": kl_adv}
    if a != 1.0:
        ce = weighted_ce(lg.s_nat, y, info)
        loss, metrics = loss + (1.0 - a) * ce, {**metrics, "ce_nat": ce}
    return loss, metrics, state


def _ard_needs(hp, phase):
    return frozenset({"s_adv", "t_nat"} | ({"s_nat"} if hp["alpha"] != 1.0 else set()))


def _iad_trust(lg: Logits, y, hp):
    # IAD-I.py:174-178 / IAD-II.py:186-189: w = softmax(T(x'))_y ** beta, a constant (`.item()`).
    p_y = jnp.take_along_axis(jax.nn.softmax(lg.t_adv, axis=-1), y[:, None], axis=-1)[:, 0]
    return jax.lax.stop_gradient(p_y ** hp["beta"])


def _iad(lg: Logits, y, state, hp, info):
    """Table 1 (default): mean_b[w tau^2 KL(S^tau(x'), T^tau) + (1 - w) KL(S(x'), S(x))]; 'iad1' (IAD-I.py:179):
    alpha tau^2 KL(S^tau(x'), T^tau) + alpha mean_b[(1 - w) KL(S(x'), S(x))] + (1 - alpha) CE(S(x)).
    T is the teacher at x (IAD) or at x' (`iad_teacher_input='adv'`, AdaIAD); before warm-up ends only
    the teacher term (and the CE term of 'iad1')."""
    tau, a = hp["tau"], hp["alpha"]
    teacher = lg.t_nat if hp["iad_teacher_input"] == "nat" else lg.t_adv
    kl_t = tau * tau * losses.kl_div(lg.s_adv, teacher, tau) * _kl_factor(lg, hp)
    metrics = {"kl_adv_teacher": jnp.mean(kl_t)}
    # Fair-IAD.py:183-199 (plugins=fair): every per-example term times its class weight (info.example_weights).
    if info.phase == "warmup":
        loss = weighted_mean(kl_t, info)
    else:
        trust = _iad_trust(lg, y, hp)
        kl_s = losses.kl_div(lg.s_adv, lg.s_nat) * _kl_factor(lg, hp)
        w_t = trust if hp["iad_form"] == "table1" else 1.0
        loss = weighted_mean(w_t * kl_t + (1.0 - trust) * kl_s, info)
        metrics.update(kl_adv_snat=jnp.mean(kl_s), trust=jnp.mean(trust))
    if hp["iad_form"] == "iad1":
        loss = a * loss
        if a != 1.0:
            ce = weighted_ce(lg.s_nat, y, info)
            loss, metrics = loss + (1.0 - a) * ce, {**metrics, "ce_nat": ce}
    return loss, metrics, state


def _kl_factor(lg: Logits, hp):
    """The per-example KL's scale under the objective's reduction settings (see `core.kl`)."""
    return hp["kl_scale"] / (lg.s_adv.shape[-1] if hp["kl_class_mean"] else 1.0)


def _iad_needs(hp, phase):
    teacher = {"t_nat"} if hp["iad_teacher_input"] == "nat" else {"t_adv"}
    ce = {"s_nat"} if hp["iad_form"] == "iad1" and hp["alpha"] != 1.0 else set()
    main = {"s_adv", "s_nat", "t_adv"} if phase == "main" else set()
    return frozenset({"s_adv"} | teacher | ce | main)


def _iad_order(hp, phase):
    # IAD-I.py:166-181: S(x') (the attack's last forward), S(x') again (`basicop`, unused), then S(x) as the
    # KL target after warm-up, then S(x) for the CE term (run even at alpha = 1).
    return ("s_adv", "s_adv") + (("s_nat",) if phase == "main" else ()) + ("s_nat",)


def _iad_phase(hp, epoch):
    return "warmup" if epoch < hp["warmup_epochs"] else "main"


def _iad_check(hp):
    if hp["iad_form"] not in ("table1", "iad1"):
        raise ValueError(f"iad_form must be 'table1' or 'iad1', got {hp['iad_form']!r}")
    if hp["iad_teacher_input"] not in ("nat", "adv"):
        raise ValueError(f"iad_teacher_input must be 'nat' or 'adv', got {hp['iad_teacher_input']!r}")
    if hp["iad_form"] == "table1" and hp["alpha"] != 1.0:
        raise ValueError("alpha is read only by iad_form='iad1' (IAD-I.py:179); Table 1's form has no alpha")


def _rslad(lg: Logits, y, state, hp, info):
    # zibojia/RSLAD resnet18_rslad_cifar10.py:59-63: 5/6 mean(kl(S(x'), T(x))) + 1/6 mean(kl(S(x), T(x))),
    # torch.mean over B*C; resnet18_rslad_cifar100.py:64-66 multiplies each by 10 (kl_scale).
    # Fair-RSLAD.py:129-138 (plugins=fair): each example's KL times its class weight, then torch.mean over B*C.
    a = hp["alpha"]
    kl_adv, kl_nat = weighted_kl(lg.s_adv, lg.t_nat, hp, info), weighted_kl(lg.s_nat, lg.t_nat, hp, info)
    return (1.0 - a) * kl_nat + a * kl_adv, {"kl_adv_tnat": kl_adv, "kl_nat_tnat": kl_nat}, state


def _mtard(lg: Logits, y, state, hp, info):
    # zhaoshiji123/MTARD mtard/mtard_resnet18_cifar10.py:87-100: before each update,
    # w_nat <- w_nat - lr_w (w_nat - r_nat / (r_adv + r_nat)), r = (L / L_first)^bert, w_adv = 1 - w_nat,
    # L_first from the first batch; lr_w decays with the learning rate (:138).
    # Fair-MTARD.py:142-151 (plugins=fair): each example's KL times its class weight, and the natural term's target
    # is the adversarial teacher at x' (Fair-MTARD.py:144; fair_mtard_nat_teacher='t2_nat' reads MTARD's T_nat(x)).
    kl_adv = weighted_kl(lg.s_adv, lg.t_adv, hp, info)
    kl_nat = weighted_kl(lg.s_nat, lg.t_adv if _mtard_nat_teacher(hp) == "t_adv" else lg.t2_nat, hp, info)
    v_adv = global_mean(jax.lax.stop_gradient(kl_adv), info)  # the global batch's losses, equal on every device
    v_nat = global_mean(jax.lax.stop_gradient(kl_nat), info)
    first = jnp.logical_not(state["initialized"])
    init_adv = jnp.where(first, v_adv, state["init_adv"])
    init_nat = jnp.where(first, v_nat, state["init_nat"])
    r_adv, r_nat = (v_adv / init_adv) ** hp["bert"], (v_nat / init_nat) ** hp["bert"]
    w_nat = state["w_nat"] - hp["weight_lr"] * info.lr_scale * (state["w_nat"] - r_nat / (r_adv + r_nat))
    loss = (1.0 - w_nat) * kl_adv + w_nat * kl_nat
    new_state = {"w_nat": w_nat, "init_adv": init_adv, "init_nat": init_nat, "initialized": jnp.array(True)}
    return loss, {"kl_adv_tadv": kl_adv, "kl_nat_t2nat": kl_nat, "w_nat": w_nat}, new_state


def _mtard_nat_teacher(hp):
    """The natural term's teacher forward: MTARD's T_nat(x), or Fair-MTARD's T_adv(x') (fair_mtard_nat_teacher)."""
    return hp.get("fair_mtard_nat_teacher", "t2_nat")


def _mtard_needs(hp, phase):
    return frozenset({"s_adv", "s_nat", "t_adv", _mtard_nat_teacher(hp)})


def _mtard_init(hp):
    return {"w_nat": jnp.asarray(hp["w_nat_init"], jnp.float32), "init_adv": jnp.ones((), jnp.float32),
            "init_nat": jnp.ones((), jnp.float32), "initialized": jnp.array(False)}  # distinct buffers (donated)


def _mmard(lg: Logits, y, state, hp, info):
    # Eq. 7: KL(S(x'), T(x')) + alpha L_TRD, L_TRD = reduce_b Huber_delta(psi_s - psi_t) (Eq. 5-6).
    kl_adv = kl(lg.s_adv, lg.t_adv, hp)
    if hp["alpha"] == 0.0:  # Eq. 4 alone (Figure 4, variant C)
        return kl_adv, {"kl_adv_tadv": kl_adv}, state
    trd = losses.trd_loss(lg.s_nat, lg.s_adv, lg.t_nat, lg.t_adv, y, hp["delta"],
                          use_probs=hp["trd_use_probs"], reduction=hp["trd_reduction"])
    if hp["trd_reduction"] == "sum":  # Eq. 6's sum runs over the global batch, whatever the device count
        trd = as_global_sum(trd, info)
    return kl_adv + hp["alpha"] * trd, {"kl_adv_tadv": kl_adv, "trd": trd}, state


def _mmard_needs(hp, phase):
    return frozenset({"s_adv", "t_adv"} | ({"s_nat", "t_nat"} if hp["alpha"] != 0.0 else set()))


def _mmard_check(hp):
    if hp["trd_reduction"] not in ("mean", "sum"):
        raise ValueError(f"trd_reduction must be 'mean' or 'sum', got {hp['trd_reduction']!r}")
    if hp["alpha"] == 0.0 and (hp["delta"], hp["trd_use_probs"], hp["trd_reduction"]) != (1.0, True, "mean"):
        raise ValueError("delta/trd_use_probs/trd_reduction are read only by the TRD term: alpha = 0 drops it")


OUTER = {
    "nature": Objective("nature", _nature, needs_of("s_nat"), order_of("s_nat"), {}),
    "sat": Objective("sat", _sat, needs_of("s_adv"), order_of("s_adv"), {}),
    # TRADES: beta 6 (train_trades_cifar10.py:36), KL summed over classes / B (trades.py:27, 81-82).
    "trades": Objective("trades", _trades, needs_of("s_adv", "s_nat"), order_of("s_nat", "s_adv", "s_nat"),
                        {"beta": 6.0, "kl_class_mean": False, **KL_REDUCTION}),
    # ARD: temp 30 (main.py:23), alpha 1 (main.py:26), KLDivLoss() mean over B*C (main.py:113); S(x') is the
    # attack's last forward (main.py:79) and S(x) always runs (main.py:126).
    "ard": Objective("ard", _ard, _ard_needs, order_of("s_adv", "s_nat"),
                     {"tau": 30.0, "alpha": 1.0, "kl_class_mean": True, **KL_REDUCTION}),
    # IAD: temp 1 (IAD-I.py:26), beta 0.1 (IAD-I.py:34), warm-up ('--begin') 60 epochs (IAD-I.py:35),
    # alpha 1 (IAD-I.py:29), KL summed over classes / B (IAD-I.py:152). Default form: the MMARD paper's Table 1.
    "iad": Objective("iad", _iad, _iad_needs, _iad_order,
                     {"tau": 1.0, "beta": 0.1, "warmup_epochs": 60, "alpha": 1.0, "iad_form": "table1",
                      "iad_teacher_input": "nat", "kl_class_mean": False, **KL_REDUCTION},
                     phases=("warmup", "main"), phase=_iad_phase, check=_iad_check),
    # RSLAD: alpha 5/6, torch.mean over B*C (resnet18_rslad_cifar10.py:61-63); S(x') then S(x)
    # (rslad_loss.py:58, resnet18_rslad_cifar10.py:57-58).
    "rslad": Objective("rslad", _rslad, needs_of("s_adv", "s_nat", "t_nat"), order_of("s_adv", "s_nat"),
                       {"alpha": 5.0 / 6.0, "kl_class_mean": True, **KL_REDUCTION}),
    # MTARD: weight lr 0.025 (mtard_resnet18_cifar10.py:19), bert 1 (:20), initial weights 1/2 (:44-47),
    # torch.mean over B*C (:79-80); S(x') then S(x) (mtard_loss.py:55, mtard_resnet18_cifar10.py:75-76).
    "mtard": Objective("mtard", _mtard, _mtard_needs, order_of("s_adv", "s_nat"),
                       {"weight_lr": 0.025, "bert": 1.0, "w_nat_init": 0.5, "kl_class_mean": True, **KL_REDUCTION},
                       init_state=_mtard_init),
    # MMARD: alpha 1 (paper section 4.1); delta 1, probabilities, batch mean and class-summed KL are our
    # choices where the paper publishes no code (docs/design.md). S(x) then S(x') as AdaAD (main.py:333-334).
    "mmard": Objective("mmard", _mmard, _mmard_needs, order_of("s_nat", "s_adv"),
                       {"alpha": 1.0, "delta": 1.0, "trd_use_probs": True, "trd_reduction": "mean",
                        "kl_class_mean": False, **KL_REDUCTION}, check=_mmard_check),
}

ROWS = {
    "nature": MethodRow("none", "nature", "none", source="the paper's natural training"),
    # Madry: one train-mode graph for the attack and the step (cifar10_challenge train.py:41, 57-62); uniform
    # start (pgd_attack.py:46-48).
    "sat": MethodRow("ce", "sat", "uniform", "train", source="MadryLab/cifar10_challenge train.py"),
    # Gaussian start 0.001 (trades.py:31), model.eval() during the attack (trades.py:28).
    "trades": MethodRow("kl_self", "trades", "gaussian", "eval", source="yaodongyu/TRADES trades.py"),
    # AttackPGD: uniform start (main.py:70), student in train mode (main.py:118).
    "ard": MethodRow("ce", "ard", "uniform", "train", source="goldblum/AdversariallyRobustDistillation main.py"),
    # ARD's AttackPGD, train mode (IAD-I.py:87-106, 159).
    "iad": MethodRow("ce", "iad", "uniform", "train", source="ZFancy/IAD IAD-I.py"),
    # model.eval() (rslad_loss.py:37), start x + 0.001 N(0, 1) (rslad_loss.py:40).
    "rslad": MethodRow("kl_teacher_nat", "rslad", "gaussian", "eval", source="zibojia/RSLAD rslad_loss.py"),
    # model.eval() (mtard_loss.py:38), start x + 0.001 N(0, 1) (mtard_loss.py:40), CE (mtard_loss.py:45).
    "mtard": MethodRow("ce", "mtard", "gaussian", "eval", source="zhaoshiji123/MTARD mtard/mtard_loss.py"),
    # Paper section 4.1 ("random start size of 0.001"); eval mode as AdaAD (AT_helper.py:14, 20-21).
    "mmard": MethodRow("kl_teacher_adv", "mmard", "gaussian", "eval", source="the MMARD paper; AdaAD's code"),
}

# Published settings that depend on the data set: (method, dataset) -> hyper-parameters.
DATASET_HPARAMS = {
    # resnet18_rslad_cifar100.py:63-65, "multiply 10 to keep consistent with CIFAR-10".
    ("rslad", "cifar100"): {"kl_scale": 10.0},
    # mtard/mtard_resnet18_cifar100.py:79-80.
    ("mtard", "cifar100"): {"kl_scale": 10.0},
}
