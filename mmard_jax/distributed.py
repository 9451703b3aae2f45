"""Multi-process (multi-host) runs on JAX's own distributed runtime, `jax.distributed` (its coordination
service; NCCL between GPUs, gloo between CPU processes).

    python -m mmard_jax.train ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

With none of the three flags a program is single-process, unless it runs under SLURM (inside `srun`) or
Open MPI (<= 4, `mpirun`), where `jax.distributed.initialize()` detects the cluster itself; the checks
below are JAX 0.10's own (jax/_src/clusters/ompi_cluster.py and slurm_cluster.py, `is_env_present`).
`initialize` must run before any other JAX call that touches a backend. This module starts a run (flags, joining,
the reachability check) and lets its processes agree (broadcasts, process 0's file work, one workdir lock);
`mmard_jax.stopping` ends them together (a lost process, a signal).

Timeouts (jax.distributed has exactly these; measured in /work/notes/multihost_findings.md):
  --init_timeout       every process waits this long for all others at start. A coordinator that does not
                       answer is found by our own TCP check first (a one-line error naming HOST:PORT, exit
                       2); past that check JAX aborts the process (SIGABRT, exit 134) after the remaining
                       time + about 5 s, which Python cannot catch, so each process prints beforehand which
                       address it joins as which process.
  --heartbeat_timeout  a process that stops sending heartbeats (a hung process, a dead host whose TCP
                       connections never close) is declared dead after this long and the coordination
                       service aborts every process (exit 134) with a message naming it ("The following tasks
                       are unhealthy (stopped sending heartbeats): 1"). A process killed outright is seen
                       sooner: the next collective fails at once (its connections close) and
                       `stopping.exit_on_lost_process` names it after a roll call of at most min(10 s, heartbeat/4),
                       exit 75. If process 0 itself dies, the coordination service goes with it and JAX aborts
                       the others at once ("... the leader task was preempted/died/restarted ...", exit 134).
  shutdown             JAX's default, 300 s: at exit every process waits for all others at a barrier.
The per-collective gloo timeout (XLA_FLAGS --xla_cpu_collective_timeout_seconds, default 1800 s) is left as
it is: it also fires on healthy skew (process 0 writing reports while the others wait), and the heartbeat
already bounds a hang.
"""

import contextlib
import dataclasses
import errno
import json
import os
import socket
import sys
import time
from typing import Any, Callable, List, Optional

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from mmard_jax import cli, jax_internal, run_lock
from mmard_jax.errors import DistributedStartError, UserError

DEFAULT_INIT_TIMEOUT_S = 120  # how long a process waits for all others at start (JAX's default is 300 s)
DEFAULT_HEARTBEAT_TIMEOUT_S = 60  # a silent process is declared dead after this long (JAX's default is 100 s)
SHARED_CHECK_S = 30  # how long a process looks for process 0's lock file (network filesystems cache lookups)
_MIN_JAX_INIT_S = 5  # what JAX gets at least after our own reachability check used part of --init_timeout


def define_flags() -> None:
    """The multi-process flags, shared by the training and evaluation programs."""
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordination service (multi-process).")
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
    flags.DEFINE_integer("init_timeout", DEFAULT_INIT_TIMEOUT_S, "Seconds to wait for every process at start.")
    flags.DEFINE_integer("heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT_S,
                         "Seconds after which a silent process is declared dead and the others stop.")


# ----------------------------------------------------------------------------- joining


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A scheduler-started job as jax.distributed will see it (address None where it cannot be worked out here)."""

    name: str
    address: Optional[str]
    num_processes: int
    process_id: int


def _jax_cluster_address(kind: str) -> Optional[str]:
    """The coordinator address JAX's own cluster class derives (None if it cannot: JAX then reports it)."""
    try:
        return jax_internal.cluster_coordinator_address(kind)
    except Exception:  # noqa: BLE001 - only used for messages and the reachability check
        return None


