"""The method table: every training method is an inner objective (maximized over x') and an outer
objective (minimized over the student's parameters), looked up by name and chosen independently.

A method is data, not a branch in the train loop. Each objective declares the forwards it needs;
the train step computes exactly the union of those, once each, so a method never pays for a forward
it does not use. The names of the forwards:

  inner (evaluated at every PGD iterate or once before the loop, student in inference mode):
    "s_nat"   S(x), constant during the loop          (TRADES)
    "t_nat"   T(x), constant during the loop          (RSLAD)
    "t_iter"  T(x') at each iterate, differentiated   (MMARD: teacher forward+backward per step)
  outer (student in train mode; teacher always in inference mode, never differentiated):
    "s_adv" S(x'), "s_nat" S(x), "t_nat" T(x), "t_adv" T(x'), "t2_nat" second teacher T_nat(x)

Formulas: DESIGN §2 (the paper's Table 1); settings not fixed by the paper come from each
baseline's published code, cited next to its defaults. Adding a method is one inner function, one
outer function and a `METHODS` row.
"""

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mmard_jax import losses

Array = jax.Array
HParams = Mapping[str, Any]

INNER_FORWARDS = frozenset({"s_nat", "t_nat", "t_iter"})
OUTER_FORWARDS = frozenset({"s_adv", "s_nat", "t_nat", "t_adv", "t2_nat"})


class InnerInputs(NamedTuple):
    """What an inner objective sees at one PGD iterate x'."""

    s_adv: Array  # S(x') in inference mode
    labels: Array
    t_adv: Optional[Array] = None  # T(x') when "t_iter" is needed
    s_nat: Optional[Array] = None  # S(x) in inference mode, constant
    t_nat: Optional[Array] = None  # T(x), constant


class Logits(NamedTuple):
    """The forwards available to an outer objective (None where not computed)."""

    s_adv: Optional[Array] = None
    s_nat: Optional[Array] = None
    t_nat: Optional[Array] = None
    t_adv: Optional[Array] = None
    t2_nat: Optional[Array] = None


class StepInfo(NamedTuple):
    """Per-step values an outer objective may use (the scalars are traced: they never force a recompile)."""

    epoch: Array  # 0-based epoch of this step
    lr_scale: Array  # learning rate of this step / base learning rate
    axis_name: Optional[str] = None  # the data-parallel axis, for statistics of the global batch


def global_mean(value: Array, info: StepInfo) -> Array:
    """A batch mean over the global batch: averaged across devices when the step is data-parallel."""
    return value if info.axis_name is None else jax.lax.pmean(value, info.axis_name)


@dataclasses.dataclass(frozen=True)
class InnerObjective:
    """Per-example objective maximized over x', the forwards it needs, and the start of x'.

    `loss=None` means no inner maximization (x' = x).
    """

    name: str
    loss: Optional[Callable[[InnerInputs], Array]]
    needs: frozenset
    init: str  # "none" | "uniform" | "gaussian" (engine.INITS)


@dataclasses.dataclass(frozen=True)
class OuterObjective:
    """Scalar training loss on the student, its forwards, hyper-parameters and optional state.

    `loss(logits, labels, state, hp, info) -> (loss, metrics, new_state)`. `needs(hp, phase)` and
    `phase(hp, epoch)` are evaluated on the host: a phase is a static part of the compiled step
    (IAD has a warm-up phase that needs one teacher forward fewer).
    """

    name: str
    loss: Callable[..., tuple]
    needs: Callable[[HParams, str], frozenset]
    defaults: Mapping[str, Any]
    phase: Callable[[HParams, int], str] = lambda hp, epoch: "main"
    init_state: Callable[[HParams], Any] = lambda hp: {}


# ----------------------------------------------------------------------------- inner objectives


def _inner_ce(inp: InnerInputs) -> Array:
    return losses.cross_entropy(inp.s_adv, inp.labels)


def _inner_kl_self(inp: InnerInputs) -> Array:
    return losses.kl_div(inp.s_adv, inp.s_nat)


def _inner_kl_teacher_nat(inp: InnerInputs) -> Array:
    return losses.kl_div(inp.s_adv, inp.t_nat)


def _inner_kl_teacher_adv(inp: InnerInputs) -> Array:
    # Eq. 3: differentiated through the student AND the teacher at x'.
    return losses.kl_div(inp.s_adv, inp.t_adv)


