"""One training step of every method as its published script runs it: hyper-parameters, attack starts, the
sequence of forwards and the outer loss (file and line cited at each step); `peers.torch_step` runs them."""

import dataclasses
import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from peers.published_losses import ce_mean, ce_sum, iad_trust, kl_batchmean, kl_loss_rslad, kl_mean, kl_none, trd_loss

# Outer hyper-parameters per method: the published scripts' defaults (CIFAR-10).
HPARAMS = {
    "nature": {},
    "sat": {},
    "trades": {"beta": 6.0},  # train_trades_cifar10.py:36
    "ard": {"tau": 30.0, "alpha": 1.0},  # ARD main.py:23, :26
    "iad": {"tau": 1.0, "alpha": 1.0, "beta": 0.1, "begin": 60},  # IAD-I.py:26, :29, :34, :35
    "rslad": {"alpha": 5.0 / 6.0},  # resnet18_rslad_cifar10.py:63
    "mtard": {"weight_lr": 0.025, "bert": 1.0, "w_nat_init": 0.5},  # mtard_resnet18_cifar10.py:19-20, :44-47
    "mmard": {"alpha": 1.0, "delta": 1.0},  # the MMARD paper, section 4.1 (no published code)
    "adaad": {"alpha": 1.0},  # AdaAD main.py:41 (--AdaAD_alpha)
    "adaiad": {"tau": 30.0, "alpha": 1.0, "beta": 0.1, "begin": 60},  # AdaAD main.py:38, :44-46
    "igdm": {"igdm_alpha": 1.0, "igdm_epochs": 200.0},  # saad main.sh:8, igdm.py:59
    # PeerAiD README.md:31 (ResNet-18, CIFAR-10): T 5, lambda (0, 1, 1), gamma (1, 0.1), tau 1.
    "peeraid": {"temperature": 5.0, "lambda1": 0.0, "lambda2": 1.0, "lambda3": 1.0, "gamma1": 1.0, "gamma2": 0.1,
                "tau": 1.0},
    # NISP-official/Fair-ARD @910c8cd: Fair-ARD.py:21 (temp), :24 (alpha), :25 (beta); Fair-IAD.py:22, :25, :29-31;
    # Fair-RSLAD.py:12, :138; Fair-MTARD.py:16, :24-25, :86-89. `fair_eps`: Fair-ARD.py:120 (Fair-RSLAD.py:99: none).
    "fair_ard": {"tau": 30.0, "alpha": 1.0, "fair_beta": 2.0, "fair_eps": 1e-5},
    "fair_iad": {"tau": 1.0, "alpha": 1.0, "beta": 0.1, "begin": 60, "fair_beta": 2.0, "fair_eps": 1e-5},
    "fair_rslad": {"alpha": 5.0 / 6.0, "fair_beta": 2.0, "fair_eps": 0.0},
    "fair_mtard": {"weight_lr": 0.025, "bert": 1.0, "w_nat_init": 0.5, "fair_beta": 2.0, "fair_eps": 1e-5},
    # zhaoshiji123/ABSLD resnet18_absld_cifar10.py:125 (5/6), :69 (rate 0.1), :71-72 (temperatures in [0.5, 5]).
    "absld": {"alpha": 5.0 / 6.0, "temp_rate": 0.1, "temp_min": 0.5, "temp_max": 5.0},
    # HongsinLee/saad @295121c main.sh:8-10 (igdm_alpha 1, beta 0, gamma 1), args.py:15 (lambda_inner 1), args.py:20
    # (200 epochs); saad.py:76's literal 5 (args.py:13's entropy_scale, never read by the script).
    "saad": {"igdm_alpha": 1.0, "beta": 0.0, "gamma": 1.0, "lambda_inner": 1.0, "epochs": 200.0,
             "entropy_scale": 5.0},
    # kunsaram01/DGAD @a0329c8 main.py:42-43 (--ALP_beta 1.0, --alp on), :444-445 (a student other than mobilenetV2).
    "dgad": {"alp_beta": 1.0},
}
METHODS = tuple(HPARAMS)


@dataclasses.dataclass(frozen=True)
class Attack:
    """A method's inner maximization: its start and whether that start is clipped to [0, 1], and the student's
    BatchNorm mode while it runs."""

    start: str  # "none" | "uniform" (U(-eps, eps)) | "gaussian" (gaussian_scale * N(0, 1))
    student_bn: str  # "eval" | "train"
    clip_start: bool = False


ATTACKS = {
    "nature": Attack("none", "eval"),
    # cifar10_challenge pgd_attack.py:46-48 (uniform, clipped); one train-mode graph (train.py:41, 57-62).
    "sat": Attack("uniform", "train", clip_start=True),
    "trades": Attack("gaussian", "eval"),  # trades.py:28, :31
    "ard": Attack("uniform", "train"),  # ARD main.py:70 (not clamped), :118 net.train()
    "iad": Attack("uniform", "train"),  # IAD-I.py:97, :159
    "rslad": Attack("gaussian", "eval"),  # rslad_loss.py:37, :40
    "mtard": Attack("gaussian", "eval"),  # mtard_loss.py:38, :40
    "mmard": Attack("gaussian", "eval"),  # paper section 4.1 (random start 0.001), eval as AdaAD
    "adaad": Attack("gaussian", "eval"),  # AdaAD AT_helper.py:14, :20-21, :26-27
    "adaiad": Attack("gaussian", "eval"),  # AdaAD main.py:357-358 (the same attack)
    "igdm": Attack("gaussian", "eval"),  # saad igdm.py:49 -> AdaAD's attack
    "peeraid": Attack("gaussian", "eval"),  # PeerAiD attack_function.py:68, :71-72
    "fair_ard": Attack("uniform", "train"),  # Fair-ARD.py:63 (not clamped), :128 net.train()
    "fair_iad": Attack("uniform", "train"),  # Fair-IAD.py (ARD's AttackPGD), :157 net.train()
    "fair_rslad": Attack("gaussian", "eval"),  # Fair-RSLAD.py:51, :54
    "fair_mtard": Attack("gaussian", "eval"),  # Fair-MTARD.py:53, :55
    "absld": Attack("gaussian", "eval"),  # absld_loss.py:37, :40
    "saad": Attack("gaussian", "eval"),  # saad attacks.py:149, :164
    "dgad": Attack("gaussian", "eval"),  # DGAD main.py:391-392 -> AT_helper.py:20-27 (AdaAD's attack)
}

