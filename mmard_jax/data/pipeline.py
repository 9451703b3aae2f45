"""Example order for training: a deterministic per-epoch shuffle in full batches (the evaluator batches itself).

All of it is host-side NumPy on index arrays; the trainer gathers from its device-resident images with them.
"""

from __future__ import annotations

import numpy as np


def _check_batch_size(batch_size: int) -> None:
    """Raises ValueError unless batch_size is a positive integer."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Permutation int32 [n] of range(n), a pure function of (seed, epoch): NumPy PCG64 seeded by both.

    NumPy, not JAX, so the order does not depend on JAX's PRNG settings or the device; the same
    (seed, epoch, n) gives the same array on every call.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    return rng.permutation(n).astype(np.int32)


def num_train_steps(n: int, batch_size: int) -> int:
    """Training steps per epoch: full batches only (the last partial batch is dropped)."""
    _check_batch_size(batch_size)
    if n < batch_size:
        raise ValueError(f"{n} examples do not fill one batch of {batch_size}")
    return n // batch_size


def train_batch_indices(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """One epoch's training index batches, int32 [num_train_steps, batch_size], from `epoch_permutation`."""
    steps = num_train_steps(n, batch_size)
    return epoch_permutation(seed, epoch, n)[: steps * batch_size].reshape(steps, batch_size)