# Starts: ARD/IAD `AttackPGD` (goldblum/AdversariallyRobustDistillation main.py, ZFancy/IAD IAD-I.py)
# and Madry's SAT start uniformly in the ball; TRADES, RSLAD (zibojia/RSLAD rslad_loss.py
# rslad_inner_loss), MTARD (zhaoshiji123/MTARD mtard/mtard_loss.py mtard_inner_loss_ce) and
# MMARD (paper §4.1, "random start size of 0.001") start at x + 0.001 N(0, 1).
INNER = {
    "nature": InnerObjective("nature", None, frozenset(), "none"),
    "sat": InnerObjective("sat", _inner_ce, frozenset(), "uniform"),
    "trades": InnerObjective("trades", _inner_kl_self, frozenset({"s_nat"}), "gaussian"),
    "ard": InnerObjective("ard", _inner_ce, frozenset(), "uniform"),
    "iad": InnerObjective("iad", _inner_ce, frozenset(), "uniform"),
    "rslad": InnerObjective("rslad", _inner_kl_teacher_nat, frozenset({"t_nat"}), "gaussian"),
    "mtard": InnerObjective("mtard", _inner_ce, frozenset(), "gaussian"),
    "mmard": InnerObjective("mmard", _inner_kl_teacher_adv, frozenset({"t_iter"}), "gaussian"),
}


# ----------------------------------------------------------------------------- outer objectives


def _num_classes(logits: Logits) -> int:
    return next(v for v in logits if v is not None).shape[-1]


def _kl(student: Array, teacher: Array, hp: HParams, temperature: float = 1.0) -> Array:
    return losses.reduce_kl(
        losses.kl_div(student, teacher, temperature), student.shape[-1], hp["kl_class_mean"]
    )


def _outer_nature(lg: Logits, y, state, hp, info):
    loss = jnp.mean(losses.cross_entropy(lg.s_nat, y))
    return loss, {"ce_nat": loss}, state


def _outer_sat(lg: Logits, y, state, hp, info):
    loss = jnp.mean(losses.cross_entropy(lg.s_adv, y))
    return loss, {"ce_adv": loss}, state


def _outer_trades(lg: Logits, y, state, hp, info):
    # yaodongyu/TRADES trades.py: CE(S(x)) + beta * (1/B) * KLDivLoss(size_average=False)(S(x'), S(x));
    # S(x) is not detached there, so both sides carry gradient.
    ce = jnp.mean(losses.cross_entropy(lg.s_nat, y))
    kl = _kl(lg.s_adv, lg.s_nat, hp)
    return ce + hp["beta"] * kl, {"ce_nat": ce, "kl_adv_nat": kl}, state


def _outer_ard(lg: Logits, y, state, hp, info):
    # goldblum/AdversariallyRobustDistillation main.py: alpha * T^2 * KLDivLoss()(S^T(x'), T^T(x))
    # + (1 - alpha) * CE(S(x), y), KLDivLoss() averaging over B*C.
    tau, a = hp["tau"], hp["alpha"]
    kl = _kl(lg.s_adv, lg.t_nat, hp, tau)
    loss = a * tau * tau * kl
    metrics = {"kl_adv_tnat": kl}
    if a != 1.0:
        ce = jnp.mean(losses.cross_entropy(lg.s_nat, y))
        loss = loss + (1.0 - a) * ce
        metrics["ce_nat"] = ce
    return loss, metrics, state


def _needs_ard(hp, phase):
    return frozenset({"s_adv", "t_nat"} | ({"s_nat"} if hp["alpha"] != 1.0 else set()))


def _outer_iad(lg: Logits, y, state, hp, info):
    # ZFancy/IAD IAD-II.py (and the paper's Table 1): after warm-up,
    # mean_b [ a_b tau^2 KL(S^tau(x'), T^tau(x)) + (1 - a_b) KL(S(x'), S(x)) ], a_b = T_y(x')^beta
    # held constant; IAD-I.py leaves the first term unweighted (`iad_weight_teacher_term=False`).
    tau = hp["tau"]
    kl_t = tau * tau * losses.kl_div(lg.s_adv, lg.t_nat, tau)
    if lg.t_adv is None:  # warm-up phase
        loss = jnp.mean(kl_t)
        return loss, {"kl_adv_tnat": loss}, state
    p_y = jnp.take_along_axis(jax.nn.softmax(lg.t_adv, axis=-1), y[:, None], axis=-1)[:, 0]
    trust = jax.lax.stop_gradient(p_y ** hp["beta"])
    kl_s = losses.kl_div(lg.s_adv, lg.s_nat)
    w_t = trust if hp["iad_weight_teacher_term"] else 1.0
    loss = jnp.mean(w_t * kl_t + (1.0 - trust) * kl_s)
    return loss, {"kl_adv_tnat": jnp.mean(kl_t), "kl_adv_snat": jnp.mean(kl_s), "trust": jnp.mean(trust)}, state


