"""Square Attack under L-inf and L2 (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, "Square Attack: a
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

L2 (`norm="L2"`, pyautoattack 0.2.0 square.py lines 305-420, Algorithm 3 of the paper): the start is a grid
of s0 x s0 windows (s0 = h // 5, from offset (h - 5 s0) // 2), each holding the `eta` pattern (two
opposite-signed stacks of nested rectangles, randomly transposed) times a random sign per channel, the whole
scaled to L2 norm eps (lines 306-320). Each query picks two windows of odd side s >= 3 (lines 341-344); on the
first it puts eta(s) times a random sign per channel plus the current perturbation there, normalised, scaled
so that the mass of both windows plus the unused budget eps^2 - ||delta||^2 is spread over it (lines 350-374),
zeroes the second (line 375), and rescales the whole perturbation to norm eps before the box clip (line 378).
The same per-example draws as under L-inf (both windows, the signs and the transpose from the example's key
and the query index; the reference shares them over the batch, and draws one transpose per start window).
"""

import math
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mmard_jax import losses
from mmard_jax.attacks import counter_rng
from mmard_jax.attacks.engine import NORM_FLOOR, check_norm, l2_normalize, project

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


def halvings(i: Array, n_queries: int, rescale: bool = False) -> Array:
    """How many times p_init has been halved at query i (0-based): the P_BOUNDS it exceeds; `rescale` maps
    n_queries onto 10000."""
    it = (i * 10000) // n_queries if rescale else i
    return sum((it > bound).astype(jnp.int32) for bound in P_BOUNDS)


def window_fraction(i: Array, n_queries: int, p_init: float = P_INIT, rescale: bool = False) -> Array:
    """Fraction p of the image a square covers at query i (0-based); `rescale` maps n_queries onto 10000."""
    return p_init / (2.0 ** halvings(i, n_queries, rescale))


def window_side(p: Array, height: int, width: int) -> Array:
    """Side s of the square: round(sqrt(p * h * w)), at least 1 and at most the image side."""
    s = jnp.round(jnp.sqrt(p * height * width)).astype(jnp.int32)
    return jnp.clip(s, 1, min(height, width))


def stripes_start(keys: Array, x: Array, eps: float) -> Array:
    """x + eps * (one random sign per column and channel), clipped to [0, 1] (NHWC)."""
    _, _, w, c = x.shape
    signs = counter_rng.rademacher(keys, counter_rng.SQUARE_STRIPES, (1, w, c), x.dtype)
    return jnp.clip(x + eps * signs, 0.0, 1.0)


def query_bits(keys: Array, i: Array, n_words: int = 3) -> Array:
    """uint32 [B, n_words]: the random words of every example's proposal at query i (L-inf: row, column, channel
    signs; L2: two windows' rows and columns, channel signs, transpose), a hash of (the example's key, i)
    alone (counter_rng), so any chunking of the queries draws the same ones."""
    i = jnp.asarray(i, jnp.uint32)
    return counter_rng.words(keys, counter_rng.SQUARE_QUERY, n_words * i + jnp.arange(n_words, dtype=jnp.uint32))


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


# L2 ------------------------------------------------------------------------------------------------------------

L2_MIN_SIDE = 3  # pyautoattack 0.2.0 square.py line 341: `max(..., 3)`, then made odd (lines 342-343)
L2_QUERY_WORDS = 6  # row, column, row 2, column 2, channel signs, transpose


