"""Square Attack under L-inf (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search", Algorithm 1), as AutoAttack runs it.

Score-based random search on the margin loss z_y - max_{j != y} z_j: start at vertical stripes of +-eps
(one sign per column and channel), then each query proposes to set a random square window to one random
+-eps sign per channel (a vertex of the eps-ball), keeping the proposal when the margin decreases or the
point becomes misclassified. The side of the window follows p_init = 0.8 and the reference's schedule
(p halves after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000; AutoAttack does not rescale it
to the query budget). An example stops once misclassified; the loop stops when every active example has.

Window offsets follow AutoAttack's code (Croce & Hein's, as packaged in pyautoattack 0.2.0): the corner
is floor(U * (h - s)), U uniform in [0, 1) (pyautoattack/square.py `random_int`, lines 117-119, called at
lines 257-258), so it takes the h - s offsets 0 .. h - s - 1 and never the last one, h - s. When s == h the
product is 0 and the window sits at offset 0, its only position: torch scales a uniform draw, nothing
raises (unlike numpy's randint(0, 0)). torchattacks 3.5.1 does the same (its square.py lines 125-127,
232-233), and the numbers published with AutoAttack (RobustBench's) come from it. `full_range=True`
(AutoAttackConfig.square_full_range) draws the corner uniformly over all h - s + 1 offsets, as the paper
states the algorithm. The difference matters on small images: under the original rule no window (s < h)
ever covers the last row or column, which keep their starting stripes; on 8x8 digits Square alone is about
5 points of robust accuracy weaker than with the full range (tests/test_autoattack_original.py).

One deviation from that code remains: the window position and the channel signs are drawn per example,
from the example's own key. The reference draws one position (`vh`, `vw`: shape [1], lines 257-258) and one
sign per channel (`random_choice([c, 1, 1])`, line 261) per query, shared by every still-unfooled example
of the batch, which makes an example's result depend on its batch; ours gives each example its own window.

Resumable: the attack is `square_start` (the stripes and their margin, a `SquareState`) followed by
`square_steps` over any range of query indices, so it can run in chunks of queries and drop the examples
fooled between chunks, as the original drops them at every query (its `idx_to_fool`, lines 244-252). An
example's proposal at query i is drawn from (its key, i) alone and a fooled example never changes again,
so chunking and the batch an example lands in do not change its result (tests/test_autoattack.py).
"""

from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from mmard_jax import losses
from mmard_jax.attacks import counter_rng
from mmard_jax.attacks.engine import project

Array = jax.Array
ApplyFn = Callable[[Array], Array]

P_INIT = 0.8  # pyautoattack/autoattack.py line 53 (`p_init=.8`)
# p_init is divided by 2 ** (number of these bounds the query index exceeds): pyautoattack/square.py lines 198-217.
P_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


# Square runs in chunks of queries (evaluator.Evaluator.square_points drops the fooled examples in between):
# the first this long, each next one twice the last, at most the second. Chosen on Square alone against the
# benchmark's WRN-10-1 (scripts/benchmark_autoattack.py; 163 points, 41 fooled by query 100, 67 by 1000,
# 74 by 5000), simulating each schedule on that measured curve with the measured CPU costs: padded work
# 1.09x the original's in 9 chunks; (100, 1000) 1.13x in 8, (25, 500) 1.08x in 14, (50, 50) 1.10x in 100,
# one chunk of 5000 queries (no compaction) 2.0x.
CHUNKS = (50, 1000)


def query_chunks(n_queries: int, chunks: Tuple[int, int] = CHUNKS) -> Tuple[Tuple[int, int], ...]:
    """(start, stop) ranges covering queries 0 .. n_queries - 1: the first `chunks[0]` long, each next one twice
    the last, at most `chunks[1]`; one empty range (the stripes alone) when n_queries is 0."""
    first, longest = chunks
    if first < 1 or longest < first:
        raise ValueError(f"Square query chunks must satisfy 1 <= first <= longest, got {chunks}")
    bounds, start, size = [], 0, first
    while start < n_queries or not bounds:
        stop = min(start + size, n_queries)
        bounds.append((start, stop))
        start, size = stop, min(2 * size, longest)
    return tuple(bounds)


def window_fraction(i: Array, n_queries: int, p_init: float = P_INIT, rescale: bool = False) -> Array:
    """Fraction p of the image a square covers at query i (0-based); `rescale` maps n_queries onto 10000."""
    it = (i * 10000) // n_queries if rescale else i
    halvings = sum((it > bound).astype(jnp.int32) for bound in P_BOUNDS)
    return p_init / (2.0 ** halvings)


def window_side(p: Array, height: int, width: int) -> Array:
    """Side s of the square: round(sqrt(p * h * w)), at least 1 and at most the image side."""
    s = jnp.round(jnp.sqrt(p * height * width)).astype(jnp.int32)
    return jnp.clip(s, 1, min(height, width))


def stripes_start(keys: Array, x: Array, eps: float) -> Array:
    """x + eps * (one random sign per column and channel), clipped to [0, 1] (NHWC)."""
    _, _, w, c = x.shape
    signs = counter_rng.rademacher(keys, counter_rng.SQUARE_STRIPES, (1, w, c), x.dtype)
    return jnp.clip(x + eps * signs, 0.0, 1.0)


