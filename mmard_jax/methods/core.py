"""The vocabulary of forwards, the interfaces of objectives, and `Method`: what a training method is, as data.

A method is an inner objective (maximized over x'), an outer objective (minimized over the trained networks'
parameters), optional plug-in terms added to the outer loss (IGDM), and hyper-parameters. Every objective
declares the forwards it reads, by name from the one vocabulary below; the train step computes exactly the
union of those, once each, plus the train-mode forwards of the published order (each train-mode forward
moves the BatchNorm running statistics, so their sequence is part of what a method is).
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

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
    "t_grad": "the input gradient of T(x)'s label logit at x (one teacher forward, shared with T(x), and its "
              "backward), constant during the loop (SAAD)",
}
# Forwards of the outer loss: name -> (network, point). Points: nat = x, adv = x', mir = x - (x' - x) (IGDM).
# Trained networks (student, peer, CIARD's robust teacher 'rteacher') run in train mode and are differentiated;
# teachers in inference mode, never.
OUTER_FORWARDS = {
    "s_adv": ("student", "adv"), "s_nat": ("student", "nat"), "s_mir": ("student", "mir"),
    "t_adv": ("teacher", "adv"), "t_nat": ("teacher", "nat"), "t_mir": ("teacher", "mir"),
    "t2_nat": ("teacher2", "nat"), "t2_adv": ("teacher2", "adv"),
    "p_adv": ("peer", "adv"),
    "r_adv": ("rteacher", "adv"), "r_nat": ("rteacher", "nat"),
}
# 'rteacher': a robust teacher trained during distillation (CIARD), starting from config.teacher's checkpoint.
TRAINED = ("student", "peer", "rteacher")
INNER_NETWORK = {"s_nat": "student", "t_nat": "teacher", "t_iter": "teacher", "p_nat": "peer", "t_grad": "teacher"}
TRAIN_FORWARDS = ("published", "needed")  # hp 'train_forwards': the published train-mode sequence, or each needed once


class InnerInputs(NamedTuple):
    """What an inner objective sees at one PGD iterate x'."""

    s_adv: Array  # S(x')
    labels: Array
    t_adv: Optional[Array] = None  # T(x') when "t_iter" is needed
    s_nat: Optional[Array] = None
    t_nat: Optional[Array] = None
    p_nat: Optional[Array] = None
    t_grad: Optional[Array] = None  # d T_y(x) / dx, shaped as x, where "t_grad" is needed (SAAD)
    delta: Optional[Array] = None  # x' - x, where "t_grad" is needed
    hp: Optional[Mapping[str, Any]] = None  # the method's hyper-parameters (static), for an inner objective's own


class Logits(NamedTuple):
    """The forwards available to an outer objective (None where not computed)."""

    s_adv: Optional[Array] = None
    s_nat: Optional[Array] = None
    s_mir: Optional[Array] = None
    t_adv: Optional[Array] = None
    t_nat: Optional[Array] = None
    t_mir: Optional[Array] = None
    t2_nat: Optional[Array] = None
    t2_adv: Optional[Array] = None
    p_adv: Optional[Array] = None
    r_adv: Optional[Array] = None
    r_nat: Optional[Array] = None


class StepInfo(NamedTuple):
    """Per-step values an outer objective may use: traced scalars (never a recompile) and the static phase."""

    epoch: Array  # 0-based epoch of this step
    lr_scale: Array  # learning rate of this step / base learning rate
    phase: str = "main"
    axis_name: Optional[str] = None  # the data-parallel axis, for statistics of the global batch
    example_weights: Optional[Array] = None  # per-example loss weights from plug-ins (Fair-ARD), None = uniform
    epoch_values: Optional[Mapping[str, Any]] = None  # term name -> its epoch state's value (EpochState.value)


def global_mean(value: Array, info: StepInfo) -> Array:
    """A batch mean over the global batch: averaged across devices when the step is data-parallel."""
    return value if info.axis_name is None else jax.lax.pmean(value, info.axis_name)


def as_global_sum(local_sum: Array, info: StepInfo) -> Array:
    """A per-device sum, scaled so that the step's pmean of the loss gives the sum over the global batch (a loss
    that sums over examples must not depend on how the batch is split over devices)."""
    return local_sum if info.axis_name is None else local_sum * jax.lax.axis_size(info.axis_name)


