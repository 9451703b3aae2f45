"""Robustness of any JAX model, in L-inf or L2: the evaluation library the CLI and the trainer use too.

    from mmard_jax import robustness
    report = robustness.evaluate(apply_fn, variables, images, labels, attacks=("clean", "pgd_s", "aa"))
    report.accuracy["aa"], report.per_class["aa"]["worst"], report.flags
    x_adv, report = robustness.autoattack(apply_fn, variables, images, labels, norm="L2")
    report = robustness.evaluate_source(apply_fn, variables, source, transform=eval_transforms.res256_crop224,
                                        eps=4 / 255, chunk_size=1000, n_examples=5000)   # a split too large to hold

`apply_fn(variables, x) -> logits` is any JAX-traceable function (a Flax module's `apply`, a Haiku or Equinox
network wrapped as a function, a jitted function of a parameter dict); x is float32 NHWC in [0, 1] (uint8 images
are accepted and scaled exactly by 1/255); the class count comes from `jax.eval_shape`. Batching, devices,
per-example keys and AutoAttack's cascade are `evaluator.Evaluator`'s; this module turns its masks into a report.
`evaluate_source` reads the split from a source in chunks (mmard_jax.data.eval_stream) and gives the same
per-example results as the resident form: each chunk is attacked at its examples' positions in the split.
"""

import dataclasses
import json
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mmard_jax import errors, evaluator, parallel
from mmard_jax.attacks import autoattack as aa_lib
from mmard_jax.attacks import suite
from mmard_jax.data import eval_stream

NORMS = ("Linf", "L2")
# RobustBench's two leaderboards' radii for CIFAR (robustbench/model_zoo: threat models Linf 8/255, L2 0.5).
DEFAULT_EPS = {"Linf": 8 / 255, "L2": 0.5}
DEFAULT_ATTACKS = ("clean", "pgd_s", "aa")
VERSIONS = ("standard",)  # the original's 'plus' and 'rand' add components (APGD-DLR, FAB, EOT) not written here


@dataclasses.dataclass
class RobustnessReport:
    """What an evaluation found: accuracy and masks per attack (True = still correct), AutoAttack's breakdown,
    per-class accuracies with the worst class, the trust checks (gradient masking signs) and the settings."""

    norm: str
    eps: float
    accuracy: Dict[str, float]
    masks: Dict[str, np.ndarray]
    per_class: Dict[str, Dict[str, Any]]
    flags: List[Dict[str, str]]
    gradients: Dict[str, float] = dataclasses.field(default_factory=dict)
    autoattack: Optional[Dict[str, Any]] = None
    seconds: Dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def counts(self) -> Dict[str, int]:
        return {k: int(v.sum()) for k, v in self.masks.items()}

    def as_dict(self) -> Dict[str, Any]:
        """Everything but the per-example arrays, as JSON-ready values (AutoAttack's `fooled_by` as counts)."""
        body = {"norm": self.norm, "eps": self.eps, "accuracy": self.accuracy, "counts": self.counts,
                "per_class": self.per_class, "gradients": self.gradients, "flags": self.flags,
                "seconds": self.seconds}
        if self.autoattack is not None:
            body["autoattack"] = {k: v for k, v in self.autoattack.items() if k != "fooled_by_example"}
        return body

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1, sort_keys=False)


def resolve(norm: str, eps: Optional[float]) -> float:
    """The radius for a norm: `eps`, or the norm's default; a UserError for an unknown norm or eps <= 0."""
    if norm not in NORMS:
        raise errors.UserError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    eps = DEFAULT_EPS[norm] if eps is None else float(eps)
    if not eps > 0:
        raise errors.UserError(f"eps must be > 0, got {eps}")
    return eps


def standard_config(version: str = "standard", norm: str = "Linf") -> aa_lib.AutoAttackConfig:
    """AutoAttack's settings for a version and norm (the original's `set_version`)."""
    if version not in VERSIONS:
        raise errors.UserError(f"AutoAttack version {version!r} is not available; available: {', '.join(VERSIONS)}")
    return dataclasses.replace(aa_lib.STANDARD, norm=norm)