# What each published script's optimizer is (not used by default: see the module docstring).
PUBLISHED_OPTIMIZER = {
    "sat": "momentum 0.9, 0.0002 * sum ||W||^2 / 2 on conv/FC kernels only; lr 0.1 -> 0.01 @40k -> 0.001 @60k steps "
           "(cifar10_challenge config.json:16-18, model.py:145-151)",
    "trades": "SGD 0.1, momentum 0.9, wd 2e-4; x0.1 at epoch 75 of 76 (train_trades_cifar10.py:20-26, 137-147)",
    "ard": "SGD 0.1, momentum 0.9, wd 2e-4; 0.01 from epoch 100 (main.py:32-36, 168)",
    "iad": "as ARD (IAD-I.py:49-53, 224)",
    "rslad": "SGD 0.1, momentum 0.9, wd 2e-4; x0.1 after epochs 215/260/285 of 300 (resnet18_rslad_cifar10.py)",
    "mtard": "as RSLAD; weight lr 0.025 decays with it (mtard_resnet18_cifar10.py:39-42, 135-138)",
    "adaad": "SGD 0.1, momentum 0.9, wd 5e-4; x0.1 at epochs 100, 150 of 200 (AdaAD main.py:246-248, 113-128)",
    "adaiad": "as AdaAD",
    "igdm": "SGD 0.1, momentum 0.9, wd 2e-4; x0.1 after epochs 100, 150 of 200 (saad igdm.py:38, 95-97)",
    "peeraid": "two SGD, lr 0.1, momentum 0.9, wd 2e-4; /10 at epochs 214/259/284 of 300 (PeerAiD main.py:219-220)",
    "saad": "SGD 0.1, momentum 0.9, wd 2e-4; x0.1 after epochs 100, 150 of 200; SWA from epoch 95 (saad.py:39-42, "
            "91-94, 128-130)",
}


# Each function runs the published sequence for one batch and returns (loss, metrics). `n` gives the networks
# (`n.S`, `n.T`, `n.T2`, `n.P` run a forward; `n.train(...)`/`n.eval(...)` set BatchNorm modes), `n.pgd`, the
# hyper-parameters `n.hp` and the settings `n.s`. x, y: the augmented batch; epoch: 0-based.


def _nature(n, x, y, epoch):
    n.train("student")
    s_nat = n.S(x)
    loss = ce_mean(s_nat, y)
    return loss, {"ce_nat": loss}


def _sat(n, x, y, epoch):
    # One train-mode graph (cifar10_challenge train.py:41): 10x S(x'_k) with the summed xent (pgd_attack.py:26-27,
    # 53-59), then the train step on S(x') with the mean xent (train.py:51, 137).
    n.train("student")
    x_adv = n.pgd(lambda z: ce_sum(n.S(z), y), x)
    loss = ce_mean(n.S(x_adv), y)
    return loss, {"ce_adv": loss}


def _trades(n, x, y, epoch):
    # trades.py:28 eval; :31-41 the attack on sum KL(S(x) || S(x')); :73 train; :79-83 the loss.
    n.eval("student")
    with torch.no_grad():
        s_nat_eval = n.S(x)
    x_adv = n.pgd(lambda z: kl_none(n.S(z), s_nat_eval).sum(), x)
    n.train("student")
    logits = n.S(x)  # :79
    s_adv = n.S(x_adv)  # :81
    s_nat = n.S(x)  # :82, the KL target, not detached
    ce = ce_mean(logits, y)
    kl = kl_none(s_adv, s_nat).sum() / x.shape[0]  # (1 / batch_size) * KLDivLoss(size_average=False)
    return ce + n.hp["beta"] * kl, {"ce_nat": ce, "kl_adv_nat": kl}


def _ard(n, x, y, epoch):
    # ARD main.py:118 net.train(); AttackPGD.forward :68-79; :125 T(x); :126 S(x) (always); :127 the loss.
    tau, a = n.hp["tau"], n.hp["alpha"]
    n.train("student")
    x_adv = n.pgd(lambda z: ce_sum(n.S(z), y), x)
    s_adv = n.S(x_adv)  # :79, AttackPGD's last forward
    with torch.no_grad():
        t_nat = n.T(x)
    s_nat = n.S(x)
    kl = kl_mean(s_adv, t_nat, tau)
    loss = a * tau * tau * kl + (1.0 - a) * ce_mean(s_nat, y)
    return loss, {"kl_adv_tnat": kl}


def _iad(n, x, y, epoch):
    # IAD-I.py:159 net.train(); :165 T(x); :166 the attack (ARD's AttackPGD) + S(x'); :169 S(x') again (`basicop`,
    # detached, unused); :170 T(x'); :174-178 the trust; :179 after `begin` (terms evaluated left to right), :181
    # before.
    tau, a, hp = n.hp["tau"], n.hp["alpha"], n.hp
    n.train("student")
    with torch.no_grad():
        t_nat = n.T(x)
    x_adv = n.pgd(lambda z: ce_sum(n.S(z), y), x)
    s_adv = n.S(x_adv)
    n.S(x_adv).detach()  # basicop
    with torch.no_grad():
        guide = n.T(x_adv)
    b = x.shape[0]
    kl_t = kl_none(s_adv, t_nat, tau).sum(1).sum() / b
    if epoch >= hp["begin"]:
        trust = iad_trust(guide, y, hp["beta"])
        kl_s = ((1.0 - trust) * kl_none(s_adv, n.S(x)).sum(1)).sum() / b
        loss = a * tau * tau * kl_t + a * kl_s + (1.0 - a) * ce_mean(n.S(x), y)
        return loss, {"kl_adv_teacher": kl_t, "trust": trust.mean()}
    loss = a * tau * tau * kl_t + (1.0 - a) * ce_mean(n.S(x), y)
    return loss, {"kl_adv_teacher": kl_t}