def detect_cluster(environ=None) -> Optional[Cluster]:
    """The SLURM or Open MPI job this process belongs to (more than one task), None otherwise.

    Same tests and order as JAX 0.10's detection: Open MPI first (`OMPI_MCA_orte_hnp_uri`, set by ORTE, i.e.
    Open MPI <= 4), then SLURM (all of SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID,
    SLURM_LOCALID, i.e. inside an `srun` step). An Open MPI 5 job is refused with the flags to pass instead.
    """
    env = os.environ if environ is None else environ
    size = int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1)
    if "OMPI_MCA_orte_hnp_uri" in env and size > 1:
        address = env.get("JAX_COORDINATOR_ADDRESS") or (_jax_cluster_address("Open MPI") if environ is None else None)
        return Cluster("Open MPI", address, size, int(env.get("OMPI_COMM_WORLD_RANK", "0")))
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm) and int(env["SLURM_NTASKS"]) > 1:
        address = env.get("JAX_COORDINATOR_ADDRESS") or (_jax_cluster_address("SLURM") if environ is None else None)
        return Cluster("SLURM", address, int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]))
    if size > 1:
        raise DistributedStartError(
            f"this is an Open MPI job of {size} processes without OMPI_MCA_orte_hnp_uri (Open MPI >= 5), which "
            f"jax.distributed {jax.__version__} cannot detect: pass --coordinator_address=HOST:PORT (rank 0's host) "
            f"--num_processes=$OMPI_COMM_WORLD_SIZE --process_id=$OMPI_COMM_WORLD_RANK")
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" not in env:
        say(f"SLURM_NTASKS={env['SLURM_NTASKS']} but this is not an srun step: running as a single process "
             f"(start the program with srun for a multi-process run)")
    return None


def split_address(address: str, what: str = "--coordinator_address") -> tuple:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port); a DistributedStartError naming the flag otherwise."""
    host, sep, port = str(address).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedStartError(f"{what}={address!r}: expected HOST:PORT, e.g. node001:12345")
    return host, int(port)


def say(text: str) -> None:
    """A diagnostic line on stderr (any process): what this process is doing, so that even an abort is attributable."""
    print(f"mmard_jax: {text}", file=sys.stderr, flush=True)


def check_port_free(address: str) -> None:
    """Process 0 hosts the coordination service on PORT (all interfaces): a clear error if it is taken."""
    _, port = split_address(address)
    for family, where in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((where, port))
            return
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise DistributedStartError(f"--coordinator_address={address}: port {port} is in use on this machine, "
                                            f"where process 0 starts the coordination service; choose another port"
                                            ) from None
    # neither family could bind for another reason (no IPv6, no permission): let JAX report it


def wait_reachable(address: str, deadline: float) -> None:
    """Until `deadline` (time.monotonic), tries TCP connections to the coordinator; an error naming it if none
    succeeds (JAX's own wait would end in an abort that Python cannot catch)."""
    host, port = split_address(address)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise DistributedStartError(
            f"--coordinator_address={address}: cannot resolve host {host!r} ({err.strerror})") from None
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DistributedStartError(f"the coordinator at {address} did not answer ({last}) within the "
                                        "--init_timeout: is process 0 running there, and is the port open between "
                                        "the machines?")
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(left, 0.1))):
                return
        except OSError as err:
            last = err.strerror or type(err).__name__
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, init_timeout: int = DEFAULT_INIT_TIMEOUT_S,
               heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> bool:
    """Joins a multi-process run (explicit arguments, or SLURM/Open MPI detection); False if single-process."""
    explicit = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(explicit) and not all(explicit):
        raise DistributedStartError(
            "--coordinator_address, --num_processes and --process_id go together: give all three")
    for name, value in (("init_timeout", init_timeout), ("heartbeat_timeout", heartbeat_timeout)):
        cli.positive_int(name, value)
    if all(explicit):
        cli.positive_int("num_processes", num_processes)
        if not 0 <= process_id < num_processes:
            raise DistributedStartError(f"--process_id={process_id} must be in 0 .. {num_processes - 1}")
        split_address(coordinator_address)
        if num_processes == 1:
            return False
        address, n, me, source = coordinator_address, num_processes, process_id, "the command line"
    else:
        cluster = detect_cluster()
        if cluster is None:
            return False
        address, n, me, source = cluster.address, cluster.num_processes, cluster.process_id, f"{cluster.name} job"
    deadline = time.monotonic() + init_timeout
    shown = address or f"the {source}'s coordinator"
    say(f"process {me} of {n} joins the run at {shown} ({source}); waiting up to {init_timeout} s for all {n} "
         f"processes (a timeout aborts with status 134)")
    if address is not None:
        if me == 0:
            check_port_free(address)
        else:
            wait_reachable(address, deadline)
    # Cross-process collectives on CPU: gloo (already JAX 0.10's default; set for other versions, harmless on GPUs).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    left = max(_MIN_JAX_INIT_S, int(deadline - time.monotonic()))
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=left,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except (ValueError, TypeError, RuntimeError) as err:  # bad arguments, or JAX started already; a timeout aborts
        raise DistributedStartError(
            f"could not join the multi-process run at {shown}: {cli.one_line(str(err))[:300]}") from err
    return True


