"""PyTorch implementation of mmard_jax's fused train step, the peer `scripts/benchmark.py` times it against.

Not part of the package: it exists so the benchmark compares like with like. One call of `TorchTrainStep`
does what `mmard_jax.train_step.make_train_step`'s step does on the same global batch:

  uint8 split resident on the device -> gather the batch -> zero-pad + random crop + horizontal flip -> x / 255
  -> inner maximization (PGD, student and teacher in eval mode, gradient w.r.t. x only)
  -> outer loss (student in train mode: S(x') then S(x), teacher in eval mode)
  -> SGD (momentum 0.9, weight decay 2e-4 coupled, PyTorch's `optim.SGD`) with the per-step cosine rate.

Architectures are the peers of the Flax zoo: RobustBench's `wide_resnet.py` / `resnet.py` (loaded by
path, because `import robustbench` pulls in torchvision) and `tests/torch_refs/mobilenetv2.py`.
Losses follow `mmard_jax/losses.py` and the method defaults of `mmard_jax/methods.py` (DESIGN §2);
`tests/test_benchmark.py` checks that one step here equals one step there on the same weights.

Forms (`parse_form`): 'eager' is float32 NCHW eager mode, as the published ARD/RSLAD code runs;
'+'-joined options make the fast form: 'cl' (channels_last), 'bf16' (autocast to bfloat16),
'compile' (`torch.compile` of both networks), e.g. 'cl+compile+bf16'.
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

# Outer hyper-parameters: the defaults of mmard_jax/methods.py (each baseline's published code).
HPARAMS = {
    "mmard": {"alpha": 1.0, "delta": 1.0, "kl_class_mean": False},
    "rslad": {"alpha": 5.0 / 6.0, "kl_class_mean": True},
    "ard": {"tau": 30.0, "alpha": 1.0, "kl_class_mean": True},
    "trades": {"beta": 6.0, "kl_class_mean": False},
    "sat": {},
}
# Start of x' (engine.INITS) per method, as in mmard_jax/methods.py INNER.
INITS = {"mmard": "gaussian", "rslad": "gaussian", "ard": "uniform", "trades": "gaussian", "sat": "uniform"}
OPTIONS = ("cl", "bf16", "compile")


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


# ----------------------------------------------------------------------------- losses (mmard_jax/losses.py)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy, shape [B]."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def kl_div(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-example KL(softmax(t/T) || softmax(s/T)) summed over classes, shape [B] (losses.kl_div)."""
    log_ps = F.log_softmax(student.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher.float() / temperature, dim=-1)
    return torch.sum(log_pt.exp() * (log_pt - log_ps), dim=-1)


