"""AutoAttack 'standard' for L-inf (Croce & Hein, ICML 2020): APGD-CE, APGD-T, FAB-T and Square, run in
cascade, each on the examples that every earlier attack left correctly classified; an example counts as
robust only if no component fools it (worst case per example).

Standard settings (fra31/auto-attack `autoattack.py`, `set_version('standard')`): APGD-CE 100 iterations,
1 restart; APGD-T 100 iterations on the targeted DLR loss, 9 target classes, 1 restart each; FAB-T 100
iterations, 9 target classes; Square 5000 queries, p_init 0.8, 1 restart, window corners drawn as the
original code draws them (never the last offset; `square_full_range` for all of them, see square.py).

Speed and exactness on accelerators: the cascade runs at split level. Before every run (a restart or a
target class) the indices of the still-robust examples are gathered on the host into fixed-size batches
(the last one padded and masked), so each component compiles once and spends compute only on points that
can still change; inside a batch the attack loop stops as soon as every real example is fooled. Every
example draws its randomness from (seed, component, run, its index in the split), so its outcome depends
neither on the batch it lands in, nor on the number of devices, nor on which other components ran: the AA
mask equals the AND of the masks of the components run alone.
"""

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mmard_jax import parallel
from mmard_jax.attacks import apgd, fab, square
from mmard_jax.data.augment import to_float

Array = jax.Array
ApplyFn = Callable[[Array], Array]

COMPONENTS = ("apgd_ce", "apgd_t", "fab_t", "square")
TITLES = {"apgd_ce": "APGD-CE", "apgd_t": "APGD-T", "fab_t": "FAB-T", "square": "Square"}
# Slack for the final feasibility check: the iterates are projected, so |x' - x| exceeds eps only by rounding.
FEASIBILITY_SLACK = 1e-6


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

    def __post_init__(self):
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown AutoAttack component(s) {unknown}; known: {', '.join(COMPONENTS)}")


STANDARD = AutoAttackConfig()


def describe(config: AutoAttackConfig) -> str:
    """'standard', or 'custom' followed by the settings that differ from the standard version."""
    diffs = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
             if getattr(config, f.name) != getattr(STANDARD, f.name)]
    return "standard" if not diffs else "custom (" + ", ".join(diffs) + ")"


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
    """One run of one component on a batch: (x_adv, fooled [B]). `run` (traced int) is the restart or the
    target index (0 = the best wrong class); `keys` are per-example keys already specific to this run."""
    if name == "apgd_ce":
        return apgd.apgd_ce(apply_fn, x, y, keys, eps=eps, n_iter=config.n_iter, rho=config.rho, active=active)
    if name == "apgd_t":
        return apgd.apgd_targeted(apply_fn, x, y, keys, run + 2, eps=eps, n_iter=config.n_iter, rho=config.rho,
                                  active=active)
    if name == "fab_t":
        target = apgd.target_classes(apply_fn(x), run + 2)
        return fab.fab_targeted(apply_fn, x, y, target, eps=eps, n_iter=config.n_iter, alpha_max=config.fab_alpha_max,
                                eta=config.fab_eta, beta=config.fab_beta, active=active)
    if name == "square":
        return square.square_linf(apply_fn, x, y, keys, eps=eps, n_queries=config.square_queries,
                                  p_init=config.square_p_init, rescale_schedule=config.square_rescale_schedule,
                                  full_range=config.square_full_range, active=active)
    raise ValueError(f"unknown AutoAttack component {name!r}; known: {', '.join(COMPONENTS)}")


def fooled_check(apply_fn: ApplyFn, x: Array, x_adv: Array, y: Array, eps: float) -> Array:
    """bool [B]: x_adv is misclassified, within the eps-ball (up to rounding) and in [0, 1] (AutoAttack's
    final check)."""
    dist = jnp.max(jnp.abs(x_adv - x).reshape(x.shape[0], -1), axis=1)
    inside = (dist <= eps + FEASIBILITY_SLACK) & jnp.all((x_adv >= 0) & (x_adv <= 1), axis=tuple(range(1, x.ndim)))
    return inside & (jnp.argmax(apply_fn(x_adv), axis=-1) != y)


def make_component_evaluator(module, mesh, name: str, *, eps: float, config: AutoAttackConfig = STANDARD):
    """Jitted, data-parallel `f(variables, images_u8, labels, idx, valid, key, run) -> fooled [B]` for one component.

    `images_u8`/`labels` are the whole split (replicated); `idx` a batch of split indices and `valid` its
    padding mask (both sharded over 'data'); `key` the component's key; `run` the restart/target index.
    """

    def per_device(variables, images, labels, idx, valid, key, run):
        x = to_float(images[idx])
        y = labels[idx]
        apply_fn = lambda z: module.apply(variables, z, train=False)  # noqa: E731
        keys = parallel.example_keys(jax.random.fold_in(key, run), idx)
        x_adv, _ = run_component(name, apply_fn, x, y, keys, run, eps=eps, config=config, active=valid)
        return valid & fooled_check(apply_fn, x, x_adv, y, eps)

    mapped = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(P(), P(), P(), P(parallel.AXIS), P(parallel.AXIS), P(), P()),
        out_specs=P(parallel.AXIS),
        check_vma=False,  # loop carries start from constants and become per-device inside the loops
    )
    return jax.jit(mapped)