def _rslad(n, x, y, epoch):
    # resnet18_rslad_cifar10.py:55-56 T(x) (no_grad); rslad_loss.py:37 eval, :40-51 the attack on
    # sum KL(T(x) || S(x')), :53 train, :58 S(x'); the script's :57-58 S(x), :59-63 the loss.
    exact = n.s.kl_form == "exact"
    with torch.no_grad():
        t_nat = n.T(x)
    n.eval("student")
    x_adv = n.pgd(lambda z: kl_none(n.S(z), t_nat).sum(), x)
    n.train("student")
    s_adv = n.S(x_adv)
    s_nat = n.S(x)
    p_t = F.softmax(t_nat, dim=1)
    kl_adv = kl_loss_rslad(F.log_softmax(s_adv, dim=1), p_t, exact).mean()  # torch.mean over B*C
    kl_nat = kl_loss_rslad(F.log_softmax(s_nat, dim=1), p_t, exact).mean()
    a = n.hp["alpha"]
    return a * kl_adv + (1.0 - a) * kl_nat, {"kl_adv_tnat": kl_adv, "kl_nat_tnat": kl_nat}


def _mtard(n, x, y, epoch):
    # mtard_resnet18_cifar10.py:72-73 T_nat(x); mtard_loss.py:38 eval, :40-49 the attack on CE mean, :51 train,
    # :55 S(x'), :56-57 T_adv(x'); the script's :75-76 S(x), :77-80 the KLs, :82-98 the weights, :100 the loss.
    exact, hp, st = n.s.kl_form == "exact", n.hp, n.state
    with torch.no_grad():
        t_nat = n.T2(x)
    n.eval("student")
    x_adv = n.pgd(lambda z: ce_mean(n.S(z), y), x)
    n.train("student")
    s_adv = n.S(x_adv)
    with torch.no_grad():
        t_adv = n.T(x_adv)
    s_nat = n.S(x)
    kl_adv = kl_loss_rslad(F.log_softmax(s_adv, dim=1), F.softmax(t_adv, dim=1), exact).mean()
    kl_nat = kl_loss_rslad(F.log_softmax(s_nat, dim=1), F.softmax(t_nat, dim=1), exact).mean()
    if st.get("init_adv") is None:  # :82-85, from the very first batch
        st["init_adv"], st["init_nat"] = kl_adv.item(), kl_nat.item()
    r_adv = (kl_adv.item() / st["init_adv"]) ** hp["bert"]
    r_nat = (kl_nat.item() / st["init_nat"]) ** hp["bert"]
    weight_lr = hp["weight_lr"] * n.lr / n.s.lr  # decayed with the learning rate (:135-138)
    st["w_nat"] = st["w_nat"] - weight_lr * (st["w_nat"] - r_nat / (r_adv + r_nat))
    w_adv = 1.0 - st["w_nat"]
    loss = w_adv * kl_adv + st["w_nat"] * kl_nat
    return loss, {"kl_adv_tadv": kl_adv, "kl_nat_t2nat": kl_nat, "w_nat": st["w_nat"]}


def _adaad_attack(n, x):
    """AdaAD AT_helper.py:8-48: student and teacher in eval, sum KL(T(x') || S(x')) differentiated through both."""
    n.eval("student")
    return n.pgd(lambda z: kl_none(n.S(z), n.T(z)).sum(), x)


def _mmard(n, x, y, epoch):
    # The MMARD paper (Eq. 3, 7; section 4.1), no published code: AdaAD's attack, then S(x), S(x') in train mode
    # as AdaAD main.py:333-334; KL(S(x'), T(x')) summed over classes / B, plus alpha L_TRD.
    x_adv = _adaad_attack(n, x)
    with torch.no_grad():
        t_nat, t_adv = n.T(x), n.T(x_adv)
    n.train("student")
    s_nat = n.S(x)
    s_adv = n.S(x_adv)
    kl = kl_batchmean(s_adv, t_adv)
    trd = trd_loss(s_nat, s_adv, t_nat, t_adv, y, n.hp["delta"])
    return kl + n.hp["alpha"] * trd, {"kl_adv_tadv": kl, "trd": trd}


def _adaad(n, x, y, epoch):
    # AdaAD main.py:326-353: the attack, net.train(), S(x), S(x'), T(x), T(x') (no_grad); nn.KLDivLoss() (mean over
    # B*C) on CIFAR-10 (:341-345); alpha * kl1 + (1 - alpha) * kl2 (:353).
    x_adv = _adaad_attack(n, x)
    n.train("student")
    s_nat = n.S(x)
    s_adv = n.S(x_adv)
    with torch.no_grad():
        t_nat, t_adv = n.T(x), n.T(x_adv)
    kl_adv, kl_nat = kl_mean(s_adv, t_adv), kl_mean(s_nat, t_nat)
    a = n.hp["alpha"]
    return a * kl_adv + (1.0 - a) * kl_nat, {"kl_adv_tadv": kl_adv}


