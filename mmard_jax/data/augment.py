"""On-device augmentation for uint8 batches: random crop after zero padding, random horizontal flip.

Pure, jittable functions of (rng, batch), meant to run inside the jitted train step on device-resident
data. The crop is a per-example `lax.dynamic_slice` under `vmap` (one gather for the batch) and the flip
a `where`; both work on uint8, and the conversion to float32 in [0, 1] (exactly x / 255) comes last.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# x / 255 for every uint8 value, divided exactly in NumPy. XLA's simplifier turns a division by a constant
# into a multiplication by its reciprocal, one ulp off for about half the values (seen on XLA:CPU); a
# 256-entry lookup keeps the inputs bit-identical to NumPy's and PyTorch's `x / 255` on any backend, for the
# price of a gather from a 1 KiB table.
_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)


def to_float(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1], exactly x / 255; the model input for evaluation."""
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
    return jnp.asarray(_UINT8_TO_UNIT)[images]


def crop_flip_params(rng: jax.Array, batch_size: int, *, padding: int, flip: bool) -> tuple[jax.Array, jax.Array]:
    """Per-example crop offsets int32 [B,2] (row, col) in 0..2*padding and flip flags bool [B]."""
    crop_rng, flip_rng = jax.random.split(rng)
    offsets = jax.random.randint(crop_rng, (batch_size, 2), 0, 2 * padding + 1, dtype=jnp.int32)
    flips = jax.random.bernoulli(flip_rng, 0.5, (batch_size,)) if flip else jnp.zeros((batch_size,), bool)
    return offsets, flips


def crop_and_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, *, padding: int) -> jax.Array:
    """Zero-pads each side by `padding`, crops the original size at `offsets`, mirrors where `flips`."""
    _, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def crop_one(image, offset):
        # the channel index in the offsets' dtype: a bare 0 is int64 under jax_enable_x64, which dynamic_slice
        # refuses beside int32 offsets
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], jnp.zeros_like(offset[0])),
                                     (height, width, channels))

    crops = jax.vmap(crop_one)(padded, offsets)
    return jnp.where(flips[:, None, None, None], crops[:, :, ::-1, :], crops)


def augment(rng: jax.Array, images: jax.Array, *, padding: int = 4, flip: bool = True) -> jax.Array:
    """uint8 [B,H,W,C] -> float32 [B,H,W,C] in [0,1]: random crop (zero padding `padding`) + random h-flip.

    `padding` and `flip` are Python values (static under jit); padding=0, flip=False is `to_float`.
    """
    offsets, flips = crop_flip_params(rng, images.shape[0], padding=padding, flip=flip)
    return to_float(crop_and_flip(images, offsets, flips, padding=padding))
