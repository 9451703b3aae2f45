"""The vocabulary of forwards, the interfaces of objectives, and `Method`: what a training method is, as data.

A method is an inner objective (maximized over x'), an outer objective (minimized over the trained networks'
parameters), optional plug-in terms added to the outer loss (IGDM), and hyper-parameters. Every objective
declares the forwards it reads, by name from the one vocabulary below; the train step computes exactly the
union of those, once each, plus the train-mode forwards of the published order (each train-mode forward
moves the BatchNorm running statistics, so their sequence is part of what a method is).
"""

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Tuple

import jax

from mmard_jax import losses

Array = jax.Array
HParams = Mapping[str, Any]

# Forwards inside the inner maximization (trained networks in inference mode during the attack unless
# attack.student_bn='train'; teachers always): name -> meaning.
INNER_FORWARDS = {
    "s_nat": "S(x), constant during the loop (TRADES)",
    "t_nat": "T(x), constant during the loop (RSLAD)",
    "t_iter": "T(x') at every iterate, differentiated with the student (MMARD, AdaAD)",
    "p_nat": "P(x), the peer at x, constant during the loop (PeerAiD)",
}
# Forwards of the outer loss: name -> (network, point). Points: nat = x, adv = x', mir = x - (x' - x) (IGDM).
# Trained networks (student, peer) run in train mode and are differentiated; teachers in inference mode, never.
OUTER_FORWARDS = {
    "s_adv": ("student", "adv"), "s_nat": ("student", "nat"), "s_mir": ("student", "mir"),
    "t_adv": ("teacher", "adv"), "t_nat": ("teacher", "nat"), "t_mir": ("teacher", "mir"),
    "t2_nat": ("teacher2", "nat"),
    "p_adv": ("peer", "adv"),
}
TRAINED = ("student", "peer")
INNER_NETWORK = {"s_nat": "student", "t_nat": "teacher", "t_iter": "teacher", "p_nat": "peer"}
TRAIN_FORWARDS = ("published", "needed")  # hp 'train_forwards': the published train-mode sequence, or each needed once


class InnerInputs(NamedTuple):
    """What an inner objective sees at one PGD iterate x'."""

    s_adv: Array  # S(x')
    labels: Array
    t_adv: Optional[Array] = None  # T(x') when "t_iter" is needed
    s_nat: Optional[Array] = None
    t_nat: Optional[Array] = None
    p_nat: Optional[Array] = None


class Logits(NamedTuple):
    """The forwards available to an outer objective (None where not computed)."""

    s_adv: Optional[Array] = None
    s_nat: Optional[Array] = None
    s_mir: Optional[Array] = None
    t_adv: Optional[Array] = None
    t_nat: Optional[Array] = None
    t_mir: Optional[Array] = None
    t2_nat: Optional[Array] = None
    p_adv: Optional[Array] = None


class StepInfo(NamedTuple):
    """Per-step values an outer objective may use: traced scalars (never a recompile) and the static phase."""

    epoch: Array  # 0-based epoch of this step
    lr_scale: Array  # learning rate of this step / base learning rate
    phase: str = "main"
    axis_name: Optional[str] = None  # the data-parallel axis, for statistics of the global batch


def global_mean(value: Array, info: StepInfo) -> Array:
    """A batch mean over the global batch: averaged across devices when the step is data-parallel."""
    return value if info.axis_name is None else jax.lax.pmean(value, info.axis_name)


def as_global_sum(local_sum: Array, info: StepInfo) -> Array:
    """A per-device sum, scaled so that the step's pmean of the loss gives the sum over the global batch (a loss
    that sums over examples must not depend on how the batch is split over devices)."""
    return local_sum if info.axis_name is None else local_sum * jax.lax.axis_size(info.axis_name)


def kl(student: Array, teacher: Array, hp: HParams, temperature: float = 1.0) -> Array:
    """Batch mean of the per-example KL(S, T), divided by C if hp['kl_class_mean'] (PyTorch's `KLDivLoss()`
    'mean'), times hp['kl_scale'] (RSLAD/MTARD multiply by 10 on CIFAR-100)."""
    value = losses.reduce_kl(losses.kl_div(student, teacher, temperature), student.shape[-1], hp["kl_class_mean"])
    return value * hp["kl_scale"]


KL_REDUCTION = {"kl_scale": 1.0}  # merged into the defaults of every objective that reduces a KL with `kl`


@dataclasses.dataclass(frozen=True)
class InnerObjective:
    """Per-example objective maximized over x' and the inner forwards it needs (`loss=None`: x' = x)."""

    name: str
    loss: Optional[Callable[[InnerInputs], Array]]
    needs: frozenset


def _main(hp: HParams, epoch: int) -> str:
    return "main"


def _no_state(hp: HParams) -> Any:
    return {}