def _unit_residual_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unit vector of softmax(z) - onehot(y), without cancellation (losses._unit_residual_probs)."""
    z = logits.float()
    onehot = F.one_hot(labels, z.shape[-1]).to(z.dtype)
    r = torch.softmax(z.masked_fill(onehot > 0, -math.inf), dim=-1)
    return (r - onehot) / torch.sqrt(torch.sum(r * r, dim=-1, keepdim=True) + 1.0)


def trd_loss(s_nat, s_adv, t_nat, t_adv, labels, delta: float = 1.0) -> torch.Tensor:
    """Triangular relationship loss, batch mean of Huber_delta(psi_s - psi_t) (losses.trd_loss defaults)."""
    psi_s = torch.sum(_unit_residual_probs(s_nat, labels) * _unit_residual_probs(s_adv, labels), dim=-1)
    with torch.no_grad():
        psi_t = torch.sum(_unit_residual_probs(t_nat, labels) * _unit_residual_probs(t_adv, labels), dim=-1)
    return F.huber_loss(psi_s, psi_t, reduction="mean", delta=delta)


# ----------------------------------------------------------------------------- methods (mmard_jax/methods.py)


def _kl(s, t, hp, temperature=1.0):
    value = kl_div(s, t, temperature).mean()
    return value / s.shape[-1] if hp["kl_class_mean"] else value


def inner_loss(method: str, s_adv, labels, t_adv=None, s_nat=None, t_nat=None) -> torch.Tensor:
    """Per-example objective maximized by PGD."""
    if method == "mmard":
        return kl_div(s_adv, t_adv)
    if method == "rslad":
        return kl_div(s_adv, t_nat)
    if method == "trades":
        return kl_div(s_adv, s_nat)
    if method in ("ard", "sat"):
        return cross_entropy(s_adv, labels)
    raise ValueError(f"no PyTorch reference for method {method!r}; known: {sorted(HPARAMS)}")


def outer_loss(method: str, hp, labels, s_adv=None, s_nat=None, t_nat=None, t_adv=None) -> torch.Tensor:
    """Scalar training loss on the student."""
    if method == "mmard":
        loss = _kl(s_adv, t_adv, hp)
        return loss + hp["alpha"] * trd_loss(s_nat, s_adv, t_nat, t_adv, labels, hp["delta"]) if hp["alpha"] else loss
    if method == "rslad":
        a = hp["alpha"]
        return (1.0 - a) * _kl(s_nat, t_nat, hp) + a * _kl(s_adv, t_nat, hp)
    if method == "ard":
        tau, a = hp["tau"], hp["alpha"]
        loss = a * tau * tau * _kl(s_adv, t_nat, hp, tau)
        return loss + (1.0 - a) * cross_entropy(s_nat, labels).mean() if a != 1.0 else loss
    if method == "trades":
        return cross_entropy(s_nat, labels).mean() + hp["beta"] * _kl(s_adv, s_nat, hp)
    if method == "sat":
        return cross_entropy(s_adv, labels).mean()
    raise ValueError(f"no PyTorch reference for method {method!r}; known: {sorted(HPARAMS)}")


def forwards(method: str, hp) -> Dict[str, frozenset]:
    """The forwards each phase needs (methods.Method.forwards): 'inner' and 'outer' sets of names."""
    inner = {"mmard": {"t_iter"}, "rslad": {"t_nat"}, "trades": {"s_nat"}}.get(method, set())
    outer = {
        "mmard": {"s_adv", "s_nat", "t_nat", "t_adv"} if hp.get("alpha", 1.0) else {"s_adv", "t_adv"},
        "rslad": {"s_adv", "s_nat", "t_nat"},
        "ard": {"s_adv", "t_nat"} | ({"s_nat"} if hp.get("alpha", 1.0) != 1.0 else set()),
        "trades": {"s_adv", "s_nat"},
        "sat": {"s_adv"},
    }[method]
    return {"inner": frozenset(inner), "outer": frozenset(outer)}


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
    """L-inf ball of radius eps around x, then the image box [0, 1] (engine.project)."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def pgd(objective: Callable, x: torch.Tensor, eps: float, step_size: float, steps: int, init: str,
        gaussian_scale: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Signed-gradient ascent on the summed objective from the method's start (engine.pgd); returns x' detached."""
    x = x.detach()
    if init == "uniform":
        noise = torch.rand(x.shape, generator=generator, device=x.device) * (2 * eps) - eps
    elif init == "gaussian":
        noise = gaussian_scale * torch.randn(x.shape, generator=generator, device=x.device)
    else:
        noise = torch.zeros_like(x)
    x_adv = project(x + noise, x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x_adv).sum(), [x_adv])
        x_adv = project(x_adv.detach() + step_size * torch.sign(grad), x, eps)
    return x_adv.detach()


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

    @property
    def name(self) -> str:
        opts = [o for o, on in zip(OPTIONS, (self.channels_last, self.bf16, self.compile)) if on]
        return "+".join(opts) or "eager"


def parse_form(text: str) -> Form:
    """'eager' | '+'-joined options from OPTIONS ('cl+compile+bf16') -> Form."""
    if text == "eager":
        return Form()
    opts = set(text.split("+"))
    unknown = opts - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown torch form option(s) {sorted(unknown)}; known: eager or {'+'.join(OPTIONS)}")
    return Form(channels_last="cl" in opts, bf16="bf16" in opts, compile="compile" in opts)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static knobs of the step (train_step.StepSettings plus the optimizer)."""

    method: str = "mmard"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    gaussian_scale: float = 1e-3
    crop_padding: int = 4
    flip: bool = True
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    steps_per_epoch: int = 390
    num_epochs: int = 300


