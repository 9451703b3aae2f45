"""AutoAttack 'standard' for L-inf and L2 (Croce & Hein, ICML 2020): APGD-CE, APGD-T, FAB-T and Square, run in
cascade, each on the examples that every earlier attack left correctly classified; an example counts as
robust only if no component fools it (worst case per example).

Standard settings (fra31/auto-attack `autoattack.py`, `set_version('standard')`): APGD-CE 100 iterations,
1 restart; APGD-T 100 iterations on the targeted DLR loss, 9 target classes, 1 restart each; FAB-T 100
iterations, 9 target classes; Square 5000 queries, p_init 0.8, 1 restart, window corners drawn as the
original code draws them (never the last offset; `square_full_range` for all of them, see square.py).
The L2 version (`AutoAttackConfig.norm = "L2"`) has the same components and settings (pyautoattack 0.2.0
autoattack.py lines 301-315: the 'standard' branch sets them alike for 'Linf' and 'L2'); each component runs
its L2 form (apgd.py, fab.py, square.py) and the final check measures the L2 distance.

Speed and exactness: `cascade` runs at split level. Before every run (a restart or a target class) the
indices of the still-robust examples go to `run_points` (`mmard_jax.evaluator.Evaluator`), which batches
them in a few fixed shapes, so padded work stays under 2x and compilations stay few; inside a batch the
attack loop stops as soon as every real example is fooled, and Square also drops the fooled examples
between chunks of queries (the original drops them at every query; its APGD and FAB run every iteration
on the whole batch of a run: pyautoattack/autopgd_base.py line 319, fab_base.py line 164). APGD-CE and
APGD-T share one compiled program (`PROGRAMS`). Every example draws its randomness from (seed, component,
run, its index in the split), so its outcome depends neither on the batch it lands in, nor on the number of
devices, nor on which other components ran: the AA mask equals the AND of the masks of the components run
alone.
"""

import dataclasses
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mmard_jax.attacks import apgd, engine, fab, square

Array = jax.Array
ApplyFn = Callable[[Array], Array]

COMPONENTS = ("apgd_ce", "apgd_t", "fab_t", "square")
TITLES = {"apgd_ce": "APGD-CE", "apgd_t": "APGD-T", "fab_t": "FAB-T", "square": "Square"}
# Slack for the final feasibility check: the iterates are projected, so |x' - x| exceeds eps only by rounding.
FEASIBILITY_SLACK = 1e-6
# L2: the norm sums the rounding of every pixel's x' - x (up to ~6e-8 each in float32, about sqrt(D) of them
# adding up at random), so the slack grows with the image: 1e-5 covers 3 x 32 x 32 with margin.
FEASIBILITY_SLACK_L2 = 1e-5


@dataclasses.dataclass(frozen=True)
class AutoAttackConfig:
    """AutoAttack's settings; the defaults are the 'standard' version. Smaller values only for tests/smoke runs."""

    components: Tuple[str, ...] = COMPONENTS
    n_iter: int = 100  # APGD-CE, APGD-T, FAB-T iterations
    apgd_restarts: int = 1
    n_target_classes: int = 9  # APGD-T and FAB-T (capped at num_classes - 1)
    square_queries: int = 5000
    square_p_init: float = square.P_INIT
    square_restarts: int = 1
    square_rescale_schedule: bool = False  # AutoAttack: False; torchattacks' Square defaults to True
    # pyautoattack/square.py lines 117-119, 257-258: the window's corner never takes the last offset h - s;
    # True draws it over all h - s + 1 offsets (the paper's statement), making numbers non-standard.
    square_full_range: bool = False
    rho: float = apgd.RHO
    fab_alpha_max: float = fab.ALPHA_MAX
    fab_eta: float = fab.ETA
    fab_beta: float = fab.BETA
    # The threat model, 'Linf' or 'L2' (engine.NORMS): which form of every component runs, and the final check's
    # distance. Not a setting of the version: 'standard' is 'standard' under either (`describe`).
    norm: str = "Linf"

    def __post_init__(self):
        engine.check_norm(self.norm)
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown AutoAttack component(s) {unknown}; known: {', '.join(COMPONENTS)}")


STANDARD = AutoAttackConfig()