def _needs_iad(hp, phase):
    return frozenset({"s_adv", "t_nat"}) if phase == "warmup" else frozenset({"s_adv", "s_nat", "t_nat", "t_adv"})


def _phase_iad(hp, epoch):
    return "warmup" if epoch < hp["warmup_epochs"] else "main"


def _outer_rslad(lg: Logits, y, state, hp, info):
    # zibojia/RSLAD resnet18_rslad_cifar10.py: 5/6 * mean(kl(S(x'), T(x))) + 1/6 * mean(kl(S(x), T(x))),
    # torch.mean over B*C.
    a = hp["alpha"]
    kl_adv = _kl(lg.s_adv, lg.t_nat, hp)
    kl_nat = _kl(lg.s_nat, lg.t_nat, hp)
    return (1.0 - a) * kl_nat + a * kl_adv, {"kl_adv_tnat": kl_adv, "kl_nat_tnat": kl_nat}, state


def _outer_mtard(lg: Logits, y, state, hp, info):
    # zhaoshiji123/MTARD mtard/mtard_resnet18_cifar10.py: before each update,
    # w_nat <- w_nat - lr_w (w_nat - r_nat / (r_adv + r_nat)), r = (L / L_first)^bert, w_adv = 1 - w_nat,
    # with the losses' first-batch values as L_first; lr_w = 0.025 decays with the learning rate.
    kl_adv = _kl(lg.s_adv, lg.t_adv, hp)
    kl_nat = _kl(lg.s_nat, lg.t2_nat, hp)
    # The weights follow the global batch's losses (identical on every device).
    v_adv = global_mean(jax.lax.stop_gradient(kl_adv), info)
    v_nat = global_mean(jax.lax.stop_gradient(kl_nat), info)
    first = jnp.logical_not(state["initialized"])
    init_adv = jnp.where(first, v_adv, state["init_adv"])
    init_nat = jnp.where(first, v_nat, state["init_nat"])
    r_adv = (v_adv / init_adv) ** hp["bert"]
    r_nat = (v_nat / init_nat) ** hp["bert"]
    lr_w = hp["weight_lr"] * info.lr_scale
    w_nat = state["w_nat"] - lr_w * (state["w_nat"] - r_nat / (r_adv + r_nat))
    loss = (1.0 - w_nat) * kl_adv + w_nat * kl_nat
    new_state = {"w_nat": w_nat, "init_adv": init_adv, "init_nat": init_nat, "initialized": jnp.array(True)}
    return loss, {"kl_adv_tadv": kl_adv, "kl_nat_t2nat": kl_nat, "w_nat": w_nat}, new_state


def _init_mtard(hp):
    return {
        "w_nat": jnp.asarray(hp["w_nat_init"], jnp.float32),
        "init_adv": jnp.asarray(1.0, jnp.float32),
        "init_nat": jnp.asarray(1.0, jnp.float32),
        "initialized": jnp.array(False),
    }


def _outer_mmard(lg: Logits, y, state, hp, info):
    # Eq. 7: KL(S(x'), T(x')) + alpha * L_TRD; L_TRD = reduce_b Huber_delta(psi_s - psi_t) (Eq. 5-6).
    kl = _kl(lg.s_adv, lg.t_adv, hp)
    if hp["alpha"] == 0.0:  # Eq. 4 alone (Figure 4, variant C)
        return kl, {"kl_adv_tadv": kl}, state
    trd = losses.trd_loss(
        lg.s_nat, lg.s_adv, lg.t_nat, lg.t_adv, y, hp["delta"],
        use_probs=hp["trd_use_probs"], reduction=hp["trd_reduction"],
    )
    return kl + hp["alpha"] * trd, {"kl_adv_tadv": kl, "trd": trd}, state


def _needs_mmard(hp, phase):
    return frozenset({"s_adv", "t_adv"}) if hp["alpha"] == 0.0 else frozenset({"s_adv", "s_nat", "t_nat", "t_adv"})