def per_class(masks: Dict[str, np.ndarray], labels: np.ndarray, num_classes: int) -> Dict[str, Dict[str, Any]]:
    """Per attack: each class's accuracy (None where the split has no example of it), the worst class and its
    accuracy, and the normalised standard deviation across classes (std / mean, ABSLD's and Fair-ARD's NSD)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    out = {}
    for name, mask in masks.items():
        if mask.dtype != bool:
            continue
        hits = np.bincount(labels, weights=mask.astype(np.float64), minlength=num_classes)
        present = counts > 0
        acc = np.where(present, hits / np.maximum(counts, 1), np.nan)
        seen = acc[present]
        worst = int(np.flatnonzero(present)[np.argmin(seen)])
        mean = float(seen.mean())
        out[name] = {"accuracy": [None if np.isnan(a) else float(a) for a in acc], "worst_class": worst,
                     "worst": float(acc[worst]), "nsd": float(seen.std() / mean) if mean > 0 else None}
    return out


def autoattack_summary(result: aa_lib.AutoAttackResult, config: aa_lib.AutoAttackConfig, compute_dtype: str,
                       matmul_precision: Optional[str]) -> Dict[str, Any]:
    """AutoAttack's part of a report: version, settings, accuracy after each component, fooled-by counts."""
    return {
        "version": aa_lib.describe(config, compute_dtype=compute_dtype, matmul_precision=matmul_precision),
        "settings": dataclasses.asdict(config),
        "accuracy_after": result.accuracies(),
        "fooled_by": {c: int(np.sum(result.fooled_by == i)) for i, c in enumerate(aa_lib.COMPONENTS)
                      if c in config.components},
        "fooled_by_example": result.fooled_by,
    }


def make_evaluator(apply_fn: Callable, images, labels, *, norm: str = "Linf", eps: Optional[float] = None,
                   batch_size: int = 500, mesh=None, progress: bool = True, unroll=1,
                   aa_config: Optional[aa_lib.AutoAttackConfig] = None,
                   matmul_precision: Optional[str] = "highest") -> evaluator.Evaluator:
    """An evaluator for one (model, split): build once (the split goes to the devices once), run with any
    variables through `run` (the trainer evaluates every epoch this way)."""
    eps = resolve(norm, eps)
    config = aa_config or standard_config("standard", norm)
    if config.norm != norm:
        raise errors.UserError(f"aa_config.norm is {config.norm!r} but norm is {norm!r}")
    return evaluator.Evaluator(apply_fn, np.asarray(images), np.asarray(labels), mesh=mesh, batch_size=batch_size,
                               eps=eps, norm=norm, unroll=unroll, aa_config=config,
                               matmul_precision=matmul_precision, progress=progress and parallel.is_primary())


def run(ev: evaluator.Evaluator, variables, attacks: Sequence[str] = DEFAULT_ATTACKS, *, seed: int = 0,
        checks: bool = True, compute_dtype: str = "float32",
        on_result: Optional[Callable[[str, float, float], None]] = None) -> RobustnessReport:
    """Every attack over the evaluator's split, one at a time (`on_result(name, accuracy, seconds)` after each),
    then, with `checks`, the input-gradient health and the trust flags."""
    variables = ev.place(variables)
    masks, seconds, aa_result = {}, {}, None
    for name in attacks:
        result = ev.run(variables, [name], seed=seed)
        masks[name], seconds[name] = result.masks[name], result.seconds[name]
        aa_result = result.autoattack or aa_result
        if on_result is not None:
            on_result(name, float(masks[name].mean()), seconds[name])
    health = None
    if checks:
        start = time.perf_counter()
        health = ev.gradient_health(variables)
        seconds["gradient_check"] = time.perf_counter() - start
    return report_of(ev, variables, masks, seconds, aa_result, checks, health, compute_dtype)