def initialize_from_flags() -> bool:
    """`initialize` with the command line's flags (call first in `main`)."""
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id, init_timeout=f.init_timeout,
                      heartbeat_timeout=f.heartbeat_timeout)


def is_multiprocess() -> bool:
    """Whether this process joined a multi-process run (never starts a JAX backend itself)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


# ----------------------------------------------------------------------------- agreeing


def broadcast_from_primary(value: int) -> int:
    """Process 0's integer, on every process (the identity in a single-process run)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-able value, on every process (others pass anything); the value itself with one process."""
    if jax.process_count() == 1:
        return value
    data = json.dumps(value).encode() if jax.process_index() == 0 else b""
    size = broadcast_from_primary(len(data))
    buf = np.zeros(size, np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())


def on_primary(fn: Callable[[], Any]) -> Any:
    """`fn()` run by process 0 only (file reads and writes of one shared workdir); its JSON-able result on every
    process. If it raises, process 0 raises that error and every other process a UserError with its message, so
    that all stop at the same point."""
    if jax.process_count() == 1:
        return fn()
    outcome, error = None, None
    if jax.process_index() == 0:
        try:
            outcome = {"value": fn()}
        except Exception as err:  # noqa: BLE001 - re-raised below, on process 0 as itself
            error, outcome = err, {"error": f"{type(err).__name__}: {cli.one_line(str(err))}"}
    outcome = broadcast_json(outcome)
    if error is not None:
        raise error
    if "error" in outcome:
        raise UserError(f"process 0 stopped: {outcome['error']}")
    return outcome["value"]


def failed_processes(ok: bool) -> List[int]:
    """The processes that passed False (every process calls it; [] with one process and a True flag)."""
    if jax.process_count() == 1:
        return [] if ok else [0]
    flags_ = np.asarray(multihost_utils.process_allgather(np.asarray(int(bool(ok)), np.int32))).reshape(-1)
    return [i for i, f in enumerate(flags_) if not f]


@contextlib.contextmanager
def workdir_lock(workdir):
    """One writer per workdir: process 0 takes the lock; every process learns whether it could, then checks that
    it sees process 0's lock file (the workdir must be on a filesystem every process shares). Yields the lock on
    process 0, None elsewhere (`stopping.on_hard_exit(lock.release)` frees it on a lost process too)."""
    lock = None

    def take():
        nonlocal lock
        lock = run_lock.WorkdirLock(workdir).acquire()
        return lock.content["token"]

    token = on_primary(take)
    try:
        if jax.process_count() > 1:
            check_shared(workdir, token)
        yield lock
    finally:
        if lock is not None:
            lock.release()


def check_shared(workdir, token: str, wait_s: Optional[float] = None) -> None:
    """Every process must see process 0's lock file in `workdir` (a UserError naming those that do not)."""
    wait_s = SHARED_CHECK_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    seen = False
    while not seen:
        holder = run_lock.read_holder(workdir) or {}
        seen = holder.get("token") == token
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    missing = failed_processes(seen)
    if missing:
        raise UserError(
            f"{workdir} is not shared: process(es) {missing} cannot see the lock file process 0 wrote there within "
            f"{wait_s:.0f} s; put the workdir on a filesystem that every process mounts at the same path")