def query_bits(keys: Array, i: Array) -> Array:
    """uint32 [B, 3]: the random words (row, column, channel signs) of every example's proposal at query i,
    a hash of (the example's key, i) alone (counter_rng), so any chunking of the queries draws the same ones."""
    i = jnp.asarray(i, jnp.uint32)
    return counter_rng.words(keys, counter_rng.SQUARE_QUERY, 3 * i + jnp.arange(3, dtype=jnp.uint32))


def offset_span(size: int, side: Array, full_range: bool) -> Array:
    """How many corner offsets a window of `side` can take along an axis of `size` (uint32, at least 1)."""
    if full_range:
        return (size - side + 1).astype(jnp.uint32)  # all of 0 .. size - side, as the paper states it
    # pyautoattack/square.py lines 117-119, 257-258: floor(U * (size - side)), U in [0, 1): 0 .. size - side - 1,
    # and 0 alone when side == size.
    return jnp.maximum(size - side, 1).astype(jnp.uint32)


def proposal(bits: Array, shape, side: Array, eps: float, dtype, full_range: bool = False) -> Array:
    """One example's update from its 3 random words: 2 eps * (a sign per channel) on an s x s window, 0 elsewhere.

    The window's corner is uniform (modulo bias < 1e-8) over AutoAttack's offsets, or over all
    (h - s + 1) x (w - s + 1) with `full_range` (`offset_span`).
    """
    h, w, c = shape
    row = (bits[0] % offset_span(h, side, full_range)).astype(jnp.int32)
    col = (bits[1] % offset_span(w, side, full_range)).astype(jnp.int32)
    signs = jnp.where((bits[2] >> jnp.arange(c, dtype=jnp.uint32)) & 1, 1.0, -1.0)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    inside = (rows >= row) & (rows < row + side) & (cols >= col) & (cols < col + side)
    return (inside[..., None] * (2.0 * eps) * signs).astype(dtype)


class SquareState(NamedTuple):
    """Square's state between chunks of queries, per example: the best point so far and its margin
    (fooled once the margin is <= 0; a fooled example is never updated again)."""

    x_best: Array
    margin_best: Array


class _Loop(NamedTuple):
    i: Array
    x_best: Array
    margin_best: Array


def square_start(apply_fn: ApplyFn, x: Array, y: Array, keys: Array, *, eps: float) -> SquareState:
    """The starting stripes (`stripes_start`) and their margin: the state before query 0."""
    x = jax.lax.stop_gradient(x)
    if x.shape[-1] > 32:
        raise ValueError(f"square_linf draws one random word of channel signs: at most 32 channels, got {x.shape[-1]}")
    x_best = stripes_start(keys, x, eps)
    return SquareState(x_best, losses.margin(apply_fn(x_best), y))


def square_steps(
    apply_fn: ApplyFn,
    x: Array,
    y: Array,
    keys: Array,
    state: SquareState,
    start,
    stop,
    *,
    eps: float,
    n_queries: int = 5000,
    p_init: float = P_INIT,
    rescale_schedule: bool = False,
    full_range: bool = False,
    active: Optional[Array] = None,
) -> SquareState:
    """Queries start .. stop - 1 (ints, traced or not; stop <= n_queries, which fixes the p schedule) from
    `state`; stops early once every active example is fooled (`active`: bool [B], default all)."""
    x = jax.lax.stop_gradient(x)
    _, h, w, _ = x.shape
    active = jnp.ones(y.shape, bool) if active is None else active

    def cond(s: _Loop):
        return (s.i < stop) & jnp.any(active & (s.margin_best > 0))

    def body(s: _Loop) -> _Loop:
        side = window_side(window_fraction(s.i, n_queries, p_init, rescale_schedule), h, w)
        delta = jax.vmap(lambda r: proposal(r, x.shape[1:], side, eps, x.dtype, full_range))(query_bits(keys, s.i))
        x_new = project(s.x_best + delta, x, eps)
        m = losses.margin(apply_fn(x_new), y)
        accept = (s.margin_best > 0) & ((m < s.margin_best) | (m <= 0))
        return _Loop(
            s.i + 1,
            jnp.where(accept[:, None, None, None], x_new, s.x_best),
            jnp.where(accept, m, s.margin_best),
        )

    first = _Loop(jnp.asarray(start, jnp.int32), state.x_best, state.margin_best)
    final = jax.lax.while_loop(cond, body, first)
    return SquareState(final.x_best, final.margin_best)


def square_outcome(x: Array, state: SquareState) -> Tuple[Array, Array]:
    """(x_adv, fooled [B]): the best point where the margin is <= 0, x elsewhere."""
    fooled = state.margin_best <= 0
    return jax.lax.stop_gradient(jnp.where(fooled[:, None, None, None], state.x_best, x)), fooled


def square_linf(
    apply_fn: ApplyFn,
    x: Array,
    y: Array,
    keys: Array,
    *,
    eps: float,
    n_queries: int = 5000,
    p_init: float = P_INIT,
    rescale_schedule: bool = False,
    full_range: bool = False,
    active: Optional[Array] = None,
) -> Tuple[Array, Array]:
    """Square Attack with `n_queries` proposals per example (NHWC x), in one run; returns (x_adv, fooled [B]).
    `full_range` lets the window's corner take the last offset h - s too (AutoAttack's code never does)."""
    state = square_start(apply_fn, x, y, keys, eps=eps)
    state = square_steps(apply_fn, x, y, keys, state, 0, n_queries, eps=eps, n_queries=n_queries, p_init=p_init,
                         rescale_schedule=rescale_schedule, full_range=full_range, active=active)
    return square_outcome(jax.lax.stop_gradient(x), state)
