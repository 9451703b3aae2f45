"""One `Evaluator` per (model, split, mesh): the robustness of a model's variables under any attack of the suite.

It uploads the split to the devices once (training evaluates every epoch), covers every example exactly
once, runs batches in a few fixed shapes (the batch size and powers of two times the device count below
it: a partial batch or the handful of points still robust in an AutoAttack cascade is padded to the
smallest shape that holds it, so padded work stays under 2x and compilations stay few), keeps its
compiled functions, and returns masks and AutoAttack's per-component result as values. Every random start
is keyed by (seed, attack, the example's index in the split), so results depend neither on the batch shape
nor on the device or process count. Float32 models are evaluated at full float32 matmul precision (no TF32
on GPUs) unless `matmul_precision` says otherwise.
"""

import dataclasses
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mmard_jax import parallel
from mmard_jax.attacks import autoattack, suite
from mmard_jax.data.augment import to_float

Array = jax.Array


@dataclasses.dataclass
class EvalResult:
    """Per-example outcomes over the split: masks[attack] bool [N] (True = still correctly classified),
    AutoAttack's per-component result when 'aa' ran, and the seconds each attack took."""

    masks: Dict[str, np.ndarray]
    autoattack: Optional[autoattack.AutoAttackResult]
    seconds: Dict[str, float]

    def accuracies(self) -> Dict[str, float]:
        return {k: float(v.mean()) for k, v in self.masks.items()}


def batch_shapes(batch_size: int, n_devices: int) -> Tuple[int, ...]:
    """The batch shapes an evaluator runs, largest first: the batch size and n_devices * 2^k below it."""
    shapes = [batch_size]
    size = n_devices
    while size < batch_size:
        shapes.append(size)
        size *= 2
    return tuple(sorted(set(shapes), reverse=True))


