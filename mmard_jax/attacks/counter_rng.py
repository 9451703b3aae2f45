"""Counter-based random numbers for AutoAttack's components: a 32-bit integer hash of (key, stream, counter).

Why not jax.random inside the attack programs: on XLA's CPU backend every threefry draw in a program added
seconds of compile time (jaxlib 0.10, this 2-core CPU, loaded: APGD-CE on a small MLP compiled in 12.4-13.7 s
with its `jax.random.uniform` start, 5.3-7.3 s with this hash, 5.4-6.7 s with no random start at all;
scripts/benchmark_autoattack.py reports the compile time per component). The attacks need a few well-mixed
words per example and step, not a cryptographic stream, so each number is `mix` applied to the example's key
words, a stream id and a counter: any element can be computed alone (Square draws query i's words at query
i, in whatever chunk it runs), and nothing depends on the batch.

`mix` is Chris Wellons' `triple32` integer hash ("Prospecting for Hash Functions", 2018,
https://github.com/skeeto/hash-prospector, the constants of its `triple32`; measured bias 0.0209).
"""

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Streams: one id per use, so that two uses of the same example key never share numbers.
APGD_START, SQUARE_STRIPES, SQUARE_QUERY, EXAMPLE, APGD_START_L2, SQUARE_START_L2 = 1, 2, 3, 4, 5, 6
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads small stream ids before mixing


def mix(x: Array) -> Array:
    """triple32 (Wellons): a bijective uint32 -> uint32 hash with full avalanche."""
    x = jnp.asarray(x, jnp.uint32)
    x = x ^ (x >> 17)
    x = x * jnp.uint32(0xED5AD4BB)
    x = x ^ (x >> 11)
    x = x * jnp.uint32(0xAC4C1B51)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x31848BAB)
    return x ^ (x >> 14)


def _fold(h: Array, word: Array) -> Array:
    return mix(h ^ word)


def words(keys: Array, stream: int, counters: Array) -> Array:
    """uint32 [B, *counters.shape]: the hash of each example's key (a typed key array [B]), `stream` and
    every counter."""
    data = jax.random.key_data(keys).astype(jnp.uint32)  # [B, key words]
    counters = jnp.asarray(counters, jnp.uint32)
    h = mix(counters ^ jnp.uint32((stream * _GOLDEN) & 0xFFFFFFFF))[None]
    for j in range(data.shape[-1]):
        h = _fold(h, data[:, j].reshape((-1,) + (1,) * counters.ndim))
    return mix(h)


def uniform(keys: Array, stream: int, shape, dtype=jnp.float32, minval: float = 0.0, maxval: float = 1.0) -> Array:
    """[B, *shape] uniform in [minval, maxval) from 24 hashed bits per element."""
    n = int(np.prod(shape))
    bits = words(keys, stream, jnp.arange(n, dtype=jnp.uint32)).reshape((-1,) + tuple(shape))
    unit = (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
    return (minval + (maxval - minval) * unit).astype(dtype)


def normal(keys: Array, stream: int, shape, dtype=jnp.float32) -> Array:
    """[B, *shape] standard normal by Box-Muller from two hashed 24-bit uniforms per element (the first in (0, 1],
    so its logarithm is finite)."""
    n = int(np.prod(shape))
    bits = words(keys, stream, jnp.arange(2 * n, dtype=jnp.uint32)) >> 8
    u1 = ((bits[:, :n] + 1).astype(jnp.float32) * (1.0 / (1 << 24)))
    u2 = bits[:, n:].astype(jnp.float32) * (1.0 / (1 << 24))
    z = jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)
    return z.reshape((-1,) + tuple(shape)).astype(dtype)


def rademacher(keys: Array, stream: int, shape, dtype=jnp.float32) -> Array:
    """[B, *shape] of +-1 with equal probability (one hashed bit per element)."""
    n = int(np.prod(shape))
    bits = words(keys, stream, jnp.arange(n, dtype=jnp.uint32)).reshape((-1,) + tuple(shape))
    return jnp.where(bits >> 31, 1.0, -1.0).astype(dtype)


def example_keys(key: Array, positions: Array) -> Array:
    """One typed key per example from one key and the examples' positions in the split (the counterpart of
    `parallel.example_keys`, without a threefry draw in the program)."""
    data = jax.random.key_data(key).astype(jnp.uint32)  # [key words]
    positions = jnp.asarray(positions, jnp.uint32)
    h = mix(positions ^ jnp.uint32(EXAMPLE * _GOLDEN & 0xFFFFFFFF))
    out = []
    for j in range(data.shape[-1]):
        h = _fold(h, data[j])
        out.append(mix(h + jnp.uint32(j)))
    return jax.random.wrap_key_data(jnp.stack(out, axis=-1), impl=jax.random.key_impl(key))