def report_of(ev: evaluator.Evaluator, variables, masks: Dict[str, np.ndarray], seconds: Dict[str, float],
              aa_result: Optional[aa_lib.AutoAttackResult], flags: bool = True,
              health: Optional[Dict[str, np.ndarray]] = None, compute_dtype: str = "float32") -> RobustnessReport:
    """The report of an evaluation's masks: accuracies, per-class numbers, AutoAttack's breakdown and, with
    `flags`, the trust checks (the gradient ones when `health`, `Evaluator.gradient_health`'s masks, is given)."""
    accuracy = {k: float(v.mean()) for k, v in masks.items()}
    aa_after = None if aa_result is None else aa_result.accuracies()
    return RobustnessReport(
        norm=ev.norm, eps=ev.eps, accuracy=accuracy, masks=masks,
        per_class=per_class(masks, ev.labels_host, ev.num_classes(variables)),
        flags=suite.trust_flags(accuracy, gradients=health, aa_after=aa_after) if flags else [],
        gradients={} if health is None else {k: float(v.mean()) for k, v in health.items()},
        autoattack=None if aa_result is None else autoattack_summary(aa_result, ev.aa_config, compute_dtype,
                                                                      ev.precision),
        seconds=seconds)


def evaluate(apply_fn: Callable, variables, images, labels, *, attacks: Sequence[str] = DEFAULT_ATTACKS,
             norm: str = "Linf", eps: Optional[float] = None, batch_size: int = 500, seed: int = 0, mesh=None,
             progress: bool = True, **options) -> RobustnessReport:
    """Robustness of `apply_fn(variables, x) -> logits` on (images, labels) under `attacks` (from
    suite.ATTACKS: clean, fgsm, pgd_s, pgd_t, cw, aa and AutoAttack's components alone) in `norm` at `eps`
    (default 8/255 for L-inf, 0.5 for L2). `options`: unroll, aa_config, matmul_precision (make_evaluator)."""
    unknown = [a for a in attacks if a not in suite.ATTACKS]
    if unknown:
        raise errors.UserError(f"unknown attack(s) {unknown}; known: {', '.join(suite.ATTACKS)}")
    ev = make_evaluator(apply_fn, images, labels, norm=norm, eps=eps, batch_size=batch_size, mesh=mesh,
                        progress=progress, **options)
    return run(ev, variables, attacks, seed=seed)


def autoattack(apply_fn: Callable, variables, images, labels, *, norm: str = "Linf", eps: Optional[float] = None,
               version: str = "standard", seed: int = 0, batch_size: int = 500, mesh=None,
               progress: bool = True) -> Tuple[np.ndarray, RobustnessReport]:
    """AutoAttack as the original's `run_standard_evaluation`: (x_adv, report). x_adv [N, H, W, C] float32 holds,
    for every example a component fooled, the adversarial image that fooled it (inside the eps-ball and [0, 1]),
    and the clean image elsewhere; the report has 'clean' and 'aa' with the per-component breakdown."""
    ev = make_evaluator(apply_fn, images, labels, norm=norm, eps=eps, batch_size=batch_size, mesh=mesh,
                        progress=progress, aa_config=standard_config(version, norm))
    variables = ev.place(variables)
    start = time.perf_counter()
    clean = ev.correct(variables, "clean", seed)
    seconds = {"clean": time.perf_counter() - start}
    result = ev.autoattack(variables, clean, seed, keep_adversarial=True)
    seconds["aa"] = sum(result.seconds.values())
    report = report_of(ev, variables, {"clean": clean, "aa": result.robust}, seconds, result)
    return result.x_adv, report