def eta_rectangles(rows: int, cols: int) -> np.ndarray:
    """[rows, cols] of nested rectangles around the centre (rows // 2, cols // 2), the k-th (k = 0, 1, ...)
    adding 1 / (k + 1)^2 over the centre's (2k + 1)-neighbourhood, scaled to unit L2 norm (square.py lines
    143-157): a point's value is the sum over k from its Chebyshev distance to the centre."""
    depth = max(rows // 2 + 1, cols // 2 + 1)
    tail = np.cumsum((1.0 / np.arange(1, depth + 1) ** 2)[::-1])[::-1]  # tail[m] = sum_{k >= m} 1 / (k + 1)^2
    dist = np.maximum(np.abs(np.arange(rows) - rows // 2)[:, None], np.abs(np.arange(cols) - cols // 2)[None, :])
    delta = tail[dist] if rows and cols else np.zeros((rows, cols))
    return delta / max(np.sqrt(np.sum(delta ** 2)), np.finfo(np.float64).tiny)


def eta(side: int) -> np.ndarray:
    """[side, side]: eta_rectangles on the top side // 2 rows, minus eta_rectangles on the rest, unit L2 norm
    (square.py lines 172-177; the reference transposes it at random, line 187: `l2_proposal`)."""
    delta = np.concatenate([eta_rectangles(side // 2, side), -eta_rectangles(side - side // 2, side)])
    return delta / np.sqrt(np.sum(delta ** 2))


def l2_side(p: float, height: int, width: int) -> int:
    """Side of the L2 windows for fraction p: round(sqrt(p h w)), at least 3, odd, at most the image side
    (square.py lines 341-344; Python's round, half to even, as there)."""
    side = max(int(round(math.sqrt(p * height * width))), L2_MIN_SIDE)
    return min(side + 1 - side % 2, height, width)


class L2Tables(NamedTuple):
    """Per halving level (0 .. len(P_BOUNDS)): the window side, and eta(side)'s values by part (0: the top side // 2
    rows, 1: the rest) and by Chebyshev distance from that part's centre (static: numpy, float32 as eta's entries)."""

    sides: np.ndarray
    by_distance: np.ndarray


def l2_tables(p_init: float, height: int, width: int) -> L2Tables:
    """The L2 windows of every level of the p schedule (`halvings`). eta(s) is a function of (part, distance) alone
    (`eta_rectangles`), so its s // 2 + 1 values per part, read off eta(s) itself, rebuild it exactly anywhere."""
    sides = np.array([l2_side(p_init / 2 ** k, height, width) for k in range(len(P_BOUNDS) + 1)], np.int32)
    by_distance = np.zeros((len(sides), 2, int(sides.max()) // 2 + 1), np.float32)
    for k, side in enumerate(sides):
        pattern, top = eta(int(side)).astype(np.float32), side // 2
        for part, centre in enumerate((top // 2, top + (side - top) // 2)):  # each part's centre row
            by_distance[k, part, :side // 2 + 1] = pattern[centre, side // 2::-1]  # distance d: column side // 2 - d
    return L2Tables(sides, by_distance)


def window_eta(row: Array, col: Array, side: Array, transposed: Array, by_distance: Array, height: int,
               width: int) -> Array:
    """[h, w]: eta(side) (or its transpose) on the window with corner (row, col), 0 elsewhere, computed from each
    pixel's part and distance (`l2_tables`) rather than by shifting a stored pattern, a gather that cost about
    40% of the L2 proposal on a CPU (equal values: tests/test_autoattack.py)."""
    i, j = jnp.arange(height)[:, None] - row, jnp.arange(width)[None, :] - col
    inside = (i >= 0) & (i < side) & (j >= 0) & (j < side)
    i, j = jnp.where(transposed, j, i), jnp.where(transposed, i, j)
    top = side // 2
    part = (i >= top).astype(jnp.int32)
    rows = jnp.where(part == 1, side - top, top)
    dist = jnp.maximum(jnp.abs(i - part * top - rows // 2), jnp.abs(j - side // 2))
    depth = by_distance.shape[-1]
    values = jnp.take(by_distance.reshape(-1), part * depth + jnp.clip(dist, 0, depth - 1))
    return jnp.where(inside, values, 0.0)


def l2_start_delta(keys: Array, shape, dtype) -> Array:
    """[B, h, w, c]: the L2 start's unscaled perturbation (square.py lines 306-317): eta(s0) on a grid of s0 x s0
    windows, s0 = h // 5, from offset (h - 5 s0) // 2 (parts past the image dropped), each transposed at random
    and times a random sign per channel."""
    h, w, c = shape
    side = h // 5
    if side < 1:
        raise ValueError(f"Square L2 starts from windows of side h // 5: the image must be at least 5 high, got {h}")
    first = (h - 5 * side) // 2
    corners = [(first + a * side, first + b * side) for a in range(h // side) for b in range(w // side)]
    placed = np.zeros((2, len(corners), h, w), np.float32)
    for k, (r, q) in enumerate(corners):
        for t, pattern in enumerate((eta(side), eta(side).T)):
            rows, cols = min(side, h - r), min(side, w - q)
            if rows > 0 and cols > 0:
                placed[t, k, r:r + rows, q:q + cols] = pattern[:rows, :cols]
    draws = counter_rng.rademacher(keys, counter_rng.SQUARE_START_L2, (len(corners), c + 1), dtype)
    windows = jnp.where(draws[..., c, None, None] > 0, placed[1], placed[0])  # [B, K, h, w]
    return jnp.sum(windows[..., None] * draws[:, :, None, None, :c], axis=1).astype(dtype)


def in_window(row: Array, col: Array, side: Array, height: int, width: int) -> Array:
    """bool [h, w]: the side x side window with corner (row, col)."""
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    return (rows >= row) & (rows < row + side) & (cols >= col) & (cols < col + side)


def l2_proposal(bits: Array, x: Array, x_best: Array, level: Array, tables: L2Tables, eps: float,
                full_range: bool = False) -> Array:
    """One example's L2 candidate (square.py lines 339-379) from its L2_QUERY_WORDS random words: the current
    perturbation with window 1 redrawn (eta(s) times a sign per channel, plus its old content normalised)
    and rescaled to carry window 1's and 2's old mass and the unused budget, window 2 zeroed (unless inside
    window 1), the whole rescaled to norm eps and clipped to [0, 1]."""
    h, w, c = x.shape
    side = jnp.asarray(tables.sides)[level]
    span_h, span_w = offset_span(h, side, full_range), offset_span(w, side, full_range)
    row, col, row2, col2 = (bits[k] % span for k, span in enumerate((span_h, span_w, span_h, span_w)))
    row, col, row2, col2 = (v.astype(jnp.int32) for v in (row, col, row2, col2))
    win1, win2 = in_window(row, col, side, h, w)[..., None], in_window(row2, col2, side, h, w)[..., None]
    delta = x_best - x

    def channel_norm(v):  # [c]: the L2 norm of each channel over the image
        return jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 1)))

    pattern = window_eta(row, col, side, (bits[5] & 1) == 1, jnp.asarray(tables.by_distance)[level], h, w)
    signs = jnp.where((bits[4] >> jnp.arange(c, dtype=jnp.uint32)) & 1, 1.0, -1.0).astype(x.dtype)
    fresh = pattern[..., None] * signs
    new = jnp.where(win1, fresh + delta / (NORM_FLOOR + channel_norm(jnp.where(win1, delta, 0.0))), 0.0)
    budget = jnp.maximum(eps ** 2 - jnp.sum(jnp.square(delta)), 0.0) / c
    mass = jnp.sqrt(budget + jnp.square(channel_norm(jnp.where(win1 | win2, delta, 0.0))))
    new = new / (NORM_FLOOR + channel_norm(new)) * mass
    delta = jnp.where(win1, new, jnp.where(win2, 0.0, delta))
    return jnp.clip(x + eps * l2_normalize(delta[None])[0], 0.0, 1.0)


class SquareState(NamedTuple):
    """Square's state between chunks of queries, per example: the best point so far and its margin
    (fooled once the margin is <= 0; a fooled example is never updated again)."""

    x_best: Array
    margin_best: Array


class _Loop(NamedTuple):
    i: Array
    x_best: Array
    margin_best: Array


def square_start(apply_fn: ApplyFn, x: Array, y: Array, keys: Array, *, eps: float, norm: str = "Linf") -> SquareState:
    """The start (L-inf: `stripes_start`; L2: `l2_start_delta` scaled to norm eps, clipped) and its margin: the
    state before query 0."""
    x = jax.lax.stop_gradient(x)
    if x.shape[-1] > 32:
        raise ValueError(f"Square draws one random word of channel signs: at most 32 channels, got {x.shape[-1]}")
    if check_norm(norm) == "L2":  # square.py lines 319-320
        x_best = jnp.clip(x + eps * l2_normalize(l2_start_delta(keys, x.shape[1:], x.dtype)), 0.0, 1.0)
    else:
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
    norm: str = "Linf",
) -> SquareState:
    """Queries start .. stop - 1 (ints, traced or not; stop <= n_queries, which fixes the p schedule) from
    `state`; stops early once every active example is fooled (`active`: bool [B], default all)."""
    x = jax.lax.stop_gradient(x)
    _, h, w, _ = x.shape
    active = jnp.ones(y.shape, bool) if active is None else active
    tables = l2_tables(p_init, h, w) if check_norm(norm) == "L2" else None

    def candidate(s: _Loop) -> Array:
        """Every example's proposal at query s.i: L-inf `proposal` added and projected, or `l2_proposal`."""
        if tables is not None:
            level = halvings(s.i, n_queries, rescale_schedule)
            return jax.vmap(lambda r, x, xb: l2_proposal(r, x, xb, level, tables, eps, full_range))(
                query_bits(keys, s.i, L2_QUERY_WORDS), x, s.x_best)
        side = window_side(window_fraction(s.i, n_queries, p_init, rescale_schedule), h, w)
        delta = jax.vmap(lambda r: proposal(r, x.shape[1:], side, eps, x.dtype, full_range))(query_bits(keys, s.i))
        return project(s.x_best + delta, x, eps)

    def cond(s: _Loop):
        return (s.i < stop) & jnp.any(active & (s.margin_best > 0))

    def body(s: _Loop) -> _Loop:
        x_new = candidate(s)
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


def square_attack(
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
    norm: str = "Linf",
) -> Tuple[Array, Array]:
    """Square Attack under `norm` with `n_queries` proposals per example (NHWC x), in one run; returns (x_adv,
    fooled [B]). `full_range` lets the window's corner take the last offset h - s too (AutoAttack's code never
    does)."""
    state = square_start(apply_fn, x, y, keys, eps=eps, norm=norm)
    state = square_steps(apply_fn, x, y, keys, state, 0, n_queries, eps=eps, n_queries=n_queries, p_init=p_init,
                         rescale_schedule=rescale_schedule, full_range=full_range, active=active, norm=norm)
    return square_outcome(jax.lax.stop_gradient(x), state)
