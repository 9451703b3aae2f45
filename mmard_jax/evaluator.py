"""One `Evaluator` per (model, split, mesh): the robustness of a model's variables under any attack of the suite.

It uploads the split to the devices once (training evaluates every epoch), covers every example exactly
once, runs batches in a few fixed shapes (`batch_shapes`: the batch size and 2^k and 3 * 2^k times the
device count below it), keeps its compiled functions, and returns masks and AutoAttack's per-component
result as values. A partial batch, or the points still robust in an AutoAttack cascade, goes in the
smallest shape that holds it (padded less than 1.5x), or in a larger shape already compiled when the
times measured so far say the extra padded work costs less than compiling (`plan_batches`; never past
2x). On a CPU, where a batch's time is about proportional to its size until its activations outgrow the
last-level cache, only the shapes that fit that cache run (`plan_shapes`: per kind of program, gradient or
forward-only, then timed near that cap once the work left is worth it: `measure_cap`), and the rest may be split into
several batches that together pad less (104 points: 96 + 8 rather than 128) when the measured times say the
compilations pay off. Square runs in chunks of queries with the examples fooled so far dropped between chunks
(`square_points`), so its work follows the examples left, as the original's does. Every random start is
keyed by (seed, attack, the example's index in the split), so results depend neither on the batch shape
nor on the device or process count. Float32 models are evaluated at full float32 matmul precision (no TF32
on GPUs) unless `matmul_precision` says otherwise.
"""

import dataclasses
import functools
import inspect
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mmard_jax import batch_plan, parallel
from mmard_jax.attacks import autoattack, counter_rng, square, suite
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


def as_apply_fn(model) -> Callable:
    """`apply_fn(variables, x) -> logits`: a Flax module in inference mode (`train=False` where its call takes
    it), or any JAX function of (variables, x) as it is."""
    if isinstance(model, nn.Module):
        takes_train = "train" in inspect.signature(type(model).__call__).parameters
        return functools.partial(model.apply, train=False) if takes_train else model.apply
    if not callable(model):
        raise TypeError(f"expected a Flax module or a function apply_fn(variables, x) -> logits, got {type(model)}")
    return model


