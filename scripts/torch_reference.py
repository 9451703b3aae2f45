"""PyTorch transcription of one training step of every method mmard_jax trains, as each method's published
script runs it; `scripts/benchmark.py` times it against ours, `tests/test_benchmark.py` checks that one step
here equals one step there on the same weights (loss, updated parameters, BatchNorm running statistics).

Not part of the package. Written from the published scripts' semantics as recorded in the project's research
notes (file and line cited at each step below), not from mmard_jax's code. One call of `TorchTrainStep`:

  uint8 split resident on the device -> gather the batch -> zero-pad + random crop + horizontal flip -> x / 255
  -> the method's own step, in its published order: the inner maximization (its objective and reduction, its
     start, the student's BatchNorm mode during the attack: train mode for SAT/ARD/IAD, so every PGD iterate
     moves the running statistics), then every train-mode forward the script runs (repeats included, e.g.
     TRADES S(x), S(x'), S(x); IAD S(x'), S(x'), S(x), S(x)), then the outer loss with its exact reduction
  -> PyTorch's `optim.SGD` (momentum, coupled weight decay) per trained network, at the per-step cosine rate.

What the published scripts do and this file does differently, each on purpose:
- Architectures are the peers of the Flax zoo (RobustBench's `wide_resnet.py` / `resnet.py`, loaded by path
  because `import robustbench` pulls in torchvision; `tests/torch_refs/mobilenetv2.py`), with a global mean
  pool so that 8x8 and 16x16 inputs work.
- The optimizer and schedule are the MMARD paper's recipe for every method (section 4.1: SGD lr 0.1, momentum
  0.9, weight decay 2e-4 on every parameter, cosine), as ours trains them; `PUBLISHED_OPTIMIZER` records what
  each script used, and `Settings(weight_decay=..., decay_params='kernels')` reproduces SAT's kernel-only decay.
- TRADES recomputes S(x) in eval mode at every PGD step (trades.py:36-37); it is computed once here (the same
  value: eval mode, the same parameters).
- IGDM (HongsinLee/saad igdm.py:49) passes the attack's epsilon and step size swapped; the IG/WR values
  (eps 8/255, step 2/255) are used, as the research notes advise.
- `Settings.kl_form='exact'` replaces RSLAD's/MTARD's `kl_loss` (1e-5 inside the teacher's log) by the exact KL,
  ours; `Settings.project_start=True` projects the start onto the ball and [0, 1], as ours does.

Forms (`parse_form`): 'eager' is float32 NCHW eager mode, as the published code runs; '+'-joined options make
the fast form: 'cl' (channels_last), 'bf16' (autocast to bfloat16), 'compile' (`torch.compile` of every
network), e.g. 'cl+compile+bf16'; 'f64' runs the networks in float64 (inputs, attack and losses as they are: the
equality tests compare against ours in float64 so that no ReLU mask flips on float32 rounding).
"""

import dataclasses
import functools
import importlib.util
import math
import pathlib
import sys
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCH_REFS = ROOT / "tests" / "torch_refs"
OPTIONS = ("cl", "bf16", "compile", "f64")

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
}


# ----------------------------------------------------------------------------- architectures


class _GlobalPoolF:
    """`torch.nn.functional` with `avg_pool2d` as the global mean, for the architecture files below.

    The peers pool their last map with a fixed kernel (8 for the WRN, 4 for ResNet-18/MobileNetV2), which
    is the global mean on 32x32 inputs and fails on 16x16; the Flax zoo takes the global mean at any size
    (layers.global_avg_pool), so the reference does too. Every other function is torch's own.
    """

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def avg_pool2d(x, kernel_size, *args, **kwargs):
        return F.adaptive_avg_pool2d(x, 1)