def weighted_mean(per_example: Array, info: StepInfo) -> Array:
    """The batch mean of a per-example value, each example times its plug-in weight (`info.example_weights`)."""
    w = info.example_weights
    return jnp.mean(per_example if w is None else per_example * w)


def kl(student: Array, teacher: Array, hp: HParams, temperature: float = 1.0) -> Array:
    """Batch mean of the per-example KL(S, T), divided by C if hp['kl_class_mean'] (PyTorch's `KLDivLoss()`
    'mean'), times hp['kl_scale'] (RSLAD/MTARD multiply by 10 on CIFAR-100)."""
    value = losses.reduce_kl(losses.kl_div(student, teacher, temperature), student.shape[-1], hp["kl_class_mean"])
    return value * hp["kl_scale"]


def weighted_kl(student: Array, teacher: Array, hp: HParams, info: StepInfo, temperature: float = 1.0) -> Array:
    """`kl` with each example times its plug-in weight (Fair-ARD.py:141-146: weight the per-example KL, then the
    plain batch mean); exactly `kl` when no plug-in weighs examples."""
    if info.example_weights is None:
        return kl(student, teacher, hp, temperature)
    factor = hp["kl_scale"] / (student.shape[-1] if hp["kl_class_mean"] else 1.0)
    per_example = losses.kl_div(student, teacher, temperature) * factor
    return weighted_mean(per_example, info)


def weighted_ce(logits: Array, labels: Array, info: StepInfo) -> Array:
    """Batch mean of the cross-entropy, each example times its plug-in weight (Fair-ARD.py:142-147)."""
    return weighted_mean(losses.cross_entropy(logits, labels), info)


KL_REDUCTION = {"kl_scale": 1.0}  # merged into the defaults of every objective that reduces a KL with `kl`


@dataclasses.dataclass(frozen=True)
class InnerObjective:
    """Per-example objective maximized over x' and the inner forwards it needs (`loss=None`: x' = x); `defaults`:
    its own hyper-parameters (SAAD's lambda_inner), merged into the method's."""

    name: str
    loss: Optional[Callable[[InnerInputs], Array]]
    needs: frozenset
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Tally(NamedTuple):
    """What a step shows an epoch state's `accumulate`: this device's labels and logits, and (where a term
    declares TALLIES' 'correct_iterates') how many attack iterates the student classified correctly, per example."""

    labels: Array
    logits: Logits
    correct_iterates: Optional[Array] = None  # int32 [B]: iterates x_0 .. x_{K-1} with argmax S(x_k) = y


# What a step can record for an epoch state: name -> meaning.
TALLIES = {"correct_iterates": "per example, the attack iterates at which the student predicted the label (Kappa)"}


@dataclasses.dataclass(frozen=True)
class EpochState:
    """Method state that lives across steps and epochs (Fair-ARD's class weights, ABSLD's temperatures), as data.

    The state is `{"sums": pytree, "value": pytree}`: `init(hp, num_classes)` builds it; every step adds
    `accumulate(tally, hp)` (this device's contribution, shaped as `sums`) summed over all devices and processes
    (a psum over the data axis) to `sums`; at each epoch boundary the pure `epoch_update(state, hp, lr_scale)` turns
    the sums into the next epoch's `value` (and resets the sums); `lr_scale` is the learning rate of the coming
    epoch's first step / the base rate (ABSLD's temperature rate decays with the learning rate). The loss reads
    `value` (StepInfo.epoch_values). The state is part of the train state: checkpointed, resumed bitwise,
    replicated. Integer sums (counts) are exact on any device count; float sums (ABSLD's per-class losses) agree
    across device counts to float32 rounding only (the order of additions differs).
    """

    init: Callable[[HParams, int], Any]
    accumulate: Callable[[Tally, HParams], Any]
    epoch_update: Callable[[Any, HParams, Array], Any]
    tallies: frozenset = frozenset()  # what the step must record for `accumulate` (TALLIES)
    summary: Optional[Callable[[Any, HParams], Mapping[str, Any]]] = None  # per-epoch numbers for metrics.jsonl


def _main(hp: HParams, epoch: int) -> str:
    return "main"


def _no_state(hp: HParams) -> Any:
    return {}


def _no_check(hp: HParams) -> None:
    return None


def _none_before(hp: HParams, phase: str) -> Tuple[str, ...]:
    return ()


def _none_held(hp: HParams, phase: str) -> frozenset:
    return frozenset()