def plan_batches(n: int, shapes: Sequence[int], compiled: Sequence[int] = ()) -> Tuple[int, ...]:
    """Batch sizes covering n points: full batches of the largest shape, then the smallest shape that holds the
    rest; a shape compiled already is preferred while the padded total stays within 2n (no new compilation)."""
    largest = max(shapes)
    sizes = [largest] * (n // largest)
    rest = n - sum(sizes)
    if rest:
        known = set(compiled) | ({largest} if sizes else set())
        reuse = [s for s in known if s >= rest and sum(sizes) + s <= 2 * n]
        sizes.append(min(reuse) if reuse else min(s for s in shapes if s >= rest))
    return tuple(sizes)


def _per_device(module, kind: str, name: str, eps: float, unroll, aa_config) -> Callable:
    """The per-device body `(variables, images, labels, idx, valid, key, run) -> per-example outputs`."""

    def body(variables, images, labels, idx, valid, key, run):
        x, y = to_float(images[idx]), labels[idx]
        apply_fn = lambda z: module.apply(variables, z, train=False)  # noqa: E731
        if kind == "gradients":
            return suite.input_gradient_health(apply_fn, x, y)
        keys = parallel.example_keys(jax.random.fold_in(key, run) if kind == "aa" else key, idx)
        if kind == "aa":
            x_adv, _ = autoattack.run_component(name, apply_fn, x, y, keys, run, eps=eps, config=aa_config,
                                                active=valid)
            return valid & autoattack.fooled_check(apply_fn, x, x_adv, y, eps)
        return suite.correct_under(name, apply_fn, x, y, eps=eps, rng=keys, unroll=unroll)

    return body


class Evaluator:
    """Attacks a model on one split, data parallel over a mesh; build once, call with any variables."""

    def __init__(self, module, images: np.ndarray, labels: np.ndarray, *, mesh=None, batch_size: int = 500,
                 eps: float = 8 / 255, unroll=1, aa_config: autoattack.AutoAttackConfig = autoattack.STANDARD,
                 matmul_precision: Optional[str] = "highest", progress: bool = True):
        chex.assert_rank(images, 4)
        chex.assert_shape(labels, (images.shape[0],))
        if images.dtype != np.uint8:
            raise TypeError(f"Evaluator expects uint8 images, got {images.dtype}")
        self.module, self.eps, self.unroll, self.aa_config = module, eps, unroll, aa_config
        self.mesh = mesh or parallel.data_mesh()
        parallel.check_divisible(batch_size, self.mesh, "evaluation batch size")
        self.batch_size, self.n = batch_size, len(labels)
        self.shapes = batch_shapes(batch_size, self.mesh.devices.size)
        self.images, self.labels = parallel.put_replicated((np.asarray(images), np.asarray(labels, np.int32)), self.mesh)
        self.precision = matmul_precision
        self.progress = progress and parallel.is_primary()  # one progress display per run, process 0's
        self._fns: Dict[Tuple[str, str], Callable] = {}
        self._compiled: Dict[Tuple[str, str], set] = {}
        self._images_host = images[:1]

    def _fn(self, kind: str, name: str) -> Callable:
        """The jitted, data-parallel function of one attack (one per kind and name; jit caches its shapes)."""
        if (kind, name) not in self._fns:
            body = _per_device(self.module, kind, name, self.eps, self.unroll, self.aa_config)
            sharded = P(parallel.AXIS)
            mapped = jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(), P(), sharded, sharded, P(), P()),
                                   out_specs=sharded, check_vma=False)  # loop carries become per-device inside
            self._fns[kind, name] = jax.jit(mapped)
            self._compiled[kind, name] = set()
        return self._fns[kind, name]

    def map_points(self, kind: str, name: str, variables, indices: np.ndarray, key=None, run: int = 0):
        """Runs one attack on the split's examples `indices` (in the evaluator's batch shapes); per-example
        outputs in the order of `indices`, as NumPy arrays on every process."""
        fn = self._fn(kind, name)
        sizes = plan_batches(len(indices), self.shapes, self._compiled[kind, name])
        key = jax.random.key(0) if key is None else key
        outs, start = [], 0
        with jax.default_matmul_precision(self.precision):
            for size in sizes:
                chunk = indices[start:start + size]
                idx = np.full(size, chunk[0], np.int32)
                idx[:len(chunk)] = chunk
                valid = np.arange(size) < len(chunk)
                outs.append((len(chunk), fn(variables, self.images, self.labels, parallel.put_batch(idx, self.mesh),
                                            parallel.put_batch(valid, self.mesh), key, jnp.int32(run))))
                self._compiled[kind, name].add(size)
                start += size
        host = [jax.tree.map(lambda a, k=k: a[:k], parallel.to_host(o)) for k, o in outs]
        return jax.tree.map(lambda *parts: np.concatenate(parts), *host)

    def correct(self, variables, attack: str, seed: int = 0) -> np.ndarray:
        """bool [N]: each example is correctly classified on x ('clean') or under a white-box attack."""
        if attack not in suite.PER_BATCH:
            raise ValueError(f"unknown per-batch attack {attack!r}; known: {', '.join(suite.PER_BATCH)}")
        return self.map_points("white_box", attack, variables, np.arange(self.n), suite.attack_key(seed, attack))

    def autoattack(self, variables, clean: np.ndarray, seed: int = 0,
                   components: Optional[Sequence[str]] = None) -> autoattack.AutoAttackResult:
        """The AutoAttack cascade from the clean-correct examples (`components`: a subset, e.g. one run alone)."""
        key = suite.aa_key(seed)
        num_classes = autoattack.infer_num_classes(self.module, variables, self._images_host)

        def run_points(name, run, todo):
            return self.map_points("aa", name, variables, todo, jax.random.fold_in(key, autoattack.COMPONENTS.index(name)), run)

        return autoattack.cascade(run_points, clean, config=self.aa_config, num_classes=num_classes,
                                  components=components, progress=self.progress)

    def gradient_health(self, variables) -> Dict[str, np.ndarray]:
        """bool [N] 'zero' / 'nonfinite': the cross-entropy input gradient at x is all zero / not finite."""
        zero, nonfinite = self.map_points("gradients", "ce", variables, np.arange(self.n))
        return {"zero": zero, "nonfinite": nonfinite}

    def run(self, variables, attacks: Sequence[str], seed: int = 0) -> EvalResult:
        """Every attack of `attacks` over the whole split (AutoAttack and its components from the clean mask)."""
        unknown = [a for a in attacks if a not in suite.ATTACKS]
        if unknown:
            raise ValueError(f"unknown attack(s) {unknown}; known: {', '.join(suite.ATTACKS)}")
        variables = parallel.put_replicated(variables, self.mesh) if not _on_mesh(variables, self.mesh) else variables
        masks, seconds, aa_result = {}, {}, None
        for name in tqdm(attacks, desc="evaluation", disable=not self.progress or len(attacks) < 2, leave=False):
            start = time.perf_counter()
            if name in suite.PER_BATCH:
                masks[name] = self.correct(variables, name, seed)
            else:
                if "clean" not in masks:
                    masks["clean"] = self.correct(variables, "clean", seed)
                result = self.autoattack(variables, masks["clean"], seed, None if name == "aa" else (name,))
                masks[name] = result.robust
                aa_result = result if name == "aa" else aa_result
            seconds[name] = time.perf_counter() - start
        return EvalResult({a: masks[a] for a in attacks}, aa_result, seconds)


def _on_mesh(tree, mesh) -> bool:
    """Whether every leaf is already a jax.Array replicated on `mesh` (the train state's parameters are)."""
    leaves = jax.tree.leaves(tree)
    return all(isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh
               and x.sharding.is_fully_replicated for x in leaves)