def _robustbench_arch(module: str):
    """RobustBench's `model_zoo/architectures/<module>.py`, executed on its own (no `import robustbench`)."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("robustbench is not installed: pip install --no-deps -r requirements-nodeps.txt")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model_zoo" / "architectures" / f"{module}.py"
    return _exec_file(f"_torch_reference_rb_{module}", path)


@functools.cache
def _exec_file(name: str, path: pathlib.Path):
    """Imports one Python file as module `name` with the global-pool `F` (a private copy: tests' copies stay intact)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    mod.F = _GlobalPoolF()
    return mod


def build_model(arch: str, num_classes: int = 10, kwargs: Optional[Mapping] = None) -> torch.nn.Module:
    """The PyTorch peer of `mmard_jax.models.create(arch, num_classes, **kwargs)`."""
    kwargs = dict(kwargs or {})
    if arch == "wide_resnet":
        wrn = _robustbench_arch("wide_resnet")
        return wrn.WideResNet(depth=kwargs.pop("depth", 34), widen_factor=kwargs.pop("width", 10),
                              num_classes=num_classes, **kwargs)
    if arch == "resnet18":
        if kwargs.get("base_width", 64) != 64:
            raise ValueError("RobustBench's ResNet-18 has base width 64 only")
        rn = _robustbench_arch("resnet")
        return rn.ResNet(rn.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    if arch == "mobilenet_v2":
        if kwargs:
            raise ValueError(f"mobilenet_v2 takes no arguments, got {kwargs}")
        mnv2 = _exec_file("_torch_reference_mobilenetv2", TORCH_REFS / "mobilenetv2.py")
        return mnv2.MobileNetV2(num_classes=num_classes)
    raise ValueError(f"no PyTorch peer for {arch!r}; known: wide_resnet, resnet18, mobilenet_v2")


# ----------------------------------------------------------------------------- losses, as the scripts write them


def up(t: torch.Tensor) -> torch.Tensor:
    """Logits for a loss: bf16/fp16 upcast to float32, float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def kl_none(log_input_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`nn.KLDivLoss(reduction='none')(F.log_softmax(s / T), F.softmax(t / T))`: elementwise, shape [B, C]."""
    return F.kl_div(F.log_softmax(up(log_input_logits) / temperature, dim=1),
                    F.softmax(up(target_logits) / temperature, dim=1), reduction="none")


def kl_mean(s, t, temperature: float = 1.0) -> torch.Tensor:
    """`nn.KLDivLoss()` (reduction 'mean'): the elementwise sum over B*C elements."""
    return kl_none(s, t, temperature).mean()


def kl_batchmean(s, t, temperature: float = 1.0) -> torch.Tensor:
    """`(1 / B) * sum(KLDivLoss(reduce=False)(...))` = reduction 'batchmean'."""
    return kl_none(s, t, temperature).sum() / s.shape[0]


def kl_loss_rslad(log_probs: torch.Tensor, probs: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """RSLAD's/MTARD's elementwise `kl_loss(a, b) = -a * b + log(b + 1e-5) * b` (resnet18_rslad_cifar10.py:38-40,
    mtard_resnet18_cifar10.py:51-53); `exact=True`: b * (log b - a), the true KL (ours)."""
    if exact:
        return F.kl_div(log_probs, probs, reduction="none")
    return -log_probs * probs + torch.log(probs + 1e-5) * probs


def ce_mean(logits, labels) -> torch.Tensor:
    """`nn.CrossEntropyLoss()` / `F.cross_entropy`: the batch mean."""
    return F.cross_entropy(up(logits), labels)


def ce_sum(logits, labels) -> torch.Tensor:
    """`F.cross_entropy(..., size_average=False)` (ARD main.py:74) / Madry's `model.xent` (model.py:96): the sum."""
    return F.cross_entropy(up(logits), labels, reduction="sum")


def _unit_residual_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unit vector of softmax(z) - onehot(y), computed from the wrong-class softmax (no cancellation)."""
    z = up(logits)
    onehot = F.one_hot(labels, z.shape[-1]).to(z.dtype)
    r = torch.softmax(z.masked_fill(onehot > 0, -math.inf), dim=-1)
    return (r - onehot) / torch.sqrt(torch.sum(r * r, dim=-1, keepdim=True) + 1.0)


def trd_loss(s_nat, s_adv, t_nat, t_adv, labels, delta: float = 1.0) -> torch.Tensor:
    """MMARD's triangular relationship loss (Eq. 5-6): batch mean of Huber_delta(psi_s - psi_t), psi_t constant."""
    psi_s = torch.sum(_unit_residual_probs(s_nat, labels) * _unit_residual_probs(s_adv, labels), dim=-1)
    with torch.no_grad():
        psi_t = torch.sum(_unit_residual_probs(t_nat, labels) * _unit_residual_probs(t_adv, labels), dim=-1)
    return F.huber_loss(psi_s, psi_t, reduction="mean", delta=delta)


def _trust(guide: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """IAD's per-example trust `softmax(guide)[i][y_i] ** beta`, taken with `.item()`: a constant (IAD-I.py:174-178,
    AdaAD main.py:372-376)."""
    p_y = F.softmax(up(guide), dim=1).gather(1, labels[:, None])[:, 0]
    return (p_y ** beta).detach()


# ----------------------------------------------------------------------------- step pieces


def augment(images_u8: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
            padding: int) -> torch.Tensor:
    """uint8 NCHW split, indices -> float32 batch in [0, 1]: zero-pad, crop at `offsets` (row, col), flip."""
    batch = images_u8[idx]
    n, c, h, w = batch.shape
    if padding:
        padded = F.pad(batch, (padding, padding, padding, padding))
        rows = offsets[:, 0, None] + torch.arange(h, device=batch.device)  # [B, H]
        cols = offsets[:, 1, None] + torch.arange(w, device=batch.device)  # [B, W]
        b = torch.arange(n, device=batch.device)[:, None, None, None]
        ch = torch.arange(c, device=batch.device)[None, :, None, None]
        batch = padded[b, ch, rows[:, None, :, None], cols[:, None, None, :]]
    batch = torch.where(flips[:, None, None, None], batch.flip(-1), batch)
    return batch.float() / 255.0


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """`torch.min(torch.max(x_adv, x - eps), x + eps)` then `torch.clamp(., 0, 1)` (trades.py:40-41 and every peer)."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def cosine_lr(step: int, base_lr: float, steps_per_epoch: int, num_epochs: int) -> float:
    """train_step.make_lr_schedule('cosine'), annealed per step."""
    t = min(max(step / steps_per_epoch / num_epochs, 0.0), 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclasses.dataclass(frozen=True)
class Form:
    """How the PyTorch step runs: memory format, autocast dtype, torch.compile."""

    channels_last: bool = False
    bf16: bool = False
    compile: bool = False
    f64: bool = False

    @property
    def name(self) -> str:
        opts = [o for o, on in zip(OPTIONS, (self.channels_last, self.bf16, self.compile, self.f64)) if on]
        return "+".join(opts) or "eager"


def parse_form(text: str) -> Form:
    """'eager' | '+'-joined options from OPTIONS ('cl+compile+bf16') -> Form."""
    if text == "eager":
        return Form()
    opts = set(text.split("+"))
    unknown = opts - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown torch form option(s) {sorted(unknown)}; known: eager or {'+'.join(OPTIONS)}")
    if {"bf16", "f64"} <= opts:
        raise ValueError("torch form options bf16 and f64 exclude each other")
    return Form(channels_last="cl" in opts, bf16="bf16" in opts, compile="compile" in opts, f64="f64" in opts)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static knobs of the step: attack, augmentation, optimizer, and the two opt-in departures."""

    method: str = "mmard"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    gaussian_scale: float = 1e-3  # the published 0.001 * randn start
    crop_padding: int = 4
    flip: bool = True
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    decay_params: str = "all"  # "all" (PyTorch's SGD on every parameter) | "kernels" (conv/FC weights, Madry)
    steps_per_epoch: int = 390
    num_epochs: int = 300
    kl_form: str = "published"  # "published" | "exact" (RSLAD/MTARD's kl_loss without the 1e-5)
    project_start: Optional[bool] = None  # None: as published; True: onto the ball and [0, 1] (ours)


# ----------------------------------------------------------------------------- the methods, one step each
#
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
    # detached, unused); :170 T(x'); :174-178 the trust; :179 after `begin` (terms evaluated left to right), :181 before.
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
        trust = _trust(guide, y, hp["beta"])
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
        trust = _trust(guide, y, hp["beta"])
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


STEPS: Dict[str, Callable] = {
    "nature": _nature, "sat": _sat, "trades": _trades, "ard": _ard, "iad": _iad, "rslad": _rslad, "mtard": _mtard,
    "mmard": _mmard, "adaad": _adaad, "adaiad": _adaiad, "igdm": _igdm, "peeraid": _peeraid,
}
# The networks each method uses besides the student.
NETWORKS = {"ard": ("teacher",), "iad": ("teacher",), "rslad": ("teacher",), "mtard": ("teacher", "teacher2"),
            "mmard": ("teacher",), "adaad": ("teacher",), "adaiad": ("teacher",), "igdm": ("teacher",),
            "peeraid": ("peer",)}
TRAINED = ("student", "peer")


class _Nets:
    """What a method's step function sees: forwards, BatchNorm modes, the attack, hyper-parameters, its state."""

    def __init__(self, step: "TorchTrainStep", start: Optional[torch.Tensor]):
        self._step, self._start = step, start
        self.s, self.hp, self.state, self.lr = step.settings, step.hp, step.method_state, step.current_lr

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        st = self._step
        x = x.to(torch.float64) if st.form.f64 else x
        with torch.autocast(st.device.type, dtype=torch.bfloat16, enabled=st.form.bf16):
            return up(st.fns[name](x.contiguous(memory_format=st.memory_format)))

    def S(self, x):
        return self._run("student", x)

    def T(self, x):
        return self._run("teacher", x)

    def T2(self, x):
        return self._run("teacher2", x)

    def P(self, x):
        return self._run("peer", x)

    def train(self, name: str):
        self._step.modules[name].train()

    def eval(self, name: str):
        self._step.modules[name].eval()

    def pgd(self, objective: Callable, x: torch.Tensor) -> torch.Tensor:
        """Signed-gradient ascent on `objective` (already reduced as the script does) from the method's start,
        each iterate projected onto the eps-ball and [0, 1]; returns x' detached. Trained networks stay in the
        BatchNorm mode the caller set (train mode: every iterate moves the running statistics)."""
        s, attack, st = self.s, ATTACKS[self.s.method], self._step
        x = x.detach()
        x_adv = x + self._start if attack.start != "none" else x.clone()
        if s.project_start:
            x_adv = project(x_adv, x, s.eps)
        elif attack.clip_start:
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
        # A compiled backward computes the gradient of every input that requires one, so the compiled forms
        # freeze the trained networks' parameters during the attack (gradient w.r.t. x only, as ours); eager
        # autograd skips unneeded gradients by itself, and the eager form runs as the published code.
        freeze = st.form.compile
        st.requires_grad(not freeze)
        for _ in range(s.steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(x_adv), [x_adv])
            x_adv = project(x_adv.detach() + s.step_size * torch.sign(grad), x, s.eps)
        st.requires_grad(True)
        return x_adv.detach()


class TorchTrainStep:
    """One training step of `settings.method` as its published script runs it; trained networks (student, peer)
    are updated in place. Call with a batch's indices (and optionally the augmentation and start noise)."""

    def __init__(self, student: torch.nn.Module, teacher: Optional[torch.nn.Module], settings: Settings,
                 form: Form = Form(), hparams: Optional[Mapping] = None, seed: int = 0,
                 teacher2: Optional[torch.nn.Module] = None, peer: Optional[torch.nn.Module] = None):
        if settings.method not in STEPS:
            raise ValueError(f"no PyTorch reference for method {settings.method!r}; known: {', '.join(STEPS)}")
        if settings.decay_params not in ("all", "kernels") or settings.kl_form not in ("published", "exact"):
            raise ValueError(f"decay_params must be all|kernels and kl_form published|exact, got {settings}")
        self.settings, self.form = settings, form
        self.hp = dict(HPARAMS[settings.method], **(hparams or {}))
        self.device = next(student.parameters()).device
        fmt = torch.channels_last if form.channels_last else torch.contiguous_format
        self.memory_format = fmt
        given = {"student": student, "teacher": teacher, "teacher2": teacher2, "peer": peer}
        needed = ("student",) + NETWORKS.get(settings.method, ())
        missing = [n for n in needed if given[n] is None]
        if missing:
            raise ValueError(f"method {settings.method!r} needs network(s) {missing}")
        dtype = torch.float64 if form.f64 else torch.float32
        self.modules = {n: given[n].to(dtype=dtype, memory_format=fmt) for n in needed}
        for name, module in self.modules.items():
            if name not in TRAINED:
                module.eval()
                for p in module.parameters():
                    p.requires_grad_(False)
        self.fns = {n: (torch.compile(m) if form.compile else m) for n, m in self.modules.items()}
        self.opts = {n: self._optimizer(m) for n, m in self.modules.items() if n in TRAINED}
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.method_state = {"w_nat": self.hp["w_nat_init"], "init_adv": None, "init_nat": None} \
            if settings.method == "mtard" else {}
        self.step_count = 0
        self.current_lr = settings.lr

    def _optimizer(self, module: torch.nn.Module) -> torch.optim.SGD:
        s = self.settings
        if s.decay_params == "all":
            groups = [{"params": list(module.parameters())}]
        else:  # Madry's decay on the conv/FC kernels only (model.py:145-151)
            kernels = [m.weight for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            ids = {id(p) for p in kernels}
            rest = [p for p in module.parameters() if id(p) not in ids]
            groups = [{"params": kernels}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)

    def requires_grad(self, flag: bool) -> None:
        """Sets requires_grad on every trained network's parameters."""
        for name in self.opts:
            for p in self.modules[name].parameters():
                p.requires_grad_(flag)

    def augment_params(self, batch: int):
        """Random crop offsets [B, 2] and flips [B], drawn like data.augment.crop_flip_params."""
        s, g = self.settings, self.generator
        offsets = torch.randint(0, 2 * s.crop_padding + 1, (batch, 2), generator=g, device=self.device)
        flips = (torch.rand(batch, generator=g, device=self.device) < 0.5) if s.flip else \
            torch.zeros(batch, dtype=torch.bool, device=self.device)
        return offsets, flips

    def start_noise(self, shape) -> Optional[torch.Tensor]:
        """The attack's start offset from x: U(-eps, eps) or gaussian_scale * N(0, 1); None for start 'none'."""
        s, g, start = self.settings, self.generator, ATTACKS[self.settings.method].start
        if start == "uniform":
            return torch.rand(shape, generator=g, device=self.device) * (2 * s.eps) - s.eps
        if start == "gaussian":
            return s.gaussian_scale * torch.randn(shape, generator=g, device=self.device)
        return None

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                 offsets: Optional[torch.Tensor] = None, flips: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None, epoch: int = 0) -> Dict[str, torch.Tensor]:
        """`images_u8` NCHW uint8 on the device (the whole split), `idx` the batch, `epoch` 0-based; `offsets`,
        `flips`, `noise` (NCHW) replace the step's own draws. Returns {'loss': tensor, ...the method's metrics}."""
        s = self.settings
        if offsets is None:
            offsets, flips = self.augment_params(idx.shape[0])
        x = augment(images_u8, idx, offsets, flips, s.crop_padding)
        y = labels[idx]
        if noise is None:
            noise = self.start_noise(x.shape)
        self.current_lr = cosine_lr(self.step_count, s.lr, s.steps_per_epoch, s.num_epochs)
        for opt in self.opts.values():
            for group in opt.param_groups:
                group["lr"] = self.current_lr
            opt.zero_grad(set_to_none=True)
        loss, metrics = STEPS[s.method](_Nets(self, noise), x, y, epoch)
        loss.backward()
        for name in ("peer", "student"):  # PeerAiD main.py:402-404: the peer's optimizer steps first
            if name in self.opts:
                self.opts[name].step()
        self.step_count += 1
        return {"loss": loss.detach(), **{k: torch.as_tensor(v).detach() for k, v in metrics.items()}}


@functools.cache
def torch_versions() -> str:
    """'torch X' plus the CUDA/cuDNN versions where present."""
    text = f"torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    return text
