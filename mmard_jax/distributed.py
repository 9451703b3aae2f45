"""Multi-process (multi-host) runs on JAX's own distributed runtime, `jax.distributed` (its coordination
service; NCCL between GPUs, gloo between CPU processes).

    python -m mmard_jax.train ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

With none of the three flags a program is single-process, unless it runs under SLURM or Open MPI, where
`jax.distributed.initialize()` detects the cluster itself. `initialize` must run before any other JAX call
that touches a backend. Process 0 writes the files a person reads and holds the workdir's lock.
"""

import contextlib
import os
import pathlib
from typing import Optional

import jax
import numpy as np
from absl import flags

from mmard_jax import cli, run_lock

DEFAULT_INIT_TIMEOUT_S = 120  # how long a process waits for all others at start (JAX's default is 300 s)
DEFAULT_HEARTBEAT_TIMEOUT_S = 60  # a process that stops answering is declared dead after this long
SCHEDULER_ENV = {"SLURM": ("SLURM_JOB_ID", "SLURM_NTASKS"), "Open MPI": ("OMPI_COMM_WORLD_SIZE",)}


def define_flags() -> None:
    """The multi-process flags, shared by the training and evaluation programs."""
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordination service (multi-process).")
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
    flags.DEFINE_integer("init_timeout", DEFAULT_INIT_TIMEOUT_S, "Seconds to wait for every process at start.")
    flags.DEFINE_integer("heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT_S,
                         "Seconds after which a silent process is declared dead and the others stop.")


def scheduler() -> Optional[str]:
    """'SLURM' or 'Open MPI' when this process was started by one with more than one task, else None."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, init_timeout: int = DEFAULT_INIT_TIMEOUT_S,
               heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> bool:
    """Joins a multi-process run (explicit arguments, or SLURM/Open MPI detection); False if single-process."""
    explicit = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(explicit) and not all(explicit):
        raise cli.UserError("--coordinator_address, --num_processes and --process_id go together: give all three")
    if not any(explicit) and scheduler() is None:
        return False
    if all(explicit) and not 0 <= process_id < num_processes:
        raise cli.UserError(f"--process_id={process_id} must be in 0 .. {num_processes - 1}")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_gpu_plugin():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=init_timeout, heartbeat_timeout_seconds=heartbeat_timeout)
    except Exception as err:  # the coordination service raises XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE)
        where = coordinator_address or f"the {scheduler()} job's coordinator"
        raise cli.UserError(f"could not join the multi-process run at {where} within {init_timeout} s "
                            f"({str(err).splitlines()[0][:200]})") from err
    return True


def _has_gpu_plugin() -> bool:
    import importlib.util  # noqa: PLC0415

    return any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin"))


def initialize_from_flags() -> bool:
    """`initialize` with the command line's flags (call first in `main`)."""
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id, init_timeout=f.init_timeout,
                      heartbeat_timeout=f.heartbeat_timeout)


def broadcast_from_primary(value: int) -> int:
    """Process 0's integer, on every process (the identity in a single-process run)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
    """One writer per workdir: process 0 takes the lock; every process learns whether it could."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = run_lock.WorkdirLock(workdir).acquire()
        except run_lock.WorkdirLockedError as err:
            error = err
    if not broadcast_from_primary(int(error is None)):
        raise error or cli.UserError(f"process 0 could not lock {workdir} (see its output)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


class StopAgreement:
    """All processes stop at the same step. Each step every process contributes its local stop flag to an
    all-reduce that is read one step later, so agreeing costs no host sync of the running step; with one
    process the local flag is the answer at once."""

    def __init__(self, mesh):
        self.mesh = mesh
        self._pending = None
        if jax.process_count() > 1:
            from jax.sharding import PartitionSpec as P  # noqa: PLC0415

            from mmard_jax import parallel  # noqa: PLC0415

            self._parallel = parallel
            self._reduce = jax.jit(jax.shard_map(lambda f: jax.lax.psum(f, parallel.AXIS), mesh=mesh,
                                                 in_specs=P(parallel.AXIS), out_specs=P()))

    def _dispatch(self, flag: bool):
        n = self.mesh.devices.size
        return self._reduce(self._parallel.put_batch(np.full((n,), int(flag), np.int32), self.mesh))

    def lagged(self, flag: bool) -> bool:
        """The OR over processes of the flags given at the previous call (this call's flag is read at the next)."""
        if jax.process_count() == 1:
            return flag
        previous, self._pending = self._pending, self._dispatch(flag)
        return previous is not None and int(np.asarray(previous.addressable_data(0))) > 0

    def now(self, flag: bool) -> bool:
        """The OR over processes of this flag and any pending one, waiting for it (between epochs)."""
        if jax.process_count() == 1:
            return flag
        pending, self._pending = self._pending, None
        stop = int(np.asarray(self._dispatch(flag).addressable_data(0))) > 0
        return stop or (pending is not None and int(np.asarray(pending.addressable_data(0))) > 0)