def input_floats(images: Array) -> Array:
    """Images as float32 in [0, 1]: uint8 exactly x / 255, float images as they are."""
    return to_float(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled attack: its per-device `body(variables, images, labels, base, idx, valid, *args)` -> per-example
    outputs, where each of its own `args` lives: 'example' (a row per point, batched with them) or 'shared', and
    whether it only runs the model forward (no input gradient: its CPU batches are capped by the forward's
    working set, `Evaluator.plan_shapes`). `idx` indexes the resident arrays; `base + idx` is the example's position
    in the whole split, which keys its random starts (a streamed evaluation holds one chunk, starting at `base`).
    `cost_like`: the program whose measured costs (per example and unit of work, per compilation) plan this one's
    first call, before it has its own: a unit of work of both costs about the same (a run of an attack, a forward).
    Without them a first call pads the points into one batch, and a later, timed call may compile other shapes."""

    key: Tuple[str, str]
    body: Callable
    args: Tuple[str, ...] = ()
    forward_only: bool = False
    cost_like: Optional[Tuple[str, str]] = None


def white_box_program(apply: Callable, name: str, eps: float, norm: str, unroll) -> Program:
    """Clean or a white-box attack (suite.PER_BATCH): correct [B]; arg: the attack's key."""

    def body(variables, images, labels, base, idx, valid, key):
        x, y = input_floats(images[idx]), labels[idx]
        return suite.correct_under(name, functools.partial(apply, variables), x, y, eps=eps,
                                   rng=parallel.example_keys(key, base + idx), unroll=unroll, norm=norm)

    return Program(("white_box", name), body, ("shared",))


def component_program(apply: Callable, program: str, eps: float, config: autoattack.AutoAttackConfig) -> Program:
    """One run of an AutoAttack program (autoattack.PROGRAMS): (fooled and verified [B], x_adv); args: the run's key
    (hashed per example, not drawn: counter_rng.py) and the program's traced argument (autoattack.program_arg)."""

    def body(variables, images, labels, base, idx, valid, key, arg):
        x, y = input_floats(images[idx]), labels[idx]
        apply_fn = functools.partial(apply, variables)
        keys = counter_rng.example_keys(key, base + idx)
        x_adv, _ = autoattack.run_program(program, apply_fn, x, y, keys, arg, eps=eps, config=config, active=valid)
        return valid & autoattack.fooled_check(apply_fn, x, x_adv, y, eps, config.norm), x_adv

    # FAB-T's runs are planned like APGD's (100 iterations of an input gradient per example) until timed.
    like = ("aa", autoattack.PROGRAMS["apgd_ce"]) if program != autoattack.PROGRAMS["apgd_ce"] else None
    return Program(("aa", program), body, ("shared", "shared"), cost_like=like)


def square_program(apply: Callable, eps: float, config: autoattack.AutoAttackConfig) -> Program:
    """A chunk of Square's queries: (x_best, margin_best, fooled and verified, x_adv); args: the run's key, the
    per-example carry (x_best, margin_best) and the query span (start, stop)."""

    def body(variables, images, labels, base, idx, valid, key, carry, span):
        x, y = input_floats(images[idx]), labels[idx]
        keys = counter_rng.example_keys(key, base + idx)
        return _square_chunk(functools.partial(apply, variables), x, y, keys, valid, carry, span, eps, config)

    # A query is one forward per example, as a clean pass is: Square's first chunk is planned with its timings.
    return Program(("aa", "square"), body, ("shared", "example", "shared"), forward_only=True,
                   cost_like=("white_box", "clean"))


def gradient_program(apply: Callable) -> Program:
    """The cross-entropy input gradient's health at x: (all zero [B], not finite [B])."""

    def body(variables, images, labels, base, idx, valid):
        x, y = input_floats(images[idx]), labels[idx]
        return suite.input_gradient_health(functools.partial(apply, variables), x, y)

    return Program(("gradients", "ce"), body)


def _square_chunk(apply_fn, x, y, keys, valid, carry, span, eps, aa_config):
    """Square's queries span[0] .. span[1] - 1 from `carry` (from the stripes when span[0] == 0):
    (x_best, margin_best, fooled and verified, x_adv)."""
    settings = autoattack.square_settings(aa_config)
    norm = settings["norm"]
    state = jax.lax.cond(span[0] == 0, lambda: square.square_start(apply_fn, x, y, keys, eps=eps, norm=norm),
                         lambda: square.SquareState(*carry))
    state = square.square_steps(apply_fn, x, y, keys, state, span[0], span[1], eps=eps, active=valid, **settings)
    x_adv, _ = square.square_outcome(x, state)
    return state.x_best, state.margin_best, valid & autoattack.fooled_check(apply_fn, x, x_adv, y, eps, norm), x_adv


# A timed CPU plan may run the points left in one batch of their count rounded up to a multiple of this (per
# device): at most 7 examples of padding, and a shape that stays the same while the points left shrink by a few
# (Square's chunks, APGD-T's targets), so it is compiled once, where a split into the fixed shapes compiles two and
# runs a small batch, which costs more per example than the model's BATCH_OVERHEAD_EXAMPLES (BENCHMARKS.md).
EXACT_GRANULE = 8


class Evaluator:
    """Attacks a model on one split, data parallel over a mesh; build once, call with any variables. `batch_size`
    divides by the mesh's devices (the entry point checked it once: `parallel.check_divisible`)."""

    def __init__(self, model, images: np.ndarray, labels: np.ndarray, *, mesh=None, batch_size: int = 500,
                 eps: float = 8 / 255, norm: Optional[str] = None, unroll=1,
                 aa_config: autoattack.AutoAttackConfig = autoattack.STANDARD,
                 matmul_precision: Optional[str] = "highest", progress: bool = True,
                 square_chunks: Tuple[int, int] = square.CHUNKS):
        """`model`: a Flax module or any `apply_fn(variables, x) -> logits` (`as_apply_fn`); `images`: uint8, or
        float NHWC in [0, 1]; `norm`: the threat model ('Linf' or 'L2') of every attack, eps its radius (default:
        the AutoAttack config's, whose norm must agree)."""
        batch_plan.CompileClock.start()
        norm = aa_config.norm if norm is None else norm
        if aa_config.norm != norm:
            raise ValueError(f"the AutoAttack config's norm {aa_config.norm!r} is not the evaluator's {norm!r}")
        self.apply, self.eps, self.norm, self.unroll, self.aa_config = as_apply_fn(model), eps, norm, unroll, aa_config
        self.mesh = mesh or parallel.data_mesh()
        self.batch_size = batch_size
        self.shapes = batch_plan.batch_shapes(batch_size, self.mesh.devices.size)
        # CPUs: a batch costs its size (BATCH_OVERHEAD_EXAMPLES), so the points left may go in several batches,
        # and batches whose activations outgrow the last-level cache cost more per example (`plan_shapes`); on
        # an accelerator a small batch costs about a full one, so the points go in one padded batch. Several
        # processes must plan alike (their caches may differ): neither there.
        self.split_batches = self.mesh.devices.flat[0].platform == "cpu" and jax.process_count() == 1
        # CPUs: the points left may also go in one batch of their own size rounded up to a multiple of EXACT_GRANULE
        # per device, where that beats the shapes' padding and splits (Square's 53 points: 56, not 48 + 6).
        self.granule = EXACT_GRANULE * self.mesh.devices.size if self.split_batches else None
        self._cpu_shapes: Dict[bool, Tuple[int, ...]] = {}  # forward_only -> the CPU shapes of that kind
        self.measured_caps: Dict[bool, int] = {}  # forward_only -> the cap `measure_cap` timed (single device)
        self.load(images, labels)
        self.precision = matmul_precision
        self.progress = progress and parallel.is_primary()  # one progress display per run, process 0's
        self.square_chunks = square_chunks
        self._fns: Dict[Tuple[str, str], Callable] = {}
        self._compiled: Dict[Tuple[str, str], set] = {}
        self._costs: Dict[Tuple[str, str], Tuple[float, float]] = {}  # (s per example and unit of work, s per compile)
        # Every `map_points` call's plan, in order: program, points, batch sizes, the sizes it compiled, seconds (the
        # AutoAttack benchmark records them, so that a run's shapes can be read next to its times).
        self.plan_log: List[Dict[str, Any]] = []

    def load(self, images: np.ndarray, labels: np.ndarray, base: int = 0, n: Optional[int] = None) -> None:
        """Makes (images, labels) the resident split: its first `n` rows (default all) are the examples at
        positions base .. base + n - 1 of the whole split, the rest padding. A streamed evaluation loads one chunk
        after another in one shape, so the compiled programs are reused (robustness.evaluate_source)."""
        chex.assert_rank(images, 4)
        chex.assert_shape(labels, (images.shape[0],))
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise TypeError(f"Evaluator expects uint8 or float images in [0, 1], got {images.dtype}")
        if images.dtype != np.uint8:
            images = np.asarray(images, np.float32)
        self.n = len(labels) if n is None else int(n)
        self.images, self.labels, self.base = parallel.put_replicated(
            (np.asarray(images), np.asarray(labels, np.int32), np.int32(base)), self.mesh)
        self.images_host, self.labels_host = images[:self.n], np.asarray(labels)[:self.n]  # as given (uint8/float)

    def _jitted(self, program: Program) -> Callable:
        """The jitted, data-parallel function of one program (one per program key; jit caches its shapes)."""
        if program.key not in self._fns:
            sharded = P(parallel.AXIS)
            own = tuple(sharded if a == "example" else P() for a in program.args)
            specs = (P(), P(), P(), P(), sharded, sharded) + own  # variables, images, labels, base, idx, valid
            mapped = jax.shard_map(program.body, mesh=self.mesh, in_specs=specs, out_specs=sharded,
                                   check_vma=False)  # loop carries become per-device inside
            self._fns[program.key] = jax.jit(mapped)
            self._compiled[program.key] = set()
        return self._fns[program.key]

    def white_box(self, name: str) -> Program:
        return white_box_program(self.apply, name, self.eps, self.norm, self.unroll)

    def component(self, name: str) -> Program:
        return component_program(self.apply, autoattack.PROGRAMS[name], self.eps, self.aa_config)

    def plan_shapes(self, variables=None, forward_only: bool = False) -> Tuple[int, ...]:
        """The shapes a plan draws from: all of them, but on a CPU (`split_batches`) only those whose working set
        fits the last-level cache (`cache_cap`). A gradient program keeps every activation for its backward
        (`activation_bytes`; measured on the AutoAttack benchmark's WRN-10-1, 32 MiB L3: APGD-T 0.62-0.71 ms per
        example and iteration in batches of 8 to 128, 0.87-0.91 in one of 163, BENCHMARKS.md; 0.64 MB per example,
        cap 48); a forward-only one (`Program.forward_only`: Square) only a block's few live activations
        (`forward_peak_bytes`: 0.19 MB for that WRN-10-1, cap 128)."""
        if not self.split_batches:
            return self.shapes
        if forward_only not in self._cpu_shapes:
            if variables is None:
                raise ValueError("plan_shapes: the first call on a CPU needs the variables (to size the activations)")
            size = batch_plan.forward_peak_bytes if forward_only else batch_plan.activation_bytes
            per_example = size(self.apply, variables, self.images_host.shape[1:])
            cap = batch_plan.cache_cap(self.shapes, per_example, batch_plan.cache_bytes())
            self._cpu_shapes[forward_only] = tuple(s for s in self.shapes if s <= cap)
        return self._cpu_shapes[forward_only]

    def measure_cap(self, variables, forward_only: bool) -> None:
        """Replaces the cache model's CPU cap of one kind of program by the shape the model runs fastest per
        example near it (`batch_plan.measured_cap`: the bare forward, or its input gradient, timed on the split's
        first images); once per kind, on a single-device CPU evaluator. Batch shapes never change results."""
        if not self.split_batches or self.mesh.devices.size != 1 or forward_only in self.measured_caps:
            return
        start = self.plan_shapes(variables, forward_only)[0]
        if forward_only:
            fn = jax.jit(self.apply)
        else:
            fn = jax.jit(jax.grad(lambda v, x: jnp.sum(jax.nn.logsumexp(self.apply(v, x), axis=-1)), argnums=1))
        floats = self._input_floats_host()

        def per_example(size: int) -> float:
            x = jnp.asarray(floats[np.arange(size) % self.n])
            return batch_plan.seconds_per_example(functools.partial(fn, variables), x)

        with jax.default_matmul_precision(self.precision):
            cap = batch_plan.measured_cap(per_example, self.shapes, start)
        self.measured_caps[forward_only] = cap
        self._cpu_shapes[forward_only] = tuple(s for s in self.shapes if s <= cap)

    def map_points(self, program: Program, variables, indices: np.ndarray, *args, work: float = 1.0,
                   work_left: Optional[float] = None):
        """Runs `program` on the split's examples `indices` (in the evaluator's batch shapes); per-example outputs
        in the order of `indices`, as NumPy arrays on every process. `args` are the program's own, in its order:
        its 'example' ones as host arrays (pytrees) with a leading axis along `indices`, its 'shared' ones as is.

        `work` (this call's work per example, e.g. Square's queries) and `work_left` (the work per example
        still to come from this call on, in the same unit; default `work`) let it weigh padding against
        compiling a smaller shape, with the times it measured for this program (`plan_batches`)."""
        fn = self._jitted(program)
        compiled = self._compiled[program.key]
        rate, compile_s = self._costs.get(program.key) or self._costs.get(program.cost_like, (None, None))
        # Timings differ between processes, and every process must run the same shapes: several processes
        # plan without them (reuse within 2x).
        timed = rate is not None and jax.process_count() == 1
        cost = (rate * (work if work_left is None else work_left), compile_s) if timed else None
        if cost is not None and cost[0] * len(indices) > batch_plan.PROBE_WORTH * max(compile_s, 1.0):
            self.measure_cap(variables, program.forward_only)
        sizes = batch_plan.plan_batches(len(indices), self.plan_shapes(variables, program.forward_only), compiled, cost,
                                        split=self.split_batches, granule=self.granule)
        outs, start, new_shapes = [], 0, sorted(set(sizes) - compiled)
        began, compiling = time.perf_counter(), batch_plan.CompileClock.seconds
        with jax.default_matmul_precision(self.precision):
            for size in sizes:
                chunk = indices[start:start + size]
                rows = np.minimum(np.arange(size), len(chunk) - 1)  # padding repeats the last real example
                idx = chunk[rows].astype(np.int32)
                valid = np.arange(size) < len(chunk)
                own = [jax.tree.map(lambda a: parallel.put_batch(np.asarray(a)[start:start + size][rows], self.mesh),
                                    arg) if where == "example" else arg for arg, where in zip(args, program.args)]
                outs.append((len(chunk), fn(variables, self.images, self.labels, self.base,
                                            parallel.put_batch(idx, self.mesh),
                                            parallel.put_batch(valid, self.mesh), *own)))
                compiled.add(size)
                start += size
        host = [jax.tree.map(lambda a, k=k: a[:k], parallel.to_host(o)) for k, o in outs]
        wall = time.perf_counter() - began
        compiled_s = batch_plan.CompileClock.seconds - compiling
        self._measure(program.key, wall, compiled_s, bool(new_shapes), sum(sizes) * work)
        self.plan_log.append({"program": "/".join(program.key), "points": len(indices), "sizes": list(sizes),
                              "compiled": new_shapes, "seconds": round(wall, 3)})
        return jax.tree.map(lambda *parts: np.concatenate(parts), *host)

    def run_component(self, name: str, variables, indices: np.ndarray, key, run: int,
                      work_left: Optional[float] = None):
        """One run of an AutoAttack component but Square on `indices`: (fooled [n], x_adv [n, ...]). The key is
        folded with the run outside the program (a threefry draw inside costs compile time: counter_rng.py)."""
        return self.map_points(self.component(name), variables, indices, jax.random.fold_in(key, run),
                               jnp.int32(autoattack.program_arg(name, run)), work_left=work_left)

    def _measure(self, key: Tuple[str, str], wall: float, compile_s: float, fresh: bool, work: float) -> None:
        """Keeps the latest (seconds per padded example and unit of work, seconds per compilation) of a program."""
        rate, last_compile = self._costs.get(key, (None, None))
        if work > 0 and wall > compile_s:
            rate = (wall - compile_s) / work
        if fresh:
            last_compile = compile_s
        if rate is not None:
            self._costs[key] = (rate, last_compile if last_compile is not None else 0.0)

    def square_points(self, variables, indices: np.ndarray, key, run: int = 0,
                      progress: Optional[Callable[[int, str], None]] = None) -> "SquareOutcome":
        """fooled bool, final margin float32 and x_adv [len(indices)] of one Square run. It runs in
        chunks of queries (`square.query_chunks(n, self.square_chunks)`); between chunks the examples fooled
        so far are dropped and the rest re-batched in the evaluator's shapes, so the work follows the
        examples left, as the original's does (per-example results are unchanged: square.py).
        `progress(fooled so far, text)` is called after each chunk."""
        config = self.aa_config
        n = len(indices)
        fooled = np.zeros(n, bool)
        x_best = np.zeros((n,) + self.images_host.shape[1:], np.float32)
        x_adv = np.zeros_like(x_best)
        margin = np.full(n, np.inf, np.float32)
        live = np.arange(n)
        program, run_key = square_program(self.apply, self.eps, config), jax.random.fold_in(key, run)
        for begin, end in square.query_chunks(config.square_queries, self.square_chunks):
            if live.size == 0:
                break
            xb, mb, hit, xa = self.map_points(program, variables, indices[live], run_key,
                                              (x_best[live], margin[live]), jnp.asarray((begin, end), jnp.int32),
                                              work=max(end - begin, 1),
                                              work_left=max(config.square_queries - begin, 1))
            x_best[live], margin[live], fooled[live], x_adv[live] = xb, mb, hit, xa
            live = live[mb > 0]
            if progress is not None:
                progress(int(fooled.sum()), f"{end}/{config.square_queries} queries")
        return SquareOutcome(fooled, margin, x_adv)

    def correct(self, variables, attack: str, seed: int = 0) -> np.ndarray:
        """bool [N]: each example is correctly classified on x ('clean') or under a white-box attack."""
        if attack not in suite.PER_BATCH:
            raise ValueError(f"unknown per-batch attack {attack!r}; known: {', '.join(suite.PER_BATCH)}")
        return self.map_points(self.white_box(attack), variables, np.arange(self.n), suite.attack_key(seed, attack))

    def autoattack(self, variables, clean: np.ndarray, seed: int = 0, components: Optional[Sequence[str]] = None,
                   keep_adversarial: bool = False,
                   report: Optional[autoattack.Report] = None) -> autoattack.AutoAttackResult:
        """The AutoAttack cascade from the clean-correct examples (`components`: a subset, e.g. one run alone);
        with `keep_adversarial`, `result.x_adv` holds each fooled example's adversarial image (x elsewhere);
        `report` hears the cascade's progress too (beside the bars)."""
        key = suite.aa_key(seed)
        num_classes = self.num_classes(variables)
        x_adv = np.array(self._input_floats_host(), copy=True) if keep_adversarial else None

        def run_points(name, run, todo, progress=None):
            component_key = jax.random.fold_in(key, autoattack.COMPONENTS.index(name))
            if name == "square":
                fooled, _, adv = self.square_points(variables, todo, component_key, run, progress)
            else:
                runs_left = autoattack.num_runs(name, self.aa_config, num_classes) - run
                fooled, adv = self.run_component(name, variables, todo, component_key, run, work_left=runs_left)
            if x_adv is not None:
                x_adv[todo[fooled]] = adv[fooled]
            return fooled

        bars = CascadeBars() if self.progress else None
        listeners = [r for r in (bars, report) if r is not None]

        def tell(*event) -> None:
            for listener in listeners:
                listener(*event)

        try:
            result = autoattack.cascade(run_points, clean, config=self.aa_config, num_classes=num_classes,
                                        components=components, report=tell)
        finally:
            if bars is not None:
                bars.close()
        return dataclasses.replace(result, x_adv=x_adv)

    def num_classes(self, variables) -> int:
        """The width of the model's logits (shape inference only)."""
        x = jax.ShapeDtypeStruct((1,) + self.images_host.shape[1:], jnp.float32)
        return int(jax.eval_shape(self.apply, variables, x).shape[-1])

    def _input_floats_host(self) -> np.ndarray:
        """The whole split as float32 in [0, 1] on the host (the model's inputs)."""
        return np.asarray(input_floats(jnp.asarray(self.images_host)))

    def gradient_health(self, variables) -> Dict[str, np.ndarray]:
        """bool [N] 'zero' / 'nonfinite': the cross-entropy input gradient at x is all zero / not finite."""
        zero, nonfinite = self.map_points(gradient_program(self.apply), variables, np.arange(self.n))
        return {"zero": zero, "nonfinite": nonfinite}

    def place(self, variables):
        """The variables replicated on the evaluator's mesh (as they are when they already are there)."""
        return variables if _on_mesh(variables, self.mesh) else parallel.put_replicated(variables, self.mesh)

    def run(self, variables, attacks: Sequence[str], seed: int = 0) -> EvalResult:
        """Every attack of `attacks` over the whole split (AutoAttack and its components from the clean mask)."""
        unknown = [a for a in attacks if a not in suite.ATTACKS]
        if unknown:
            raise ValueError(f"unknown attack(s) {unknown}; known: {', '.join(suite.ATTACKS)}")
        variables = self.place(variables)
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


class CascadeBars:
    """AutoAttack's progress display: one bar per component, its runs done, the examples still robust and the
    runs left (`autoattack.Report`)."""

    def __init__(self):
        self.bars: Dict[str, tqdm] = {}

    def __call__(self, name: str, robust: int, total: int, runs_left: int, now: str = "") -> None:
        if name not in self.bars:
            self.bars[name] = tqdm(total=runs_left, desc=f"aa {autoattack.TITLES.get(name, name)}", leave=False,
                                   dynamic_ncols=True, unit="run")
        bar = self.bars[name]
        bar.n = bar.total - runs_left
        bar.set_postfix(robust=f"{robust}/{total}", runs_left=runs_left, **({"now": now} if now else {}))
        if runs_left == 0:
            self.bars.pop(name).close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


class SquareOutcome(NamedTuple):
    """One Square run over some points: fooled, the final margin and the adversarial images (x where unfooled)."""

    fooled: np.ndarray
    margin: np.ndarray
    x_adv: np.ndarray


def _on_mesh(tree, mesh) -> bool:
    """Whether every leaf is already a jax.Array replicated on `mesh` (the train state's parameters are)."""
    leaves = jax.tree.leaves(tree)
    return all(isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh
               and x.sharding.is_fully_replicated for x in leaves)
