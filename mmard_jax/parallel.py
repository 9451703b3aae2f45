"""Data parallelism over all local devices: one 'data' mesh axis, per-device code mapped with shard_map.

`jax.pmap` is in maintenance mode and itself implemented on `jax.shard_map`; we write the per-device
step once and map it with `jax.shard_map` inside `jit`, which gives pmap's semantics on the current API.
"""

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh named 'data' over the given (default: all local) devices."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return Mesh(np.array(devices), (AXIS,))


def check_divisible(global_batch: int, mesh: Mesh, what: str = "batch size") -> int:
    """Per-device batch size; a clear error at start if the global batch does not divide."""
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"{what} {global_batch} does not divide by the {n} devices of the mesh; "
            f"choose a multiple of {n} (or run on fewer devices)"
        )
    return global_batch // n


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Sharding that splits dimension `axis` over the 'data' axis."""
    return NamedSharding(mesh, P(*([None] * axis + [AXIS])))


def example_keys(key: jax.Array, positions: jax.Array) -> jax.Array:
    """One key per example, keyed by its global position: results do not depend on the device count."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, positions)


def global_positions(local_batch: int) -> jax.Array:
    """Inside shard_map: the positions of this device's examples in the global batch."""
    return jax.lax.axis_index(AXIS) * local_batch + jax.numpy.arange(local_batch)