def infer_num_classes(module, variables, images) -> int:
    """The module's `num_classes`, else the width of its logits (shape inference only, no compute)."""
    if getattr(module, "num_classes", None):
        return int(module.num_classes)
    x = jax.ShapeDtypeStruct((1,) + tuple(images.shape[1:]), jnp.float32)
    return int(jax.eval_shape(lambda v, z: module.apply(v, z, train=False), variables, x).shape[-1])


def padded_batches(indices: np.ndarray, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(idx int32 [n_batches, batch_size], valid bool [same]): `indices` in order, the tail padded with its
    first entry (a valid index, masked out)."""
    n = len(indices)
    n_batches = -(-n // batch_size)
    flat = np.full(n_batches * batch_size, indices[0] if n else 0, np.int32)
    flat[:n] = indices
    valid = np.arange(n_batches * batch_size) < n
    return flat.reshape(n_batches, batch_size), valid.reshape(n_batches, batch_size)


@dataclasses.dataclass
class AutoAttackResult:
    """Per-example outcome of the cascade over a split.

    robust: bool [N], correct on x and not fooled by any component that ran.
    after: component -> bool [N], robust after that component (cumulative, in cascade order).
    fooled_by: int8 [N], index in COMPONENTS of the component that fooled the example; -1 never fooled,
    -2 misclassified already on x.
    """

    robust: np.ndarray
    after: Dict[str, np.ndarray]
    fooled_by: np.ndarray

    def accuracies(self) -> Dict[str, float]:
        """Robust accuracy after each component, in cascade order, and overall ('aa')."""
        out = {name: float(mask.mean()) for name, mask in self.after.items()}
        out["aa"] = float(self.robust.mean())
        return out


def evaluate_split(
    module,
    variables,
    images,
    labels,
    clean_correct: np.ndarray,
    *,
    key: Array,
    eps: float,
    batch_size: int,
    mesh,
    config: AutoAttackConfig = STANDARD,
    components: Optional[Sequence[str]] = None,
    num_classes: Optional[int] = None,
    progress: bool = True,
    evaluators: Optional[Dict] = None,
) -> AutoAttackResult:
    """Runs the cascade of `components` (default: the config's) over a split, starting from `clean_correct`.

    `images`/`labels`/`variables` should already be replicated on the mesh (see `suite.evaluate_split`);
    `key` is AutoAttack's key: component c uses fold_in(key, COMPONENTS.index(c)), whichever others run.
    """
    components = tuple(config.components if components is None else components)
    parallel.check_divisible(batch_size, mesh, "evaluation batch size")
    num_classes = num_classes or infer_num_classes(module, variables, images)
    evaluators = {} if evaluators is None else evaluators
    sharded = parallel.batch_sharded(mesh)
    robust = np.array(clean_correct, bool)
    fooled_by = np.where(robust, -1, -2).astype(np.int8)
    after = {}
    for name in components:
        cache_key = ("aa", name, eps, config)
        if cache_key not in evaluators:
            evaluators[cache_key] = make_component_evaluator(module, mesh, name, eps=eps, config=config)
        fn = evaluators[cache_key]
        component_key = jax.random.fold_in(key, COMPONENTS.index(name))
        runs = num_runs(name, config, num_classes)
        bar = tqdm(total=0, desc=f"aa {name}", disable=not progress, leave=False, dynamic_ncols=True)
        for run in range(runs):
            todo = np.flatnonzero(robust)
            if todo.size == 0:
                break
            idx, valid = padded_batches(todo, batch_size)
            bar.total += len(idx)
            bar.refresh()
            outs = []
            for b in range(len(idx)):
                outs.append(fn(variables, images, labels, jax.device_put(idx[b], sharded),
                               jax.device_put(valid[b], sharded), component_key, jnp.int32(run)))
            for b, out in enumerate(outs):
                hit = idx[b][np.asarray(out) & valid[b]]
                robust[hit] = False
                fooled_by[hit] = COMPONENTS.index(name)
                bar.update(1)
            bar.set_postfix(run=f"{run + 1}/{runs}", robust=f"{robust.mean():.2%}")
        bar.close()
        after[name] = robust.copy()
    return AutoAttackResult(robust=robust, after=after, fooled_by=fooled_by)