def _adaiad(n, x, y, epoch):
    # AdaAD main.py:355-381 (--method AdaAD_with_IAD1): the attack; S(x), S(x') (:360-361); T(x') twice (:365-366,
    # eval); after IAD_begin (:371-378) the KL target S(x) and the CE's S(x), before it (:380-381) the CE's S(x).
    tau, a, hp = n.hp["tau"], n.hp["alpha"], n.hp
    x_adv = _adaad_attack(n, x)
    n.train("student")
    n.S(x)  # ori_outputs, unused by this loss
    s_adv = n.S(x_adv)
    with torch.no_grad():
        guide = n.T(x_adv)
        t_adv = n.T(x_adv)
    b = x.shape[0]
    kl_t = kl_none(s_adv, t_adv, tau).sum(1).sum() / b
    if epoch >= hp["begin"]:
        trust = iad_trust(guide, y, hp["beta"])
        kl_s = ((1.0 - trust) * kl_none(s_adv, n.S(x)).sum(1)).sum() / b  # softmax(S(x)) not detached
        loss = a * tau * tau * kl_t + a * kl_s + (1.0 - a) * ce_mean(n.S(x), y)
        return loss, {"kl_adv_teacher": kl_t, "trust": trust.mean()}
    return a * tau * tau * kl_t + (1.0 - a) * ce_mean(n.S(x), y), {"kl_adv_teacher": kl_t}


def _igdm(n, x, y, epoch):
    # HongsinLee/saad igdm.py:49-59 (AdaAD + IGDM, CIFAR-10; eps/step as IG/WR, see the docstring): the AdaAD
    # attack; delta = x' - x; T(x+d), T(x-d) (no_grad); S(x+d), S(x-d) in train mode (no clean forward);
    # KL_batchmean(S(x+d) || T(x')) + igdm_alpha * (epoch / 200) * KL_batchmean(S(x+d) - S(x-d) || T(x+d) - T(x-d)),
    # the epoch counted from 1 (igdm.py:43); the mirrored point is not clipped.
    x_adv = _adaad_attack(n, x)
    with torch.no_grad():
        delta = x_adv - x
        t_plus, t_minus = n.T(x + delta), n.T(x - delta)
    n.train("student")
    s_plus = n.S(x + delta)
    s_minus = n.S(x - delta)
    kl = kl_batchmean(s_plus, t_plus)
    term = kl_batchmean(s_plus - s_minus, t_plus - t_minus)
    weight = n.hp["igdm_alpha"] * (epoch + 1) / n.hp["igdm_epochs"]
    return kl + weight * term, {"kl_adv_tadv": kl, "igdm": term}


def _peeraid(n, x, y, epoch):
    # PeerAiD main.py:342-404: P(x) in eval (no_grad, :346-350); the attack on the student against it
    # (attack_function.py:59-84, sum KL); :359 P(x'), :361 S(x'), :363 the peer loss (S(x') not detached),
    # :376 S(x') again, :387 S(x), :393-397 the student loss (P(x') detached, S(x) not); one backward of the sum.
    hp, t, tau = n.hp, n.hp["temperature"], n.hp["tau"]
    n.eval("peer")
    with torch.no_grad():
        p_nat = n.P(x)
    n.train("peer")
    n.eval("student")
    x_adv = n.pgd(lambda z: kl_none(n.S(z), p_nat).sum(), x)
    n.train("student")
    p_adv = n.P(x_adv)
    s_target = n.S(x_adv)
    loss_peer = hp["gamma1"] * ce_mean(p_adv, y) + hp["gamma2"] * tau * tau * kl_mean(p_adv, s_target, tau)
    p_detached = p_adv.detach()
    s_adv = n.S(x_adv)
    s_nat = n.S(x)
    loss_student = (hp["lambda1"] * ce_mean(s_adv, y) + hp["lambda2"] * t * t * kl_mean(s_adv, p_detached, t)
                    + hp["lambda3"] * t * t * kl_mean(s_adv, s_nat, t))
    return loss_peer + loss_student, {"peer_loss": loss_peer, "student_loss": loss_student}


def _counting(n, y, loss_of):
    """An attack objective that also counts, per example, the iterates at which the student predicts the label
    (AttackPGD.forward's Kappa, Fair-ARD.py:66-71; the same loop in every Fair script), into n.state['kappa']."""
    n.state["kappa"] = torch.zeros(len(y), dtype=torch.long)

    def objective(z):
        out = n.S(z)
        n.state["kappa"].add_((out.max(1, keepdim=True)[1][:, 0] == y).long())
        return loss_of(out)

    return objective


def _tally(n, y):
    for i in range(len(y)):  # Fair-ARD.py:134-135: Kappa_total[targets[i]] += Kappa[i]
        n.state["kappa_total"][y[i]] += n.state["kappa"][i]


def _fair_ard(n, x, y, epoch):
    # Fair-ARD.py:128 net.train(); AttackPGD.forward :60-78 with Kappa; :134-135 Kappa_total; :136 T(x); :137 S(x);
    # :140-148 each example's KLDivLoss() (its KL / C) and CE times reweight[y], then (1 / B) sum.
    tau, a, w = n.hp["tau"], n.hp["alpha"], n.state["reweight"]
    n.train("student")
    x_adv = n.pgd(_counting(n, y, lambda out: ce_sum(out, y)), x)
    s_adv = n.S(x_adv)  # :78, AttackPGD's last forward
    _tally(n, y)
    with torch.no_grad():
        t_nat = n.T(x)
    s_nat = n.S(x)
    kl_class, ce_class = [], []
    for i in range(len(s_adv)):
        kl_class.append(kl_mean(s_adv[i:i + 1], t_nat[i:i + 1], tau) * w[y[i]])
        ce_class.append(ce_mean(s_nat[i:i + 1], y[i:i + 1]) * w[y[i]])
    kl = (1 / len(s_adv)) * torch.sum(torch.stack(kl_class))
    ce = (1 / len(s_adv)) * torch.sum(torch.stack(ce_class))
    return a * tau * tau * kl + (1.0 - a) * ce, {"kl_adv_tnat": kl}