def _no_check(hp: HParams) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Objective:
    """An outer objective or a plug-in term: `loss(logits, labels, state, hp, info) -> (loss, metrics, state)`.

    `needs(hp, phase)`: the forwards it reads; `order(hp, phase)`: its published sequence of train-mode
    forwards (repeats included: each moves the BatchNorm statistics); `phase(hp, epoch)` (host side, static),
    `phases`: every phase it can return; `check(hp)` refuses settings that would not change the loss.
    """

    name: str
    loss: Callable[..., tuple]
    needs: Callable[[HParams, str], frozenset]
    order: Callable[[HParams, str], Tuple[str, ...]]
    defaults: Mapping[str, Any]
    phases: Tuple[str, ...] = ("main",)
    phase: Callable[[HParams, int], str] = _main
    init_state: Callable[[HParams], Any] = _no_state
    check: Callable[[HParams], None] = _no_check


def needs_of(*names: str) -> Callable[[HParams, str], frozenset]:
    """A `needs` function that ignores hyper-parameters and phase."""
    names_set = frozenset(names)
    return lambda hp, phase: names_set


def order_of(*names: str) -> Callable[[HParams, str], Tuple[str, ...]]:
    """An `order` function that ignores hyper-parameters and phase."""
    return lambda hp, phase: tuple(names)


@dataclasses.dataclass(frozen=True)
class MethodRow:
    """A row of the method table: its inner and outer objectives, plug-ins, and the published settings that
    differ from the objectives' own (hyper-parameters; the start and BatchNorm mode of the attack; the order
    of train-mode forwards where the method's code runs them differently from the objective's origin)."""

    inner: str
    outer: str
    init: str  # start of x': "none" | "uniform" | "gaussian" (engine.INITS)
    student_bn: str = "eval"  # BatchNorm mode of the trained networks during the attack: "eval" | "train"
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    plugins: Tuple[str, ...] = ()
    order: Optional[Callable[[HParams, str], Tuple[str, ...]]] = None
    source: str = ""  # the published code this row follows


@dataclasses.dataclass(frozen=True)
class Method:
    """A resolved method: objectives, plug-ins, hyper-parameters, ready for the train step."""

    name: str
    inner: InnerObjective
    outer: Objective
    plugins: Tuple[Objective, ...]
    hparams: Mapping[str, Any]
    order_override: Optional[Callable[[HParams, str], Tuple[str, ...]]] = None

    @property
    def terms(self) -> Tuple[Objective, ...]:
        return (self.outer,) + self.plugins

    @property
    def phases(self) -> Tuple[str, ...]:
        return self.outer.phases

    def phase(self, epoch: int) -> str:
        """Static phase of the compiled step at this 0-based epoch ('main' for all but warm-ups)."""
        return self.outer.phase(self.hparams, epoch)

    def outer_needs(self, phase: str) -> frozenset:
        """The outer forwards the loss reads (outer objective and plug-ins)."""
        return frozenset().union(*(t.needs(self.hparams, phase) for t in self.terms))

    def train_order(self, phase: str) -> Tuple[str, ...]:
        """The train-mode forwards in the order they run: the published sequence (repeats included), or with
        hp train_forwards='needed' each forward the loss reads, once."""
        needed = tuple(n for n in OUTER_FORWARDS if n in self.outer_needs(phase) and OUTER_FORWARDS[n][0] in TRAINED)
        if self.hparams["train_forwards"] == "needed":
            return needed
        base = (self.order_override or self.outer.order)(self.hparams, phase)
        extra = tuple(n for p in self.plugins for n in p.order(self.hparams, phase) if n not in base)
        return base + extra

    def forwards(self, phase: str) -> frozenset:
        """Every forward the step computes: inner needs (prefixed 'inner:'), outer needs and train-mode forwards."""
        inner = frozenset(f"inner:{n}" for n in self.inner.needs)
        return inner | self.outer_needs(phase) | frozenset(self.train_order(phase))

    def networks(self) -> frozenset:
        """The networks this method uses in any phase (derived from the forwards, never listed by hand)."""
        nets = {INNER_NETWORK[n] for n in self.inner.needs}
        for phase in self.phases:
            nets |= {OUTER_FORWARDS[n][0] for n in self.outer_needs(phase) | set(self.train_order(phase))}
        return frozenset(nets | {"student"})

    def init_state(self) -> Any:
        return self.outer.init_state(self.hparams)

    def loss(self, logits: Logits, labels: Array, state, info: StepInfo):
        """The outer loss plus every plug-in term: (loss, metrics, new method state)."""
        total, metrics, state = self.outer.loss(logits, labels, state, self.hparams, info)
        for plugin in self.plugins:
            term, extra, _ = plugin.loss(logits, labels, {}, self.hparams, info)
            total = total + term
            metrics = {**metrics, **extra}
        return total, metrics, state