def describe(config: AutoAttackConfig, compute_dtype: str = "float32",
             matmul_precision: Optional[str] = "highest") -> str:
    """'standard', or 'custom' followed by what differs from the standard version: settings, a compute dtype
    other than float32, or float32 matmuls below full precision (TF32 on GPUs). The norm is the threat model,
    not a setting: the standard version of each norm has the same settings (it is reported beside eps)."""
    standard = dataclasses.replace(STANDARD, norm=config.norm)
    diffs = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
             if getattr(config, f.name) != getattr(standard, f.name)]
    if compute_dtype != "float32":
        diffs.append(f"{compute_dtype} compute")
    if matmul_precision not in ("highest", "float32"):
        diffs.append(f"matmul precision {matmul_precision or 'default (TF32 on GPUs)'}")
    return "standard" if not diffs else "custom (" + ", ".join(diffs) + ")"


def square_settings(config: AutoAttackConfig) -> Dict[str, Any]:
    """Square's keyword settings from the config: the one place they are read (a whole run and the evaluator's
    chunks of queries take the same)."""
    return {"n_queries": config.square_queries, "p_init": config.square_p_init,
            "rescale_schedule": config.square_rescale_schedule, "full_range": config.square_full_range,
            "norm": config.norm}


def num_runs(name: str, config: AutoAttackConfig, num_classes: int) -> int:
    """How many runs a component makes: its restarts, or one per target class."""
    if name == "apgd_ce":
        return config.apgd_restarts
    if name in ("apgd_t", "fab_t"):
        if num_classes < 4 and name == "apgd_t":
            raise ValueError(f"APGD-T's targeted DLR loss needs at least 4 classes, the model has {num_classes}")
        return min(config.n_target_classes, num_classes - 1)
    if name == "square":
        return config.square_restarts
    raise ValueError(f"unknown AutoAttack component {name!r}; known: {', '.join(COMPONENTS)}")


def run_component(
    name: str,
    apply_fn: ApplyFn,
    x: Array,
    y: Array,
    keys: Array,
    run: Array,
    *,
    eps: float,
    config: AutoAttackConfig = STANDARD,
    active: Optional[Array] = None,
) -> Tuple[Array, Array]:
    """One run of one component on a batch under `config.norm`: (x_adv, fooled [B]). `run` (traced int) is the
    restart or the target index (0 = the best wrong class); `keys` are per-example keys already specific to
    this run."""
    norm = config.norm
    if name == "apgd_ce":
        return apgd.apgd_ce(apply_fn, x, y, keys, eps=eps, n_iter=config.n_iter, rho=config.rho, active=active,
                            norm=norm)
    if name == "apgd_t":
        return apgd.apgd_targeted(apply_fn, x, y, keys, run + 2, eps=eps, n_iter=config.n_iter, rho=config.rho,
                                  active=active, norm=norm)
    if name == "fab_t":
        target = apgd.target_classes(apply_fn(x), run + 2)
        return fab.fab_targeted(apply_fn, x, y, target, eps=eps, n_iter=config.n_iter, alpha_max=config.fab_alpha_max,
                                eta=config.fab_eta, beta=config.fab_beta, active=active, norm=norm)
    if name == "square":
        return square.square_attack(apply_fn, x, y, keys, eps=eps, active=active, **square_settings(config))
    raise ValueError(f"unknown AutoAttack component {name!r}; known: {', '.join(COMPONENTS)}")


# The compiled program each component runs in (evaluator.Evaluator): APGD-CE and APGD-T share APGD's.
PROGRAMS = {"apgd_ce": "apgd", "apgd_t": "apgd", "fab_t": "fab_t", "square": "square"}


def program_arg(name: str, run: int) -> int:
    """The traced int a component's program takes for one run: APGD's loss switch (0: cross-entropy, else the
    rank of the target logit), FAB-T's target rank, Square's restart."""
    if name == "apgd_ce":
        return 0
    if name in ("apgd_t", "fab_t"):
        return run + 2
    return run


def run_program(program: str, apply_fn: ApplyFn, x: Array, y: Array, keys: Array, arg: Array, *, eps: float,
                config: AutoAttackConfig = STANDARD, active: Optional[Array] = None) -> Tuple[Array, Array]:
    """One run of a program (PROGRAMS) on a batch with its traced `arg` (`program_arg`): (x_adv, fooled [B])."""
    if program == "apgd":
        return apgd.apgd_ce_or_targeted(apply_fn, x, y, keys, arg, eps=eps, n_iter=config.n_iter, rho=config.rho,
                                        active=active, norm=config.norm)
    if program == "fab_t":
        return run_component("fab_t", apply_fn, x, y, keys, arg - 2, eps=eps, config=config, active=active)
    if program == "square":
        return run_component("square", apply_fn, x, y, keys, arg, eps=eps, config=config, active=active)
    raise ValueError(f"unknown AutoAttack program {program!r}; known: {', '.join(sorted(set(PROGRAMS.values())))}")