def _const(*names):
    needs = frozenset(names)
    return lambda hp, phase: needs


OUTER = {
    "nature": OuterObjective("nature", _outer_nature, _const("s_nat"), {}),
    "sat": OuterObjective("sat", _outer_sat, _const("s_adv"), {}),
    # TRADES: beta = 6 (yaodongyu/TRADES train_trades_cifar10.py), KL summed over classes / B.
    "trades": OuterObjective("trades", _outer_trades, _const("s_adv", "s_nat"), {"beta": 6.0, "kl_class_mean": False}),
    # ARD: temp 30, alpha 1 (main.py defaults; the MMARD paper uses alpha = 1), KLDivLoss() mean over B*C.
    "ard": OuterObjective("ard", _outer_ard, _needs_ard, {"tau": 30.0, "alpha": 1.0, "kl_class_mean": True}),
    # IAD: temp 1, beta 0.1, warm-up ('--begin') 60 epochs (IAD-I.py / IAD-II.py defaults), KL summed / B.
    "iad": OuterObjective(
        "iad", _outer_iad, _needs_iad,
        {"tau": 1.0, "beta": 0.1, "warmup_epochs": 60, "iad_weight_teacher_term": True, "kl_class_mean": False},
        phase=_phase_iad,
    ),
    # RSLAD: alpha 5/6, torch.mean over B*C.
    "rslad": OuterObjective("rslad", _outer_rslad, _const("s_adv", "s_nat", "t_nat"), {"alpha": 5.0 / 6.0, "kl_class_mean": True}),
    # MTARD: weight lr 0.025, bert 1, initial weights 1/2, torch.mean over B*C.
    "mtard": OuterObjective(
        "mtard", _outer_mtard, _const("s_adv", "s_nat", "t_adv", "t2_nat"),
        {"weight_lr": 0.025, "bert": 1.0, "w_nat_init": 0.5, "kl_class_mean": True},
        init_state=_init_mtard,
    ),
    # MMARD: alpha 1 (paper §4.1); delta 1, probabilities, batch mean and class-summed KL are our
    # choices where the paper publishes no code (DESIGN §2).
    "mmard": OuterObjective(
        "mmard", _outer_mmard, _needs_mmard,
        {"alpha": 1.0, "delta": 1.0, "trd_use_probs": True, "trd_reduction": "mean", "kl_class_mean": False},
    ),
}

METHODS = tuple(OUTER)


@dataclasses.dataclass(frozen=True)
class Method:
    """A resolved (inner, outer, hyper-parameters) triple, ready for the train step."""

    inner: InnerObjective
    outer: OuterObjective
    hparams: Mapping[str, Any]

    def phase(self, epoch: int) -> str:
        """Static phase of the compiled step at this epoch ('main' for all but IAD's warm-up)."""
        return self.outer.phase(self.hparams, epoch)

    def outer_needs(self, phase: str) -> frozenset:
        return self.outer.needs(self.hparams, phase)

    def forwards(self, phase: str) -> frozenset:
        """Every forward the step computes: inner needs (prefixed 'inner:') and outer needs."""
        return frozenset(f"inner:{n}" for n in self.inner.needs) | self.outer_needs(phase)

    def init_state(self):
        return self.outer.init_state(self.hparams)


def _lookup(table: Mapping[str, Any], name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def get_method(name: str, inner: Optional[str] = None, outer: Optional[str] = None, **overrides) -> Method:
    """Resolves a method by name; `inner`/`outer` pick another method's objective (Table 6, Figure 4).

    Hyper-parameters belong to the outer objective: `overrides` update its published defaults, and
    a name it does not take is an error that lists the accepted ones.
    """
    _lookup(OUTER, name, "method")
    inner_obj = _lookup(INNER, inner or name, "inner objective")
    outer_obj = _lookup(OUTER, outer or name, "outer objective")
    unknown = set(overrides) - set(outer_obj.defaults)
    if unknown:
        raise ValueError(
            f"outer objective {outer_obj.name!r} takes no hyper-parameter {sorted(unknown)}; "
            f"it takes {sorted(outer_obj.defaults) or 'none'}"
        )
    hp = dict(outer_obj.defaults)
    for key, value in overrides.items():
        hp[key] = type(outer_obj.defaults[key])(value)
    return Method(inner_obj, outer_obj, hp)