def _fair_iad(n, x, y, epoch):
    # Fair-IAD.py:157 net.train(); :163 T(x); :164 the attack with Kappa + S(x') (:94); :165 S(x); :166-167
    # Kappa_total; :170 S(x') again (`basicop`, unused); :171 T(x'); :173-192 after `begin`, :194-199 before.
    tau, a, hp, w = n.hp["tau"], n.hp["alpha"], n.hp, n.state["reweight"]
    n.train("student")
    with torch.no_grad():
        t_nat = n.T(x)
    x_adv = n.pgd(_counting(n, y, lambda out: ce_sum(out, y)), x)
    s_adv = n.S(x_adv)
    s_nat = n.S(x)
    _tally(n, y)
    n.S(x_adv).detach()  # basicop
    with torch.no_grad():
        guide = n.T(x_adv)
    b, wy = x.shape[0], w[y]
    kl_t = (kl_none(s_adv, t_nat, tau).sum(1) * wy).sum() / b
    if epoch >= hp["begin"]:
        trust = iad_trust(guide, y, hp["beta"])
        kl_s = (kl_none(s_adv, s_nat).sum(1) * (1.0 - trust) * wy).sum() / b
        ce = (F.cross_entropy(s_adv, y, reduction="none") * wy).sum() / b  # :185, on S(x')
        return a * tau * tau * kl_t + a * kl_s + (1.0 - a) * ce, {"kl_adv_teacher": kl_t, "trust": trust.mean()}
    return a * tau * tau * kl_t, {"kl_adv_teacher": kl_t}


def _fair_rslad(n, x, y, epoch):
    # Fair-RSLAD.py:118-119 T(x); :51 eval, :54-71 the attack on sum KL with Kappa; :73, :78 train, S(x'); :122-123
    # Kappa_total; :125 S(x); :129-138 each example's kl_loss times reweight[y], (1 / B) sum, then torch.mean over C.
    exact, w = n.s.kl_form == "exact", n.state["reweight"]
    with torch.no_grad():
        t_nat = n.T(x)
    n.eval("student")
    x_adv = n.pgd(_counting(n, y, lambda out: kl_none(out, t_nat).sum()), x)
    n.train("student")
    s_adv = n.S(x_adv)
    _tally(n, y)
    s_nat = n.S(x)
    p_t, wy = F.softmax(t_nat, dim=1), w[y][:, None]
    kl_adv = (kl_loss_rslad(F.log_softmax(s_adv, dim=1), p_t, exact) * wy).sum(0).div(len(y)).mean()
    kl_nat = (kl_loss_rslad(F.log_softmax(s_nat, dim=1), p_t, exact) * wy).sum(0).div(len(y)).mean()
    a = n.hp["alpha"]
    return a * kl_adv + (1.0 - a) * kl_nat, {"kl_adv_tnat": kl_adv, "kl_nat_tnat": kl_nat}


def _fair_mtard(n, x, y, epoch):
    # Fair-MTARD.py:134 T_nat(x) (never read: not run here); :53 eval, :55-70 the attack on CE mean with Kappa;
    # :72, :76 train, S(x'); :78 T_adv(x'); :136-137 Kappa_total; :139 S(x); :142-151 each example's kl_loss times
    # reweight[y], BOTH against T_adv(x') (:144); :153-171 MTARD's weights on the weighted losses.
    exact, hp, st, w = n.s.kl_form == "exact", n.hp, n.state, n.state["reweight"]
    n.eval("student")
    x_adv = n.pgd(_counting(n, y, lambda out: ce_mean(out, y)), x)
    n.train("student")
    s_adv = n.S(x_adv)
    with torch.no_grad():
        t_adv = n.T(x_adv)
    _tally(n, y)
    s_nat = n.S(x)
    p_t, wy = F.softmax(t_adv, dim=1), w[y][:, None]
    kl_adv = (kl_loss_rslad(F.log_softmax(s_adv, dim=1), p_t, exact) * wy).sum(0).div(len(y)).mean()
    kl_nat = (kl_loss_rslad(F.log_softmax(s_nat, dim=1), p_t, exact) * wy).sum(0).div(len(y)).mean()
    if st.get("init_adv") is None:  # :153-156
        st["init_adv"], st["init_nat"] = kl_adv.item(), kl_nat.item()
    r_adv = (kl_adv.item() / st["init_adv"]) ** hp["bert"]
    r_nat = (kl_nat.item() / st["init_nat"]) ** hp["bert"]
    weight_lr = hp["weight_lr"] * n.lr / n.s.lr  # decayed with the learning rate (:188)
    st["w_nat"] = st["w_nat"] - weight_lr * (st["w_nat"] - r_nat / (r_adv + r_nat))
    loss = (1.0 - st["w_nat"]) * kl_adv + st["w_nat"] * kl_nat
    return loss, {"kl_adv_tadv": kl_adv, "kl_nat_tadv": kl_nat, "w_nat": st["w_nat"]}


def fair_weight_assign(kappa_total: torch.Tensor, examples: int, beta: float, eps: float) -> torch.Tensor:
    """Fair-ARD.py:166 (Kappa_total / (N / C)) and weight_assign :116-125 (Fair-RSLAD.py:99: eps 0): the next
    epoch's class weights."""
    num_classes = kappa_total.shape[0]
    kappa = kappa_total.double() / (examples / num_classes)
    reweight = (1 / (kappa + eps)) ** beta
    reweight = reweight * (num_classes / torch.sum(reweight))
    return torch.clamp(reweight, min=5 / 6, max=5 / 2)