@dataclasses.dataclass(frozen=True)
class Objective:
    """An outer objective or a plug-in term: `loss(logits, labels, state, hp, info) -> (loss, metrics, state)`.

    `needs(hp, phase)`: the forwards it reads; `order(hp, phase)`: its published sequence of train-mode
    forwards (repeats included: each moves the BatchNorm statistics); `phase(hp, epoch)` (host side, static),
    `phases`: every phase it can return; `check(hp)` refuses settings that would not change the loss;
    `epoch_state`: its state across steps and epochs; a plug-in's `example_weights` weigh the outer's examples;
    an outer's `pre_attack(hp, phase)`: train-mode forwards at x that run before the attack (CIARD's S(x): the
    eval-mode attack then reads the statistics they moved); `held(hp, phase)`: trained networks whose parameters
    and optimizer state the phase leaves unchanged (CIARD's robust teacher before its training starts);
    a plug-in's `rows`: the rows it applies to (PluginRow); an outer's `attack_teacher` turns T(x) into the
    attack's target (ABSLD's class temperatures).
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
    epoch_state: Optional[EpochState] = None  # state across steps and epochs (EpochState)
    # A plug-in that weighs examples: (its epoch state's value, labels, hp) -> per-example weights [B], multiplying
    # every per-example term of the outer objective (of a row in `rows`).
    example_weights: Optional[Callable[[Any, Array, HParams], Array]] = None
    rows: Optional[Mapping[str, "PluginRow"]] = None  # a plug-in's rows (None: any) and what it sets on each
    # An outer objective's target for the attack: (its epoch state's value, T(x) logits, labels, hp) -> the logits
    # the inner objective reads as T(x) (ABSLD divides them by the class temperatures); None: T(x) itself.
    attack_teacher: Optional[Callable[[Any, Array, Array, HParams], Array]] = None
    pre_attack: Callable[[HParams, str], Tuple[str, ...]] = _none_before
    held: Callable[[HParams, str], frozenset] = _none_held


def check_learned_temperatures(hp: HParams, prefix: str, method: str) -> None:
    """ValueError unless 0 < {prefix}_temp_min <= {prefix}_temp_init <= {prefix}_temp_max and {prefix}_temp_lr >= 0:
    the bounds and rate of the per-class temperatures ABSLD and CIARD learn."""
    low, init, high = (hp[f"{prefix}_temp_{k}"] for k in ("min", "init", "max"))
    if not 0.0 < low <= init <= high:
        raise ValueError(f"{method}'s temperatures need 0 < {prefix}_temp_min <= {prefix}_temp_init <= "
                         f"{prefix}_temp_max, got {low}, {init}, {high}")
    if hp[f"{prefix}_temp_lr"] < 0.0:
        raise ValueError(f"{prefix}_temp_lr must be >= 0 (0 keeps the temperatures at {prefix}_temp_init), "
                         f"got {hp[f'{prefix}_temp_lr']}")


def needs_of(*names: str) -> Callable[[HParams, str], frozenset]:
    """A `needs` function that ignores hyper-parameters and phase."""
    names_set = frozenset(names)
    return lambda hp, phase: names_set


def order_of(*names: str) -> Callable[[HParams, str], Tuple[str, ...]]:
    """An `order` function that ignores hyper-parameters and phase."""
    return lambda hp, phase: tuple(names)


@dataclasses.dataclass(frozen=True)
class PluginRow:
    """How a plug-in applies to one row, as that combination's published script does: hyper-parameters it sets,
    its order of train-mode forwards (None: the row's), and settings it fixes (hp -> the only accepted value:
    a value the combination would not read, or one it does not implement, is refused)."""

    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    order: Optional[Callable[[HParams, str], Tuple[str, ...]]] = None
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""


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

    def pre_attack_order(self, phase: str) -> Tuple[str, ...]:
        """The train-mode forwards at x that run before the attack, in order (none with train_forwards='needed':
        then every forward runs after the attack, once)."""
        if self.hparams["train_forwards"] == "needed":
            return ()
        return self.outer.pre_attack(self.hparams, phase)

    def held(self, phase: str) -> frozenset:
        """The trained networks the step of this phase does not update (their BatchNorm statistics still move)."""
        return frozenset(self.outer.held(self.hparams, phase))

    def forwards(self, phase: str) -> frozenset:
        """Every forward the step computes: inner needs (prefixed 'inner:'), outer needs and train-mode forwards."""
        inner = frozenset(f"inner:{n}" for n in self.inner.needs)
        train = frozenset(self.train_order(phase)) | frozenset(self.pre_attack_order(phase))
        return inner | self.outer_needs(phase) | train

    def networks(self) -> frozenset:
        """The networks this method uses in any phase (derived from the forwards, never listed by hand)."""
        nets = {INNER_NETWORK[n] for n in self.inner.needs}
        for phase in self.phases:
            train = set(self.train_order(phase)) | set(self.pre_attack_order(phase))
            nets |= {OUTER_FORWARDS[n][0] for n in self.outer_needs(phase) | train}
        return frozenset(nets | {"student"})

    def init_state(self) -> Any:
        return self.outer.init_state(self.hparams)

    @property
    def epoch_terms(self) -> Tuple[Objective, ...]:
        """The terms (outer, plug-ins) that keep state across epochs."""
        return tuple(t for t in self.terms if t.epoch_state is not None)

    def tallies(self) -> frozenset:
        """What the step records for the epoch states (TALLIES)."""
        return frozenset().union(*(t.epoch_state.tallies for t in self.epoch_terms))

    def init_epoch_state(self, num_classes: int) -> Optional[Dict[str, Any]]:
        """{term name: its epoch state} at the start of training; None when no term keeps one."""
        terms = self.epoch_terms
        return {t.name: t.epoch_state.init(self.hparams, num_classes) for t in terms} if terms else None

    def accumulate(self, epoch_state, tally: Tally, axis_name: Optional[str] = None):
        """Every epoch state with this step's contributions added, summed over the data axis (all devices)."""
        if epoch_state is None:
            return None
        out = {}
        for t in self.epoch_terms:
            part = t.epoch_state.accumulate(tally, self.hparams)
            if axis_name is not None:
                part = jax.lax.psum(part, axis_name)
            st = epoch_state[t.name]
            out[t.name] = {**st, "sums": jax.tree.map(jnp.add, st["sums"], part)}
        return out

    def epoch_update(self, epoch_state, lr_scale=1.0):
        """The epoch states after an epoch boundary (pure): each term's sums turned into its next value.
        `lr_scale`: the coming epoch's first learning rate / the base rate."""
        if epoch_state is None:
            return None
        scale = jnp.asarray(lr_scale, jnp.float32)
        return {t.name: t.epoch_state.epoch_update(epoch_state[t.name], self.hparams, scale)
                for t in self.epoch_terms}

    def attack_teacher(self, epoch_state, t_nat: Array, labels: Array) -> Array:
        """T(x) as the attack's target: the outer objective's `attack_teacher` of it (ABSLD), or T(x) itself."""
        hook = self.outer.attack_teacher
        if hook is None:
            return t_nat
        if epoch_state is None:
            epoch_state = self.init_epoch_state(t_nat.shape[-1])
        return hook(epoch_state[self.outer.name]["value"], t_nat, labels, self.hparams)

    def epoch_summary(self, epoch_state) -> Dict[str, Any]:
        """Per-epoch numbers of the epoch states for metrics.jsonl (host side)."""
        out = {}
        for t in self.epoch_terms:
            if t.epoch_state.summary is not None:
                out.update(t.epoch_state.summary(epoch_state[t.name], self.hparams))
        return out

    def loss(self, logits: Logits, labels: Array, state, info: StepInfo, epoch_state=None):
        """The outer loss plus every plug-in term: (loss, metrics, new method state). `epoch_state`: the terms'
        state across epochs (None: their initial state, for the number of classes of the logits)."""
        if self.epoch_terms:
            if epoch_state is None:
                num_classes = next(v for v in logits if v is not None).shape[-1]
                epoch_state = self.init_epoch_state(num_classes)
            info = info._replace(epoch_values={k: v["value"] for k, v in epoch_state.items()})
            weights = [p.example_weights(info.epoch_values[p.name], labels, self.hparams)
                       for p in self.plugins if p.example_weights is not None]
            if weights:
                w = weights[0]
                for extra in weights[1:]:
                    w = w * extra
                info = info._replace(example_weights=w)
        total, metrics, state = self.outer.loss(logits, labels, state, self.hparams, info)
        for plugin in self.plugins:
            term, extra, _ = plugin.loss(logits, labels, {}, self.hparams, info)
            total = total + term
            metrics = {**metrics, **extra}
        return total, metrics, state
