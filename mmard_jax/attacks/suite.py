"""The paper's evaluation attacks (docs/design.md, "Evaluation") as per-batch functions, and the trust checks.

The white-box attacks (FGSM, PGD_S, PGD_T, CW) are configurations of the one projected-gradient engine;
'aa' is AutoAttack (`attacks/autoattack.py`), whose components can also run alone by name. Running them over
a whole split (batching, devices, keys per example) is `mmard_jax.evaluator.Evaluator`'s job.
`input_gradient_health` and `trust_flags` report the signs of an unreliable evaluation that AutoAttack's
authors list (gradient masking: zero/NaN gradients, a weaker attack beating a stronger one).
"""

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mmard_jax import losses
from mmard_jax.attacks import autoattack, engine

Array = jax.Array
ApplyFn = Callable[[Array], Array]


@dataclasses.dataclass(frozen=True)
class PGDAttack:
    """A white-box attack run by the engine (L-inf or L2): objective, steps, step size as a fraction of eps, start.

    Step sizes scale with eps so the attacks stay meaningful at other radii (the demo uses 32/255);
    at eps = 8/255 they are the published absolute values.
    """

    name: str
    loss: str  # "ce" (maximize cross-entropy) or "cw" (minimize the CW margin, kappa 50)
    steps: int
    step_fraction: float
    init: str
    kappa: float = 50.0

    def objective(self, apply_fn: ApplyFn, y: Array) -> Callable[[Array], Array]:
        """Scalar objective of x' (a sum, so each example keeps its own gradient sign)."""
        if self.loss == "ce":
            return lambda z: jnp.sum(losses.cross_entropy(apply_fn(z), y))
        if self.loss == "cw":
            return lambda z: -jnp.sum(losses.cw_margin(apply_fn(z), y, self.kappa))
        raise ValueError(f"attack {self.name}: unknown loss {self.loss!r}")

    def perturb(self, apply_fn: ApplyFn, x: Array, y: Array, *, eps: float, rng=None, unroll=1,
                norm: str = "Linf") -> Array:
        step = self.step_fraction * eps
        return engine.pgd(
            self.objective(apply_fn, y), x, eps=eps, step_size=step, steps=self.steps,
            init=self.init, rng=rng, unroll=unroll, norm=norm,
        )


# docs/design.md "Evaluation", at eps = 8/255: FGSM one step of size eps; PGD_S Madry (20 x 2/255, uniform start);
# PGD_T TRADES's pgd_attack_cifar10.py (20 x 0.003, uniform start); CW_inf 20 x 2/255 on the margin
# loss with a uniform start, as the ARD/IAD evaluation code (ZFancy/IAD attack_generator.py, "Madry").
EPS_REFERENCE = 8 / 255
WHITE_BOX = {
    "fgsm": PGDAttack("fgsm", "ce", 1, 1.0, "none"),
    "pgd_s": PGDAttack("pgd_s", "ce", 20, (2 / 255) / EPS_REFERENCE, "uniform"),
    "pgd_t": PGDAttack("pgd_t", "ce", 20, 0.003 / EPS_REFERENCE, "uniform"),
    "cw": PGDAttack("cw", "cw", 20, (2 / 255) / EPS_REFERENCE, "uniform"),
}
# Append only: an attack's position keys its randomness. 'aa' is the AutoAttack cascade; its components
# run alone give the per-component masks (the same per-example outcomes as inside the cascade).
AA_COMPONENTS = autoattack.COMPONENTS
ATTACKS = ("clean",) + tuple(WHITE_BOX) + ("aa",) + AA_COMPONENTS
PER_BATCH = ("clean",) + tuple(WHITE_BOX)  # attacks decided per example in one pass (the rest: a cascade)


def correct_under(name: str, apply_fn: ApplyFn, x: Array, y: Array, *, eps: float, rng=None, unroll=1,
                  norm: str = "Linf") -> Array:
    """Boolean [B]: the model's prediction on x (clean) or on the attacked x' is the label. Under L2 the same
    attacks take normalised-gradient steps of the same fraction of eps (engine.pgd)."""
    if name == "clean":
        x_adv = x
    elif name in WHITE_BOX:
        x_adv = WHITE_BOX[name].perturb(apply_fn, x, y, eps=eps, rng=rng, unroll=unroll, norm=norm)
    else:
        raise ValueError(f"unknown per-batch attack {name!r}; known: clean, {', '.join(WHITE_BOX)} "
                         f"(AutoAttack runs as a cascade over a split: evaluator.Evaluator.autoattack)")
    return jnp.argmax(apply_fn(x_adv), axis=-1) == y


