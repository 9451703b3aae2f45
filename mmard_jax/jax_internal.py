"""The three pieces of JAX's private API (`jax._src`) this project uses, in one place, checked against jax 0.10.2.

JAX offers no public way to read the coordination service's client (its key-value store: the roll call after a
lost process), the coordinator address a process joined, or the address JAX's own SLURM / Open MPI detection
derives. Each accessor raises a RuntimeError naming what moved if a JAX upgrade changes that API (a bug of this
project against the newer JAX, not a user error), instead of an AttributeError deep inside a failure path;
update this module (and CHECKED_JAX_VERSION) when that happens.
"""

import os
from typing import Any, Optional

import jax

CHECKED_JAX_VERSION = "0.10.2"  # the jax version these accessors were read against (jax/_src/distributed.py,
# jax/_src/clusters/ompi_cluster.py and slurm_cluster.py)


def _moved(what: str, err: BaseException) -> RuntimeError:
    """The error naming the private API that is gone, the JAX version installed and the one checked."""
    return RuntimeError(f"jax {jax.__version__}: {what} is not where mmard_jax/jax_internal.py expects it "
                            f"(checked against jax {CHECKED_JAX_VERSION}): {type(err).__name__}: {err}")


def _global_state() -> Any:
    """jax._src.distributed.global_state: the process's jax.distributed state."""
    try:
        from jax._src import distributed as jax_distributed  # noqa: PLC0415

        return jax_distributed.global_state
    except (ImportError, AttributeError) as err:
        raise _moved("jax._src.distributed.global_state", err) from err


def coordination_client() -> Any:
    """The coordination service's client of this process (key_value_set, key_value_dir_get), None before joining."""
    try:
        return _global_state().client
    except AttributeError as err:
        raise _moved("jax._src.distributed.global_state.client", err) from err


def coordinator_address() -> Optional[str]:
    """The HOST:PORT this process joined (None before jax.distributed.initialize)."""
    try:
        return _global_state().coordinator_address
    except AttributeError as err:
        raise _moved("jax._src.distributed.global_state.coordinator_address", err) from err


def cluster_coordinator_address(kind: str) -> str:
    """The coordinator address JAX's own cluster class for `kind` ('Open MPI' or 'SLURM') derives from the
    environment (JAX_COORDINATOR_PORT overrides the port, as in jax.distributed.initialize)."""
    try:
        from jax._src import clusters  # noqa: PLC0415

        env = {"Open MPI": clusters.OmpiCluster, "SLURM": clusters.SlurmCluster}[kind]
        get = env.get_coordinator_address
    except (ImportError, AttributeError) as err:
        raise _moved("jax._src.clusters.OmpiCluster/SlurmCluster.get_coordinator_address", err) from err
    return get(timeout_secs=None, override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"))