def _absld(n, x, y, epoch):
    # resnet18_absld_cifar10.py:94-100: T(x) without gradient, then two `.detach()` views of it (one storage)
    # divided in place row by row, by tau_adv[y] and by tau_nat[y]: both names end as T / tau_adv[y] / tau_nat[y].
    # absld_loss.py:37 eval, :40-51 the attack on sum KL(softmax(teacher_logits_new_adv) || S(x')) (:104 passes
    # the adversarial name), :53 train, :58 S(x'); the script's :105-106 S(x); :113-119 per-class CE sums;
    # :121-125 the loss on log(softmax(.)) and the two names' softmax, torch.mean over B*C.
    exact, st = n.s.kl_form == "exact", n.state
    with torch.no_grad():
        teacher_logits = n.T(x).detach()
        teacher_logits_new_adv = teacher_logits.detach()
        teacher_logits_new_nat = teacher_logits.detach()
        for i in range(y.shape[0]):
            teacher_logits_new_adv[i] = teacher_logits_new_adv[i] / st["temp_adv"][y[i]]
            teacher_logits_new_nat[i] = teacher_logits_new_nat[i] / st["temp_nat"][y[i]]
    n.eval("student")
    x_adv = n.pgd(lambda z: kl_none(n.S(z), teacher_logits_new_adv).sum(), x)
    n.train("student")
    s_adv = n.S(x_adv)
    s_nat = n.S(x)
    with torch.no_grad():
        record_adv = F.cross_entropy(s_adv.detach(), y, reduction="none")
        record_nat = F.cross_entropy(s_nat.detach(), y, reduction="none")
        for i in range(y.shape[0]):
            st["loss_adv"][y[i]] = st["loss_adv"][y[i]] + record_adv[i]
            st["loss_nat"][y[i]] = st["loss_nat"][y[i]] + record_nat[i]
    kl_adv = kl_loss_rslad(torch.log(F.softmax(s_adv, dim=1)), F.softmax(teacher_logits_new_adv, dim=1), exact).mean()
    kl_nat = kl_loss_rslad(torch.log(F.softmax(s_nat, dim=1)), F.softmax(teacher_logits_new_nat, dim=1), exact).mean()
    a = n.hp["alpha"]
    return a * kl_adv + (1.0 - a) * kl_nat, {"kl_adv_tnat": kl_adv, "kl_nat_tnat": kl_nat}


def _dgad(n, x, y, epoch):
    # DGAD main.py:390-447 (--method DGAD): AdaAD's attack (:391-392, AT_helper.py:8-48), net.train(), S(x), S(x')
    # (:394-398), T(x), T(x') without gradient (:403-406); the split, the swaps in place and the loss as written
    # (:409-445); args.bs is the batch's size here (the loader's full batches).
    x_adv = _adaad_attack(n, x)
    n.train("student")
    ori_outputs = n.S(x)
    adv_outputs = n.S(x_adv)
    with torch.no_grad():
        t_ori_outputs = n.T(x)
        t_adv_outputs = n.T(x_adv)
    targets, bs = y, x.shape[0]
    lam = torch.zeros(x.size(0))
    t_misclassified_group = torch.argmax(t_ori_outputs, dim=1) != targets
    lam[t_misclassified_group] = 1.0
    num_lambda = lam.sum().item()
    ori_true_probs = torch.gather(t_ori_outputs, 1, targets.unsqueeze(1)).squeeze()
    ori_max_probs, ori_max_indices = torch.max(t_ori_outputs, dim=1)
    g = t_misclassified_group
    t_ori_outputs[g, targets[g]] = ori_max_probs[g]
    t_ori_outputs[g, ori_max_indices[g]] = ori_true_probs[g]
    correct_probs = torch.gather(t_adv_outputs, 1, targets.unsqueeze(1)).squeeze()
    max_probs, max_indices = torch.max((t_adv_outputs.scatter(1, targets.unsqueeze(1), -float("inf"))), dim=1)
    mask = (correct_probs - max_probs) < 0
    t_adv_outputs[mask, targets[mask]] = max_probs[mask]
    t_adv_outputs[mask, max_indices[mask]] = correct_probs[mask]
    loss_clean = (1 / (num_lambda + 1e-10)) * torch.sum(lam * kl_none(ori_outputs, t_ori_outputs.detach()).sum(dim=1))
    loss_adv = (1 / (len(x_adv) - num_lambda)) * torch.sum(
        (1 - lam) * kl_none(adv_outputs, t_adv_outputs.detach()).sum(dim=1))
    loss_alp = torch.nn.MSELoss()(F.softmax(adv_outputs, dim=1), F.softmax(ori_outputs, dim=1))
    loss = (num_lambda / bs) * loss_clean + ((bs - num_lambda) / bs) * loss_adv + n.hp["alp_beta"] * loss_alp
    return loss, {"dgad_clean": loss_clean, "dgad_adv": loss_adv, "dgad_pcr": loss_alp,
                  "dgad_teacher_mistakes": num_lambda, "dgad_adv_swapped": float(((1 - lam) * mask).sum())}


def absld_temp_update(temp: torch.Tensor, total_loss: torch.Tensor, rate: float, hp) -> torch.Tensor:
    """resnet18_absld_cifar10.py:178-180 (and :187-189, the same for the natural temperatures): the next epoch's
    temperatures from the epoch's per-class loss sums; `rate`: 0.1 x0.1 at each learning-rate decay (:173-176)."""
    loss_gap = total_loss - torch.mean(total_loss)
    temp = temp - rate * loss_gap / torch.max(torch.abs(loss_gap))
    return torch.clamp(temp, hp["temp_min"], hp["temp_max"])


def _saad_samplewise_kl(input_logits, target_logits):
    """saad utils.py:26-41: sum over classes of F.kl_div(log_softmax(input), softmax(target) without grad)."""
    with torch.no_grad():
        p = F.softmax(target_logits, dim=1)
    return F.kl_div(F.log_softmax(input_logits, dim=1), p, reduction="none").sum(dim=1)


def _saad_renyi_entropy(logits, alpha, eps=1e-12):
    """saad utils.py:43-53."""
    p = F.softmax(logits, dim=1)
    if abs(alpha - 1.0) < 1e-6:
        return -(p * torch.log(p + eps)).sum(dim=1)
    return torch.log((p ** alpha).sum(dim=1) + eps) / (1.0 - alpha)