class TorchTrainStep:
    """One fused training step of `settings.method`, student updated in place; call with a batch's indices."""

    def __init__(self, student: torch.nn.Module, teacher: Optional[torch.nn.Module], settings: Settings,
                 form: Form = Form(), hparams: Optional[Mapping] = None, seed: int = 0):
        self.settings, self.form = settings, form
        self.hp = dict(HPARAMS[settings.method], **(hparams or {}))
        self.needs = forwards(settings.method, self.hp)
        self.device = next(student.parameters()).device
        fmt = torch.channels_last if form.channels_last else torch.contiguous_format
        self.memory_format = fmt
        self.student = student.to(memory_format=fmt)
        self.teacher = teacher.to(memory_format=fmt).eval() if teacher is not None else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.opt = torch.optim.SGD(self.student.parameters(), lr=settings.lr, momentum=settings.momentum,
                                   weight_decay=settings.weight_decay)
        self.s_fn = torch.compile(self.student) if form.compile else self.student
        self.t_fn = (torch.compile(self.teacher) if form.compile else self.teacher) if teacher is not None else None
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.step_count = 0

    def _requires_grad(self, flag: bool) -> None:
        for p in self.student.parameters():
            p.requires_grad_(flag)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.form.bf16)

    def _run(self, fn, x):
        with self._autocast():
            return fn(x.contiguous(memory_format=self.memory_format)).float()

    def augment_params(self, batch: int):
        """Random crop offsets [B, 2] and flips [B], drawn like data.augment.crop_flip_params."""
        s, g = self.settings, self.generator
        offsets = torch.randint(0, 2 * s.crop_padding + 1, (batch, 2), generator=g, device=self.device)
        flips = (torch.rand(batch, generator=g, device=self.device) < 0.5) if s.flip else \
            torch.zeros(batch, dtype=torch.bool, device=self.device)
        return offsets, flips

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                 offsets: Optional[torch.Tensor] = None, flips: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """`images_u8` NCHW uint8 on the device (the whole split), `idx` the batch; returns {'loss': tensor}."""
        s, needs = self.settings, self.needs
        if offsets is None:
            offsets, flips = self.augment_params(idx.shape[0])
        x = augment(images_u8, idx, offsets, flips, s.crop_padding)
        y = labels[idx]

        self.student.eval()
        with torch.no_grad():
            t_nat = self._run(self.t_fn, x) if ({"t_nat"} & (needs["outer"] | needs["inner"])) else None
            s_nat_eval = self._run(self.s_fn, x) if "s_nat" in needs["inner"] else None

        def objective(z):
            t_iter = self._run(self.t_fn, z) if "t_iter" in needs["inner"] else None
            return inner_loss(s.method, self._run(self.s_fn, z), y, t_adv=t_iter, s_nat=s_nat_eval, t_nat=t_nat)

        # A compiled backward computes the gradient of every input that requires one, so the fast forms
        # freeze the student's parameters during the attack (gradient w.r.t. x only, as ours); eager
        # autograd skips unneeded gradients by itself, and the eager form runs as the published code.
        freeze = self.form != Form()
        self._requires_grad(not freeze)
        x_adv = pgd(objective, x, s.eps, s.step_size, s.steps, INITS[s.method], s.gaussian_scale, self.generator)
        self._requires_grad(True)

        with torch.no_grad():
            t_adv = self._run(self.t_fn, x_adv) if "t_adv" in needs["outer"] else None
        self.student.train()
        s_adv = self._run(self.s_fn, x_adv) if "s_adv" in needs["outer"] else None
        s_nat = self._run(self.s_fn, x) if "s_nat" in needs["outer"] else None
        loss = outer_loss(s.method, self.hp, y, s_adv=s_adv, s_nat=s_nat, t_nat=t_nat, t_adv=t_adv)

        for group in self.opt.param_groups:
            group["lr"] = cosine_lr(self.step_count, s.lr, s.steps_per_epoch, s.num_epochs)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step_count += 1
        return {"loss": loss.detach()}


@functools.cache
def torch_versions() -> str:
    """'torch X' plus the CUDA/cuDNN versions where present."""
    text = f"torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    return text