def fooled_check(apply_fn: ApplyFn, x: Array, x_adv: Array, y: Array, eps: float, norm: str = "Linf") -> Array:
    """bool [B]: x_adv is misclassified, within the eps-ball of `norm` (up to rounding: FEASIBILITY_SLACK,
    FEASIBILITY_SLACK_L2) and in [0, 1] (AutoAttack's final check)."""
    if engine.check_norm(norm) == "L2":
        dist, slack = engine.l2_norm(x_adv - x), FEASIBILITY_SLACK_L2
    else:
        dist, slack = jnp.max(jnp.abs(x_adv - x).reshape(x.shape[0], -1), axis=1), FEASIBILITY_SLACK
    inside = (dist <= eps + slack) & jnp.all((x_adv >= 0) & (x_adv <= 1), axis=tuple(range(1, x.ndim)))
    return inside & (jnp.argmax(apply_fn(x_adv), axis=-1) != y)


@dataclasses.dataclass
class AutoAttackResult:
    """Per-example outcome of the cascade over a split.

    robust: bool [N], correct on x and not fooled by any component that ran.
    after: component -> bool [N], robust after that component (cumulative, in cascade order).
    fooled_by: int8 [N], index in COMPONENTS of the component that fooled the example; -1 never fooled,
    -2 misclassified already on x.
    seconds: component -> wall-clock seconds it took (compilation included).
    x_adv: when asked for (the evaluator's keep_adversarial), the worst-case adversarial images.
    """

    robust: np.ndarray
    after: Dict[str, np.ndarray]
    fooled_by: np.ndarray
    seconds: Dict[str, float] = dataclasses.field(default_factory=dict)
    x_adv: Optional[np.ndarray] = None  # float32 [N, ...]: the adversarial image of each fooled example, x elsewhere

    def accuracies(self) -> Dict[str, float]:
        """Robust accuracy after each component, in cascade order, and overall ('aa')."""
        out = {name: float(mask.mean()) for name, mask in self.after.items()}
        out["aa"] = float(self.robust.mean())
        return out


# run_points(component, run, indices, progress) -> bool [len(indices)]: which of those examples the run fooled;
# it may call progress(fooled so far, text) while it runs (Square does, between its chunks of queries).
RunPoints = Callable[..., np.ndarray]
# report(component, robust, total, runs_left, now) as the cascade goes: the examples still robust, out of all, and
# the runs of that component left (0 when it is done); `now` says where a run is ('' between runs).
Report = Callable[[str, int, int, int, str], None]


def cascade(
    run_points: RunPoints,
    clean_correct: np.ndarray,
    *,
    config: AutoAttackConfig = STANDARD,
    num_classes: int,
    components: Optional[Sequence[str]] = None,
    report: Optional[Report] = None,
) -> AutoAttackResult:
    """Runs `components` (default: the config's) in cascade from `clean_correct`: each run of each component
    attacks only the examples still robust, through `run_points` (the evaluator batches them), telling `report`
    (the caller's progress display) how many examples are still robust and how many runs are left."""
    say = report or (lambda *_: None)
    components = tuple(config.components if components is None else components)
    robust = np.array(clean_correct, bool)
    fooled_by = np.where(robust, -1, -2).astype(np.int8)
    after, seconds = {}, {}
    for name in components:
        start = time.perf_counter()
        runs = num_runs(name, config, num_classes)
        for run in range(runs):
            todo = np.flatnonzero(robust)
            say(name, todo.size, robust.size, runs - run, "")
            if todo.size == 0:
                break

            def progress(fooled: int, text: str, todo=todo, run=run) -> None:
                say(name, todo.size - fooled, robust.size, runs - run, text)

            hit = todo[np.asarray(run_points(name, run, todo, progress), bool)]
            robust[hit] = False
            fooled_by[hit] = COMPONENTS.index(name)
        say(name, int(robust.sum()), robust.size, 0, "")
        after[name] = robust.copy()
        seconds[name] = time.perf_counter() - start
    return AutoAttackResult(robust=robust, after=after, fooled_by=fooled_by, seconds=seconds)