def _saad(n, x, y, epoch):
    # HongsinLee/saad @295121c saad.py:53-54 T(x) (no_grad); saad_inner_loss (attacks.py:138-194, called at
    # saad.py:56): student eval (:149), T(x) with the input gradient of sum_b T_{y_b}(x_b) (:152-163), start
    # x + 0.001 N(0, 1) (:164), 10 sign steps on KLDivLoss(sum)(log_softmax(S(x')), softmax(c)), c = T(x) with
    # c[b, y_b] += lambda_inner <grad_b, x'_b - x_b> built under enable_grad (:165-189); saad.py:59-62 T(x'), T(x - d);
    # :64-66 S(x'), S(x - d), S(x) in train mode; :68-82 the weights and the loss; the epoch 1-based (:46).
    hp = n.hp
    with torch.no_grad():
        teacher_clean = n.T(x)
    n.eval("student")
    x_temp = x.detach().clone().requires_grad_(True)
    teacher_logits = n.T(x_temp)
    rows = torch.arange(x.shape[0])
    (teacher_gradient_for_y,) = torch.autograd.grad(teacher_logits[rows, y].sum(), x_temp)

    def objective(x_adv):
        teacher_logit_correction = torch.einsum("bchw,bchw->b", teacher_gradient_for_y, x_adv - x)
        corrected = teacher_logits.detach().clone()
        corrected[rows, y] += hp["lambda_inner"] * teacher_logit_correction
        return F.kl_div(F.log_softmax(n.S(x_adv), dim=1), F.softmax(corrected, dim=1), reduction="sum")

    inputs_adv = n.pgd(objective, x)
    n.train("student")
    with torch.no_grad():
        delta = inputs_adv - x
        teacher_plus = n.T(inputs_adv)
        teacher_minus = n.T(x - delta)
    student_plus = n.S(inputs_adv)
    student_minus = n.S(x - delta)
    student_clean = n.S(x)
    teacher_ent_per = _saad_renyi_entropy(teacher_plus, hp["gamma"])
    kl_adv = _saad_samplewise_kl(student_plus, teacher_plus)
    kl_clean = _saad_samplewise_kl(student_clean, teacher_clean)
    igdm = hp["igdm_alpha"] * ((epoch + 1) / hp["epochs"]) * _saad_samplewise_kl(student_plus - student_minus,
                                                                                teacher_plus - teacher_minus)
    min_ent = teacher_ent_per.min().item()
    w = torch.clamp(hp["entropy_scale"] * (teacher_ent_per - min_ent), min=0.0)
    w_norm = (w - w.min()) / (w.max() - w.min() + 1e-8)
    loss = (w * (kl_adv + igdm) + hp["beta"] * (1 - w_norm) * kl_clean).mean()
    return loss, {"kl_adv_tadv": kl_adv.mean(), "igdm": igdm.mean()}


STEPS: Dict[str, Callable] = {
    "nature": _nature, "sat": _sat, "trades": _trades, "ard": _ard, "iad": _iad, "rslad": _rslad, "mtard": _mtard,
    "mmard": _mmard, "adaad": _adaad, "adaiad": _adaiad, "igdm": _igdm, "peeraid": _peeraid, "fair_ard": _fair_ard,
    "fair_iad": _fair_iad, "fair_rslad": _fair_rslad, "fair_mtard": _fair_mtard, "absld": _absld, "saad": _saad,
    "dgad": _dgad,
}
# The networks each method uses besides the student.
NETWORKS = {"ard": ("teacher",), "iad": ("teacher",), "rslad": ("teacher",), "mtard": ("teacher", "teacher2"),
            "mmard": ("teacher",), "adaad": ("teacher",), "adaiad": ("teacher",), "igdm": ("teacher",),
            "peeraid": ("peer",), "fair_ard": ("teacher",),
            "fair_iad": ("teacher",), "fair_rslad": ("teacher",), "fair_mtard": ("teacher",), "absld": ("teacher",),
            "saad": ("teacher",), "dgad": ("teacher",), "ciard": ("rteacher", "teacher2")}
TRAINED = ("student", "peer")


# CIARD (eminentgu/CIARD @93a9a2d; CIARD2025/CIARD is the same commit): its step as CIARD.py:192-293 runs it, with
# its own optimizers and teacher state, outside STEPS (the robust teacher is trained by its own optimizer and backward).
CIARD_HPARAMS = {"temp_lr": 0.001, "temp_min": 1.0, "temp_max": 10.0, "push_T": 5.0, "teacher_lr": 0.0001,
                 "epochs": 300}  # CIARD.py:169, :178-179, :111, :148, :33


def ciard_kl_loss(a, b):
    """CIARD.py:91-93."""
    return -a * b + torch.log(b + 1e-5) * b


def ciard_entropy_value(a):
    """CIARD.py:95-97."""
    return torch.log(a + 1e-5) * a


def ciard_scale_to_magnitude(a, b, c):
    """CIARD.py:99-109 (returns the scale factor, not scaled c)."""
    if math.isclose(a, 0, rel_tol=1e-9):
        a += 1e-7
    if math.isclose(b, 0, rel_tol=1e-9):
        b += 1e-7
    if math.isclose(c, 0, rel_tol=1e-9):
        c += 1e-7
    target = min(math.floor(math.log10(abs(a))), math.floor(math.log10(abs(b))))
    return 10 ** (target - math.floor(math.log10(abs(c))))


def ciard_push_loss(teacher_logits, students_logits, labels, T=5):
    """CIARD.py:111-122."""
    diff_indices = (torch.argmax(teacher_logits, dim=1) != labels).nonzero(as_tuple=True)[0]
    return ciard_kl_loss(F.log_softmax(students_logits[diff_indices] / T, dim=1),
                         F.softmax(teacher_logits[diff_indices].detach(), dim=1))


