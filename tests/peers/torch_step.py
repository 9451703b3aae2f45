"""PyTorch transcription of one training step of every method mmard_jax trains, as each method's published
script runs it; `scripts/benchmark.py` times it against ours (`peers.torch_bench`), `tests/test_benchmark.py`
checks that one step here equals one step there on the same weights (loss, updated parameters, BatchNorm running
statistics). The steps themselves are in `peers.published_steps`, their losses in `peers.published_losses`.

Not part of the package. Written from the published scripts' semantics as recorded in the project's research
notes (file and line cited at each step below), not from mmard_jax's code. One call of `TorchTrainStep`:

  uint8 split resident on the device -> gather the batch -> zero-pad + random crop + horizontal flip -> x / 255
  -> the method's own step, in its published order: the inner maximization (its objective and reduction, its
     start, the student's BatchNorm mode during the attack: train mode for SAT/ARD/IAD, so every PGD iterate
     moves the running statistics), then every train-mode forward the script runs (repeats included, e.g.
     TRADES S(x), S(x'), S(x); IAD S(x'), S(x'), S(x), S(x)), then the outer loss with its exact reduction
  -> PyTorch's `optim.SGD` (momentum, coupled weight decay) per trained network, at the per-step cosine rate.

What the published scripts do and this file does differently, each on purpose:
- Architectures are the peers of the Flax zoo (`peers.architectures`: RobustBench's `wide_resnet.py` /
  `resnet.py`, `peers/mobilenetv2.py`), with a global mean pool so that 8x8 and 16x16 inputs work.
- The optimizer and schedule are the MMARD paper's recipe for every method (section 4.1: SGD lr 0.1, momentum
  0.9, weight decay 2e-4 on every parameter, cosine), as ours trains them; `published_steps.PUBLISHED_OPTIMIZER`
  records what each script used, and `Settings(weight_decay=..., decay_params='kernels')` reproduces SAT's
  kernel-only decay.
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
import math
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from peers.published_losses import up
from peers.published_steps import ATTACKS, HPARAMS, LOOPS, NETWORKS, STEPS, TRAINED

OPTIONS = ("cl", "bf16", "compile", "f64")


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


def crop_flip_draws(s: Settings, g: torch.Generator, device, batch: int):
    """Random crop offsets [B, 2] and flips [B], drawn like data.augment.crop_flip_params."""
    offsets = torch.randint(0, 2 * s.crop_padding + 1, (batch, 2), generator=g, device=device)
    flips = (torch.rand(batch, generator=g, device=device) < 0.5) if s.flip else \
        torch.zeros(batch, dtype=torch.bool, device=device)
    return offsets, flips


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
            if settings.method in ("mtard", "fair_mtard") else {}
        if settings.method.startswith("fair_"):  # Fair-ARD.py:129, :161: the epoch's Kappa_total, ones as weights
            self.method_state.update(reweight=torch.ones(10), kappa_total=torch.zeros(10, dtype=torch.long))
        if settings.method == "absld":  # resnet18_absld_cifar10.py:66-67 (ones), :85-86 (the epoch's sums)
            self.method_state.update({k: torch.ones(10) for k in ("temp_adv", "temp_nat")})
            self.method_state.update({k: torch.zeros(10) for k in ("loss_adv", "loss_nat")})
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
        return crop_flip_draws(self.settings, self.generator, self.device, batch)

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


class CiardTrainStep:
    """CIARD.py's step (`published_steps.CiardScript`: its student and robust-teacher optimizers, temperatures and
    backward) behind TorchTrainStep's call: the batch gathered, cropped and flipped, the attack's 0.001 N(0, 1) start
    (mtard_loss.py:42) drawn or given, projected where `settings.project_start` (ours); `epoch` 0-based (the
    script's 1-based loop variable is epoch + 1). Its loss is ours: the student's plus the robust teacher's CE where
    the script steps the teacher (1-based epoch > 50, CIARD.py:291; ours: phase 'main')."""

    def __init__(self, student: torch.nn.Module, rteacher: torch.nn.Module, teacher2: torch.nn.Module,
                 settings: Settings, form: Form = Form(), seed: int = 0):
        self.settings, self.form = settings, form
        self.device = next(student.parameters()).device
        self.memory_format = torch.channels_last if form.channels_last else torch.contiguous_format
        dtype = torch.float64 if form.f64 else torch.float32
        nets = [m.to(dtype=dtype, memory_format=self.memory_format) for m in (student, rteacher, teacher2)]
        nets = [torch.compile(m) for m in nets] if form.compile else nets
        self.script = LOOPS["ciard"](*nets, steps=settings.steps, eps=settings.eps, step_size=settings.step_size)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                 offsets: Optional[torch.Tensor] = None, flips: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None, epoch: int = 0) -> Dict[str, torch.Tensor]:
        s = self.settings
        if offsets is None:
            offsets, flips = crop_flip_draws(s, self.generator, self.device, idx.shape[0])
        x = augment(images_u8, idx, offsets, flips, s.crop_padding)
        if noise is None:
            noise = s.gaussian_scale * torch.randn(x.shape, generator=self.generator, device=self.device)
        if s.project_start:
            noise = project(x + noise, x, s.eps) - x
        dtype = torch.float64 if self.form.f64 else torch.float32
        x, noise = (t.to(dtype).contiguous(memory_format=self.memory_format) for t in (x, noise))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.form.bf16):
            out = self.script.step(x, labels[idx], noise, epoch=epoch + 1)
        loss = out["student_loss"] + (out["teacher_ce"] if epoch + 1 > 50 else 0.0)
        return {"loss": torch.tensor(loss), **{k: torch.tensor(float(v)) for k, v in out.items()}}


# The step of a transcription: one of STEPS (TorchTrainStep) or a loop of its own (LOOPS: CiardTrainStep).
OWN_LOOP_STEPS = {"ciard": CiardTrainStep}


def make_step(settings: Settings, nets: Mapping[str, torch.nn.Module], form: Form = Form(), seed: int = 0):
    """The step of `settings.method` on `nets` ({role: module}: student, teacher, peer; CIARD's rteacher, teacher2)."""
    if settings.method in OWN_LOOP_STEPS:
        needed = ("student",) + NETWORKS[settings.method]
        missing = [n for n in needed if nets.get(n) is None]
        if missing:
            raise ValueError(f"method {settings.method!r} needs network(s) {missing}")
        return OWN_LOOP_STEPS[settings.method](*(nets[n] for n in needed), settings, form, seed=seed)
    return TorchTrainStep(nets["student"], nets.get("teacher"), settings, form, seed=seed,
                          teacher2=nets.get("teacher2"), peer=nets.get("peer"))


@functools.cache
def torch_versions() -> str:
    """'torch X' plus the CUDA/cuDNN versions where present."""
    text = f"torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    return text