def merge_autoattack(parts: Sequence[aa_lib.AutoAttackResult]) -> aa_lib.AutoAttackResult:
    """The cascade's result over consecutive chunks as one result over their union (seconds summed)."""
    return aa_lib.AutoAttackResult(
        robust=np.concatenate([p.robust for p in parts]),
        after={c: np.concatenate([p.after[c] for p in parts]) for c in parts[0].after},
        fooled_by=np.concatenate([p.fooled_by for p in parts]),
        seconds={c: float(sum(p.seconds.get(c, 0.0) for p in parts)) for c in parts[0].seconds})


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with its last row repeated up to `rows` rows (the last chunk in the shape of the others)."""
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)]) if len(array) < rows else array


def evaluate_source(apply_fn: Callable, variables, source, *, transform: Callable[[np.ndarray], np.ndarray],
                    attacks: Sequence[str] = DEFAULT_ATTACKS, norm: str = "Linf", eps: Optional[float] = None,
                    chunk_size: int = 1000, n_examples: int = -1, workers: int = 0, batch_size: int = 500,
                    seed: int = 0, mesh=None, progress: bool = True, checks: bool = True,
                    compute_dtype: str = "float32", prepared: Optional[evaluator.Evaluator] = None,
                    **options) -> RobustnessReport:
    """`evaluate` over a source's first `n_examples` records (all when <= 0), each through `transform` (e.g.
    eval_transforms.res256_crop224), read `chunk_size` at a time through grain (`workers` decoding processes): the
    host holds one chunk and the next being prepared, never the split. Per-example results equal the resident
    form's on the same images: each chunk's random starts are keyed by its examples' positions in the split, and
    AutoAttack's cascade attacks, within each chunk, only the points no earlier attack or run has broken.
    `prepared`: an evaluator made for this source's chunk shape before (the trainer's, every epoch), its programs
    reused; `apply_fn` and the evaluator options are then its own."""
    unknown = [a for a in attacks if a not in suite.ATTACKS]
    if unknown:
        raise errors.UserError(f"unknown attack(s) {unknown}; known: {', '.join(suite.ATTACKS)}")
    ev, base, labels, masks, aa_parts, health = prepared, 0, [], [], [], []
    if ev is not None:
        variables = ev.place(variables)
    seconds: Dict[str, float] = {}
    for images, chunk_labels in eval_stream.chunks(source, transform, chunk_size, n_examples, workers):
        n = len(chunk_labels)
        if ev is None:  # the first chunk's shape: the programs compiled for it serve every chunk
            ev = make_evaluator(apply_fn, images, chunk_labels, norm=norm, eps=eps, batch_size=batch_size, mesh=mesh,
                                progress=progress, **options)
            variables = ev.place(variables)
        else:
            rows = ev.images.shape[0]
            ev.load(pad_rows(images, rows), pad_rows(chunk_labels, rows), base=base, n=n)
        result = ev.run(variables, attacks, seed=seed)
        masks.append(result.masks)
        aa_parts += [result.autoattack] if result.autoattack is not None else []
        for name, s in result.seconds.items():
            seconds[name] = seconds.get(name, 0.0) + s
        if checks:
            start = time.perf_counter()
            health.append(ev.gradient_health(variables))
            seconds["gradient_check"] = seconds.get("gradient_check", 0.0) + time.perf_counter() - start
        labels.append(chunk_labels)
        base += n
    if base == 0:
        raise errors.UserError("the source holds no example to evaluate")
    labels_all = np.concatenate(labels)
    masks_all = {a: np.concatenate([m[a] for m in masks]) for a in attacks}
    gradients = {k: np.concatenate([h[k] for h in health]) for k in health[0]} if health else None
    aa_result = merge_autoattack(aa_parts) if aa_parts else None
    accuracy = {k: float(v.mean()) for k, v in masks_all.items()}
    return RobustnessReport(
        norm=ev.norm, eps=ev.eps, accuracy=accuracy, masks=masks_all,
        per_class=per_class(masks_all, labels_all, ev.num_classes(variables)),
        flags=suite.trust_flags(accuracy, gradients=gradients,
                                aa_after=None if aa_result is None else aa_result.accuracies()) if checks else [],
        gradients={} if gradients is None else {k: float(v.mean()) for k, v in gradients.items()},
        autoattack=None if aa_result is None else autoattack_summary(aa_result, ev.aa_config, compute_dtype,
                                                                      ev.precision),
        seconds=seconds)