class CiardScript:
    """CIARD.py's training step on given modules: the student's SGD (0.1, momentum 0.9, wd 2e-4, :76), the robust
    teacher's (1e-4, momentum 0.1, wd 2e-4, :148-149), the temperatures and their rate as the script's Python floats
    (:169, :175-176). `step(x, y, noise, epoch)` with x the augmented batch and `noise` the attack's start offset
    (mtard_loss.py:42's 0.001 randn, given); `epoch` 1-based as the script's loop."""

    def __init__(self, student, teacher, teacher_nat, hp=None, steps=10, eps=8 / 255.0, step_size=2 / 255.0):
        self.student, self.teacher, self.teacher_nat = student, teacher, teacher_nat
        self.hp = dict(CIARD_HPARAMS, **(hp or {}))
        self.steps, self.eps, self.step_size = steps, eps, step_size
        self.optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        self.teacher_optimizer = torch.optim.SGD(teacher.parameters(), lr=self.hp["teacher_lr"], momentum=0.1,
                                                 weight_decay=2e-4)
        self.temp_adv, self.temp_nat, self.temp_learn_rate = 1.0, 1.0, self.hp["temp_lr"]
        teacher.train()  # :151
        teacher_nat.eval()  # :165

    def _inner(self, x_natural, y, noise):
        """robust_inner_loss_push (mtard_loss.py:27-64) with its 0.001 randn start given."""
        model = self.student
        model.eval()
        x_adv = x_natural.detach() + noise
        for _ in range(self.steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_ce = F.cross_entropy(model(x_adv), y)
            grad = torch.autograd.grad(loss_ce, [x_adv])[0]
            x_adv = x_adv.detach() + self.step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x_natural - self.eps), x_natural + self.eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
        model.train()
        self.teacher.train()
        self.teacher_nat.eval()
        x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
        self.optimizer.zero_grad()
        self.teacher_optimizer.zero_grad()
        return model(x_adv), self.teacher(x_adv), self.teacher_nat(x_adv)

    def step(self, x, y, noise, epoch):
        hp = self.hp
        self.student.train()  # :193-194
        self.teacher.train()
        self.optimizer.zero_grad()
        self.teacher_optimizer.zero_grad()
        student_nat_logits = self.student(x)  # :201
        with torch.no_grad():
            teacher_nat_logits = self.teacher_nat(x)  # :203
            self.teacher(x)  # :204 (adv_teacher_nat: read by nothing)
        student_adv_logits, teacher_adv_logits, nat_adv_logits = self._inner(x, y, noise)  # :206-210
        kl1 = ciard_kl_loss(F.log_softmax(student_adv_logits, dim=1),
                            F.softmax(teacher_adv_logits.detach() / self.temp_adv, dim=1)).mean()  # :212, :214
        kl2 = ciard_kl_loss(F.log_softmax(student_nat_logits, dim=1),
                            F.softmax(teacher_nat_logits.detach() / self.temp_nat, dim=1)).mean()  # :213, :215
        h_adv = torch.mean(ciard_entropy_value(F.softmax(teacher_adv_logits.detach() / self.temp_adv, dim=1)))
        h_nat = torch.mean(ciard_entropy_value(F.softmax(teacher_nat_logits.detach() / self.temp_nat, dim=1)))
        temps_used = (self.temp_adv, self.temp_nat)
        self.temp_adv = self.temp_adv - self.temp_learn_rate * torch.sign(h_adv / h_nat - 1).item()  # :218-221
        self.temp_nat = self.temp_nat - self.temp_learn_rate * torch.sign(h_nat / h_adv - 1).item()
        self.temp_adv = max(min(hp["temp_max"], self.temp_adv), hp["temp_min"])
        self.temp_nat = max(min(hp["temp_max"], self.temp_nat), hp["temp_min"])
        total_loss = 1 * kl1 + 1 * kl2  # :242
        kl3 = ciard_push_loss(nat_adv_logits, student_adv_logits, y, hp["push_T"])  # :245
        weight = 0.0
        if torch.isnan(kl3).any() or kl3.numel() == 0:  # :246-251
            kl3 = torch.tensor(0.0)
        else:
            kl3 = torch.mean(kl3)
            weight = ciard_scale_to_magnitude(float(kl1.item()), float(kl2.item()), float(kl3.item()))
            total_loss = total_loss - weight * kl3
        e = hp["epochs"]
        if epoch < 150:  # :262-270
            lr = 0.1
        else:
            lr = 0.1 * (0.5 + 0.5 * math.cos(math.pi * (epoch - 150) / (e - 150))) * math.exp(
                -0.01 * (epoch - 150) ** 2 / (e - 150) ** 2)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if epoch < 50:  # :272-282
            teacher_lr = 0
        else:
            teacher_lr = hp["teacher_lr"] * (0.5 + 0.5 * math.cos(math.pi * (epoch - 50) / (e - 50))) * math.exp(
                -0.01 * (epoch - 50) ** 2 / (e - 50) ** 2)
        for group in self.teacher_optimizer.param_groups:
            group["lr"] = teacher_lr
        if epoch in [215, 260, 285]:  # :283-285, at every step of those epochs
            self.temp_learn_rate *= 0.1
        self.student.train()
        total_loss.backward()  # :288-289
        self.optimizer.step()
        teacher_loss = F.cross_entropy(teacher_adv_logits, y)  # :290
        if epoch > 50:  # :291-293
            teacher_loss.backward()
            self.teacher_optimizer.step()
        n = int((torch.argmax(nat_adv_logits, dim=1) != y).sum())
        values = {"student_loss": total_loss, "kl_adv_radv": kl1, "kl_nat_t2nat": kl2, "push": kl3,
                  "teacher_ce": teacher_loss}
        return {**{k: float(v.detach()) for k, v in values.items()}, "push_weight": float(weight),
                "push_examples": n, "temp_adv": temps_used[0], "temp_nat": temps_used[1]}


# Transcriptions that run their published loop themselves (their own optimizers, state and backward), outside STEPS:
# {name: class}; peers.torch_step.CiardTrainStep gives CIARD's the benchmark's call.
LOOPS = {"ciard": CiardScript}
