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
"""

from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from mmard_jax.attacks.engine import project

Array = jax.Array
ApplyFn = Callable[[Array], Array]

P_INIT = 0.8  # pyautoattack/autoattack.py line 53 (`p_init=.8`)
# p_init is divided by 2 ** (number of these bounds the query index exceeds): pyautoattack/square.py lines 198-217.
P_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def margin(logits: Array, y: Array) -> Array:
    """Per-example z_y - max_{j != y} z_j (positive while correctly classified)."""
    z = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(y, z.shape[-1], dtype=bool)
    return jnp.sum(jnp.where(onehot, z, 0.0), axis=-1) - jnp.max(jnp.where(onehot, -jnp.inf, z), axis=-1)


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
    signs = jax.vmap(lambda k: jax.random.rademacher(k, (1, w, c), x.dtype))(keys)
    return jnp.clip(x + eps * signs, 0.0, 1.0)


def proposal_bits(keys: Array, n_queries: int) -> Array:
    """uint32 [B, n_queries, 3]: every proposal's random words (row, column, channel signs), drawn up front."""
    return jax.vmap(lambda k: jax.random.bits(k, (n_queries, 3), jnp.uint32))(keys)


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


class _State(NamedTuple):
    i: Array
    x_best: Array
    margin_best: Array


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
    """Square Attack with `n_queries` proposals per example (NHWC x); returns (x_adv, fooled [B]).
    `full_range` lets the window's corner take the last offset h - s too (AutoAttack's code never does)."""
    x = jax.lax.stop_gradient(x)
    b, h, w, c = x.shape
    if c > 32:
        raise ValueError(f"square_linf draws one random word of channel signs: at most 32 channels, got {c}")
    active = jnp.ones((b,), bool) if active is None else active
    start_keys, loop_keys = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 2))(keys), 1, 0)
    bits = proposal_bits(loop_keys, n_queries)
    x_best = stripes_start(start_keys, x, eps)
    margin_best = margin(apply_fn(x_best), y)

    def cond(s: _State):
        return (s.i < n_queries) & jnp.any(active & (s.margin_best > 0))

    def body(s: _State) -> _State:
        side = window_side(window_fraction(s.i, n_queries, p_init, rescale_schedule), h, w)
        step_bits = jax.lax.dynamic_index_in_dim(bits, s.i, axis=1, keepdims=False)
        delta = jax.vmap(lambda r: proposal(r, x.shape[1:], side, eps, x.dtype, full_range))(step_bits)
        x_new = project(s.x_best + delta, x, eps)
        m = margin(apply_fn(x_new), y)
        accept = (s.margin_best > 0) & ((m < s.margin_best) | (m <= 0))
        return _State(
            s.i + 1,
            jnp.where(accept[:, None, None, None], x_new, s.x_best),
            jnp.where(accept, m, s.margin_best),
        )

    final = jax.lax.while_loop(cond, body, _State(jnp.zeros((), jnp.int32), x_best, margin_best))
    fooled = final.margin_best <= 0
    x_adv = jnp.where(fooled[:, None, None, None], final.x_best, x)
    return jax.lax.stop_gradient(x_adv), fooled