def attack_key(seed: int, name: str) -> Array:
    """The key of one attack for a seed, folded with the attack's fixed id: its randomness does not depend on
    which other attacks run."""
    return jax.random.fold_in(jax.random.key(seed), ATTACKS.index(name))


def aa_key(seed: int) -> Array:
    """AutoAttack's key for a seed: its components fold their index into it (`autoattack.cascade`)."""
    return attack_key(seed, "aa")


def input_gradient_health(apply_fn: ApplyFn, x: Array, y: Array) -> Tuple[Array, Array]:
    """(zero [B], nonfinite [B]): the cross-entropy input gradient at x is exactly zero / has a NaN or inf."""
    g = jax.grad(lambda z: jnp.sum(losses.cross_entropy(apply_fn(z), y)))(x)
    g = g.reshape(g.shape[0], -1)
    finite = jnp.all(jnp.isfinite(g), axis=1)
    return finite & jnp.all(g == 0, axis=1), ~finite


# Pairs (weaker, stronger): the stronger attack's accuracy should not be above the weaker one's.
STRENGTH_ORDER = (
    ("fgsm", "pgd_s"), ("fgsm", "pgd_t"), ("fgsm", "cw"),
    ("fgsm", "aa"), ("pgd_s", "aa"), ("pgd_t", "aa"), ("cw", "aa"),
) + tuple((c, "aa") for c in AA_COMPONENTS)
# Gradient-based attacks that must lower the accuracy of any model that is not perfectly robust.
NO_PROGRESS_CHECKED = ("fgsm", "pgd_s", "pgd_t", "cw", "apgd_ce")
GRADIENT_FRACTION = 0.01  # flag when more than 1% of the examples have zero or non-finite input gradients
SQUARE_GAIN = 0.002  # AutoAttack's check_square_sr: Square fooling > 0.2% after the white-box components


def trust_flags(
    accuracy: Mapping[str, float],
    *,
    gradients: Optional[Mapping[str, np.ndarray]] = None,
    aa_after: Optional[Mapping[str, float]] = None,
    gradient_fraction: float = GRADIENT_FRACTION,
    square_gain: float = SQUARE_GAIN,
) -> List[Dict[str, str]]:
    """Signs of an unreliable evaluation (gradient masking), as AutoAttack's authors list them; [] if none.

    `accuracy`: attack -> accuracy; `gradients`: `gradient_health`'s masks; `aa_after`: AutoAttack's
    cumulative accuracy after each component (`AutoAttackResult.accuracies()`). Each flag is
    {'check': id, 'message': text}.
    """
    flags = []

    def flag(check: str, message: str) -> None:
        flags.append({"check": check, "message": message})

    if aa_after and "apgd_ce" in aa_after:  # the first cascade step is APGD-CE alone on the clean-correct points
        accuracy = {"apgd_ce": aa_after["apgd_ce"], **accuracy}
    clean = accuracy.get("clean")
    if clean is not None:
        for name, acc in accuracy.items():
            if name != "clean" and acc > clean:
                flag("above_clean", f"{name} accuracy {acc:.2%} exceeds clean accuracy {clean:.2%}")
        for name in NO_PROGRESS_CHECKED:
            if name in accuracy and clean > 0 and accuracy[name] >= clean:
                flag("not_below_clean", f"{name} accuracy {accuracy[name]:.2%} is not below clean accuracy "
                                        f"{clean:.2%}: the attack makes no progress")
    for weak, strong in STRENGTH_ORDER:
        if weak in accuracy and strong in accuracy and accuracy[strong] > accuracy[weak]:
            flag("stronger_above_weaker",
                 f"{strong} accuracy {accuracy[strong]:.2%} exceeds the weaker {weak}'s {accuracy[weak]:.2%}")
    if gradients is not None:
        for kind, what in (("zero", "all-zero"), ("nonfinite", "NaN/inf")):
            frac = float(np.mean(gradients[kind])) if len(gradients[kind]) else 0.0
            if frac > gradient_fraction:
                flag(f"{kind}_gradients", f"{frac:.2%} of the examples have {what} input gradients: "
                                          f"gradient-based attacks are unreliable here")
    if aa_after and "square" in aa_after:
        before = [v for k, v in aa_after.items() if k not in ("square", "aa")]
        if before and aa_after["square"] < min(before) - square_gain:
            flag("square_gain", f"Square (black-box) lowered the accuracy by {min(before) - aa_after['square']:.2%} "
                                f"after the gradient-based attacks: a sign of gradient masking")
    return flags
