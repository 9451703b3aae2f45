"""How the evaluator batches points: its batch shapes, the plan that covers n points with them (padding weighed
against compiling, from measured times), the CPU's last-level-cache cap on a batch, and the compile-time clock.

The evaluator runs every attack in a few fixed shapes (`batch_shapes`: the batch size and 2^k and 3 * 2^k times
the device count below it), so a set of points is padded less than 1.5x and compilations stay few. A plan
(`plan_batches`) takes full batches of the largest shape, then covers the rest in the cheapest way given the
seconds per example and per compilation measured so far; on a CPU, where a batch costs about its size, the rest
may be split into several batches, and shapes whose working set outgrows the last-level cache are left out: all
the activations for a gradient program (`activation_bytes`), the forward's live peak for a forward-only one
(`forward_peak_bytes`), a cap then checked by timing the bare model near it (`measured_cap`).
"""

import math
import pathlib
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core


def batch_shapes(batch_size: int, n_devices: int) -> Tuple[int, ...]:
    """The batch shapes an evaluator runs, largest first: the batch size and, below it, n_devices times
    1, 2, 3, 4, 6, 8, 12, 16, ... (2^k and 3 * 2^k): a set of points is padded by less than 1.5x."""
    shapes = {batch_size}
    size = 1
    while n_devices * size < batch_size:
        shapes.add(n_devices * size)
        if size >= 2 and n_devices * size * 3 // 2 < batch_size:
            shapes.add(n_devices * size * 3 // 2)
        size *= 2
    return tuple(sorted(shapes, reverse=True))


# On a CPU a batch's time is proportional to its size from 4 examples up (the AutoAttack benchmark's WRN-10-1,
# `scripts/benchmark_autoattack.py --batch_curve`, BENCHMARKS.md), so points split into several batches cost
# their own examples plus about this many examples' time per extra batch.
BATCH_OVERHEAD_EXAMPLES = 2


def greedy_splits(rest: int, pieces: Sequence[int], shapes: Sequence[int]) -> Tuple[Tuple[int, ...], ...]:
    """Covers of `rest` points by the largest of `pieces` that fit, one after another, each prefix closed by the
    smallest of `shapes` that holds what is left and by the smallest such piece (with compiled pieces: a cover
    that compiles nothing, such as 4 + 4 + 4 for 9 points after a compiled 4); the last is exact when the pieces
    reach it."""
    covers, taken, left = [], (), rest
    while left > 0:
        closers = {min(s for s in shapes if s >= left), min((p for p in pieces if p >= left), default=None)}
        covers += [taken + (c,) for c in sorted(closers - {None})]
        below = [s for s in pieces if s <= left]
        if not below:
            break
        taken, left = taken + (max(below),), left - max(below)
    else:
        covers.append(taken)
    return tuple(covers)


def plan_batches(n: int, shapes: Sequence[int], compiled: Sequence[int] = (),
                 cost: Optional[Tuple[float, float]] = None, split: bool = False,
                 granule: Optional[int] = None) -> Tuple[int, ...]:
    """Batch sizes covering n points: full batches of the largest shape, then the rest in the cheapest cover.

    Without `cost`: the smallest shape that holds the rest, or a larger shape compiled already (no new
    compilation) while the padded total stays within 2n. With cost = (seconds per padded example of all the
    work left, seconds one compilation takes): the cover of least padded work plus compilations, among one
    batch (a fitting shape, or a compiled one within 2n) and, with `split` (CPUs: BATCH_OVERHEAD_EXAMPLES),
    the rest split into several batches of the shapes (`greedy_splits`), each extra batch priced as
    BATCH_OVERHEAD_EXAMPLES more examples; with `granule`, also one batch of the rest rounded up to a multiple of
    it where that pads less than the smallest fitting shape (a shape of its own), preferred on a tie."""
    largest = max(shapes)
    sizes = [largest] * (n // largest)
    rest = n - sum(sizes)
    if not rest:
        return tuple(sizes)
    fit = min(s for s in shapes if s >= rest)
    known = set(compiled) | ({largest} if sizes else set())
    reuse = sorted(s for s in known if s >= rest and sum(sizes) + s <= 2 * n)
    if cost is None:
        return tuple(sizes + [reuse[0] if reuse else fit])
    exact = -(-rest // granule) * granule if granule else fit
    covers = [(fit,)] + ([(exact,)] if exact < fit else []) + [(s,) for s in reuse]
    if split:  # within 2n, as a reused compiled shape (a compiled closing piece may be large)
        splits = greedy_splits(rest, shapes, shapes) + greedy_splits(rest, sorted(known), shapes)
        covers += [c for c in splits if sum(sizes) + sum(c) <= 2 * n]

    def price(cover):
        per_example, compile_s = cost
        extra = BATCH_OVERHEAD_EXAMPLES * (len(cover) - 1)
        return per_example * (sum(cover) + extra) + compile_s * len(set(cover) - known)

    return tuple(sizes + list(min(covers, key=price)))


def cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> Optional[int]:
    """Bytes of the CPU's last-level cache (Linux sysfs), or None where it cannot be read."""
    sizes: Dict[int, int] = {}
    for index in pathlib.Path(root).glob("index*"):
        try:
            level, text = int((index / "level").read_text()), (index / "size").read_text().strip()
            size = int(text.rstrip("KMG")) * {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1], 1)
        except (OSError, ValueError, IndexError):
            continue
        sizes[level] = max(size, sizes.get(level, 0))
    return sizes[max(sizes)] if sizes else None


# The operations whose outputs XLA writes to memory in a forward pass; elementwise work (BatchNorm in inference,
# additions) fuses into them. Custom calls are the layers' own VJP/JVP wrappers (conv2d, ReLU).
MATERIALISED = frozenset({"conv_general_dilated", "dot_general", "custom_vjp_call", "custom_jvp_call", "pjit",
                          "reduce_sum", "reduce_max", "reduce_window_sum", "reduce_window_max", "cumsum"})


def activation_bytes(apply_fn: Callable, variables, image_shape) -> int:
    """Bytes one example's forward pass materialises (outputs of MATERIALISED operations, read off the jaxpr):
    an attack step's working set per example. Works for any JAX function of (variables, x)."""
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(apply_fn)(variables, x).jaxpr
    return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize
               for eqn in jaxpr.eqns if eqn.primitive.name in MATERIALISED for v in eqn.outvars)


def forward_peak_bytes(apply_fn: Callable, variables, image_shape) -> int:
    """Bytes a forward-only pass keeps live per example at its widest point: the outputs of MATERIALISED
    operations, each live from where it is computed to its last reader (through the elementwise operations fused
    into its readers), summed at the worst position of the jaxpr. A program without a backward (Square) frees
    each activation once read, so its working set is a block's few activations, not all of them."""
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(apply_fn)(variables, x).jaxpr
    roots: Dict = {}  # var -> the materialised outputs it is made of (itself, or what fused elementwise ops read)
    born, last, size = {}, {}, {}
    for position, eqn in enumerate(jaxpr.eqns):
        read = set().union(*(roots.get(v, ()) for v in eqn.invars if isinstance(v, jex_core.Var)))
        for m in read:
            last[m] = position
        for v in eqn.outvars:
            if eqn.primitive.name in MATERIALISED:
                roots[v], born[v], last[v] = {v}, position, position
                size[v] = math.prod(v.aval.shape) * v.aval.dtype.itemsize
            else:
                roots[v] = read
    for v in jaxpr.outvars:
        for m in roots.get(v, ()) if isinstance(v, jex_core.Var) else ():
            last[m] = len(jaxpr.eqns)
    return max((sum(size[m] for m in size if born[m] <= position <= last[m])
                for position in range(len(jaxpr.eqns) + 1)), default=0)


def cache_cap(shapes: Sequence[int], per_example: int, cache: Optional[int]) -> int:
    """The largest shape whose batch of activations fits the cache (the smallest shape if none does; every shape
    when the cache is unknown)."""
    if not cache:
        return max(shapes)
    fitting = [s for s in shapes if s * per_example <= cache]
    return max(fitting) if fitting else min(shapes)


# A CPU cap is measured (`measured_cap`) once the work left for a program is worth this many of its compilations
# (at least 1 s each): the probe compiles the bare model at two to four shapes, each cheaper than the program.
PROBE_WORTH = 10
# A neighbouring shape replaces the cap only when it costs at least this much less per example (timing noise).
PROBE_MARGIN = 0.05


def seconds_per_example(fn: Callable, x, repeats: int = 3) -> float:
    """Seconds per example of `fn(x)` (x batched along axis 0): compiled and run once, then the best of `repeats`."""
    jax.block_until_ready(fn(x))
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(fn(x))
        best = min(best, time.perf_counter() - began)
    return best / x.shape[0]


def measured_cap(per_example: Callable[[int], float], shapes: Sequence[int], start: int,
                 margin: float = PROBE_MARGIN) -> int:
    """The cap a CPU plan uses, measured: from `start` (the cache model's cap), to the next larger shape while it
    costs `margin` less per example than the current one, else to the next smaller ones while they do.
    `per_example(size)` times one batch (each size at most once)."""
    order = sorted(set(shapes) | {start})
    seen: Dict[int, float] = {}

    def cost(size: int) -> float:
        if size not in seen:
            seen[size] = per_example(size)
        return seen[size]

    at = order.index(start)
    for step in (1, -1):
        while 0 <= at + step < len(order) and (1 - margin) * cost(order[at]) > cost(order[at + step]):
            at += step
        if order[at] != start:
            break
    return order[at]


class CompileClock:
    """Seconds JAX has spent compiling in this process (tracing, lowering, XLA), from its monitoring events;
    the listener is registered by the first evaluator, not at import."""

    seconds = 0.0
    registered = False

    @classmethod
    def listener(cls, event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            cls.seconds += duration

    @classmethod
    def start(cls) -> None:
        if not cls.registered:
            jax.monitoring.register_event_duration_secs_listener(cls.listener)
            cls.registered = True
