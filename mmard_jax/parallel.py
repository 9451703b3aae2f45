"""Data parallelism over every device of every process: one 'data' mesh axis, per-device code mapped with shard_map.

`jax.pmap` is in maintenance mode and itself implemented on `jax.shard_map`; we write per-device code once and
map it with `jax.shard_map` inside `jit`, which gives pmap's semantics on the current API. In a multi-process
run (`mmard_jax.distributed`) the mesh spans all processes' devices, ordered by process, so each process
holds one contiguous block of every batch: `put_batch` feeds only that block and `to_host` gathers results
back onto every host. With one process these reduce to `device_put` and `np.asarray`.
"""

from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmard_jax.errors import ConfigError

AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh named 'data' over the given devices (default: every device of every process, by process)."""
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(list(devices)), (AXIS,))


def check_divisible(global_batch: int, mesh: Mesh, what: str = "batch size") -> int:
    """Per-device batch size; a ConfigError naming `what` if the global batch does not divide (entry points call
    it once per run, before loading anything; the Evaluator and the train step assume it)."""
    n = mesh.devices.size
    if global_batch <= 0 or global_batch % n:
        raise ConfigError(
            f"{what} {global_batch} does not divide by the {n} devices of the mesh; "
            f"choose a positive multiple of {n} (or run on fewer devices)"
        )
    return global_batch // n


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Sharding that splits dimension `axis` over the 'data' axis."""
    return NamedSharding(mesh, P(*([None] * axis + [AXIS])))


def put_replicated(tree, mesh: Mesh):
    """A pytree of host values (the same on every process) as arrays replicated over the whole mesh."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    host = jax.device_get(tree)
    return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda i: np.asarray(a)[i]), host)


def local_rows(mesh: Mesh, n: int, axis: int = 0) -> slice:
    """The rows (along `axis`, of a global extent n) that this process's devices hold under `batch_sharded`."""
    shape = [1] * (axis + 1)
    shape[axis] = n
    indices = batch_sharded(mesh, axis).addressable_devices_indices_map(tuple(shape)).values()
    starts = [i[axis].start or 0 for i in indices]
    stops = [n if i[axis].stop is None else i[axis].stop for i in indices]
    return slice(min(starts), max(stops))


def put_batch(global_array: np.ndarray, mesh: Mesh, axis: int = 0) -> jax.Array:
    """A host array that every process knows in full, sharded over 'data' along `axis`; each process
    transfers only the block its own devices hold."""
    global_array = np.asarray(global_array)
    if jax.process_count() == 1:
        return jax.device_put(global_array, batch_sharded(mesh, axis))
    rows = local_rows(mesh, global_array.shape[axis], axis)
    local = global_array[(slice(None),) * axis + (rows,)]
    return jax.make_array_from_process_local_data(batch_sharded(mesh, axis), local, global_array.shape)


def put_process_batch(local: np.ndarray, mesh: Mesh, global_rows: int) -> jax.Array:
    """This process's block of a global batch (its `local_rows`: the streamed pipeline reads only those) as the
    global array sharded over 'data', built with `jax.make_array_from_process_local_data`."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return jax.device_put(local, batch_sharded(mesh))
    return jax.make_array_from_process_local_data(batch_sharded(mesh), local, (global_rows, *local.shape[1:]))


def to_host(tree):
    """A pytree of global arrays as NumPy arrays on every process (gathered across processes when needed)."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(one, tree)


def is_primary() -> bool:
    """Whether this process writes the files a person reads (process 0)."""
    return jax.process_index() == 0


def example_keys(key: jax.Array, positions: jax.Array) -> jax.Array:
    """One key per example, keyed by its global position: results do not depend on the device count."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, positions)


def global_positions(local_batch: int) -> jax.Array:
    """Inside shard_map: the positions of this device's examples in the global batch."""
    return jax.lax.axis_index(AXIS) * local_batch + jax.numpy.arange(local_batch)
