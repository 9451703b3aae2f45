"""How the processes of a multi-process run stop together: a lost process ends the others at once with one line
naming it (a failed collective, a roll call in the coordination service, or a heartbeat verdict; exit 75), and a
stop signal ends every process at the same step (StopAgreement). Start-up is `mmard_jax.distributed`'s.
"""

import contextlib
import os
import re
import socket
import sys
import time
from typing import Callable, Dict, List, Optional

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from mmard_jax import cli, distributed, jax_internal, parallel
from mmard_jax.errors import UserError

ROLL_CALL_S = 10  # after a failed collective, how long survivors wait for each other to report (at most)
LOST_PROCESS_STATUS = 75  # exit status after losing a process (sysexits' EX_TEMPFAIL: rerunning resumes)
_ROLL_CALL_KEY = "mmard_jax/roll_call/"

_UNHEALTHY = re.compile(r"unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+)")
# Text of the errors a collective raises when a peer is gone (gloo, NCCL, the coordination service).
_COLLECTIVE_FAILURE = re.compile(r"Gloo|gloo|NCCL|Connection (closed|reset) by peer|coordination service|"
                                 r"CoordinationService|UNAVAILABLE:|DEADLINE_EXCEEDED:|Barrier")


# ----------------------------------------------------------------------------- losing a process


_BEFORE_HARD_EXIT: List[Callable[[], None]] = []  # e.g. releasing the workdir lock, so that a rerun can take it


@contextlib.contextmanager
def on_hard_exit(cleanup: Optional[Callable[[], None]]):
    """Inside the block, `cleanup` (if any) also runs before a lost process's hard exit (os._exit skips finally
    blocks): e.g. the workdir lock's release, so that a rerun can take it."""
    if cleanup is None:
        yield
        return
    _BEFORE_HARD_EXIT.append(cleanup)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            _BEFORE_HARD_EXIT.remove(cleanup)


def is_collective_failure(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) is a collective or coordination-service failure."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if _COLLECTIVE_FAILURE.search(f"{type(err).__name__}: {err}"):
            return True
        err = err.__cause__ or err.__context__
    return False


def heartbeat_lost(err: BaseException) -> List[int]:
    """The processes a coordination-service error names as dead ("... unhealthy (stopped sending heartbeats): 1")."""
    found, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for ids in _UNHEALTHY.findall(str(err)):
            found += [int(i) for i in re.findall(r"\d+", ids)]
        err = err.__cause__ or err.__context__
    return sorted(set(found))


def _coordinator_listening() -> bool:
    """Whether process 0's coordination service still accepts connections (False: refused or unreachable)."""
    try:
        host, port = distributed.split_address(jax_internal.coordinator_address())
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except (OSError, UserError, TypeError):
        return False


def missing_processes(reported: Dict[str, str], n: int) -> List[int]:
    """The processes 0 .. n-1 without a roll-call key among `reported` (key -> value of the key-value store)."""
    present = set()
    for key in reported:
        tail = str(key).rstrip("/").rsplit("/", 1)[-1]
        if tail.isdigit():
            present.add(int(tail))
    return [i for i in range(n) if i not in present]


def roll_call(timeout_s: float) -> List[int]:
    """After a failed collective: every surviving process reports in the coordination service's key-value store
    and waits up to `timeout_s` for the others; returns those that did not report (the lost ones)."""
    client, me, n = jax_internal.coordination_client(), jax.process_index(), jax.process_count()
    client.key_value_set(f"{_ROLL_CALL_KEY}{me}", "alive")
    deadline = time.monotonic() + timeout_s
    while True:
        missing = missing_processes(dict(client.key_value_dir_get(_ROLL_CALL_KEY)), n)
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.1)


def _end_progress_line() -> None:
    """A newline on stderr if a progress bar is showing, so that the next line starts a line of its own."""
    try:
        from tqdm import tqdm  # noqa: PLC0415

        active = bool(getattr(tqdm, "_instances", ()))
    except ImportError:
        active = False
    if active:
        sys.stderr.write("\n")


def roll_call_seconds(heartbeat_timeout: int) -> float:
    """The roll call's wait: ROLL_CALL_S, but at most a quarter of the heartbeat timeout: a heartbeat timeout after
    the loss the coordination service aborts every process, and the line naming the lost one must come first."""
    return float(max(1, min(ROLL_CALL_S, heartbeat_timeout / 4)))


@contextlib.contextmanager
def exit_on_lost_process(heartbeat_timeout: int = distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
                         then: str = "Rerun the same commands to resume from the last checkpoint."):
    """In a multi-process run, a failed collective ends this process at once with one line naming the lost
    process(es) and status 75: without it the error would unwind to JAX's exit barrier, which waits a heartbeat
    timeout for the dead process and then aborts. Errors of a single-process run pass through unchanged."""
    try:
        yield
    except Exception as err:
        if not (distributed.is_multiprocess() and is_collective_failure(err)):
            raise
        wait = roll_call_seconds(heartbeat_timeout)
        me, n = jax.process_index(), jax.process_count()
        cause = cli.one_line(str(err))[:300]
        _end_progress_line()
        if heartbeat_lost(err):  # the coordination service has declared them dead: JAX aborts us any moment
            _hard_exit(me, n, heartbeat_lost(err), "no heartbeat", cause, then)
        gone = "" if me == 0 else "; if process 0 is gone, its coordination service is too, and JAX ends this process"
        distributed.say(f"process {me} of {n}: a collective failed; asking the others to report "
                        f"(up to {wait:.0f} s{gone})")
        try:
            if me != 0 and not _coordinator_listening():
                lost, how = [0], "its coordination service does not answer"
            else:
                lost, how = roll_call(wait), f"no answer within {wait:.0f} s"
        except Exception as rc_err:  # noqa: BLE001 - the coordination service went away with process 0
            lost, how = [0], f"the coordination service stopped answering: {cli.one_line(str(rc_err))[:200]}"
        if not lost:
            raise  # every process answered: not a lost process, an error of its own
        _hard_exit(me, n, lost, how, cause, then)


def _hard_exit(me: int, n: int, lost: List[int], how: str, cause: str, then: str) -> None:
    """The one line naming the lost processes, then os._exit(75) (no exit barrier: it would wait for the dead)."""
    sys.stdout.flush()
    sys.stderr.write(f"{cli._program_name()}: error: process {me} of {n} lost process(es) {lost} ({how}) after a "
                     f"collective failed ({cause}); stopping. {then}\n")
    sys.stderr.flush()
    for cleanup in list(_BEFORE_HARD_EXIT):
        with contextlib.suppress(Exception):
            cleanup()
    os._exit(LOST_PROCESS_STATUS)


# ----------------------------------------------------------------------------- stopping together


# Not jax.experimental.multihost_utils.reached_preemption_sync_point: it learns of SIGTERM only (we stop on SIGINT
# too), answers False in a single-process run, and needs every process to call it from the same start step.
class StopAgreement:
    """All processes stop at the same step. Each step every process contributes its local stop flag to an
    all-reduce that is read one step later, so agreeing costs no host sync of the running step; with one
    process the local flag is the answer at once."""

    def __init__(self, mesh):
        self.mesh = mesh
        self._pending = None
        if jax.process_count() > 1:
            self._parallel = parallel
            self._reduce = jax.jit(jax.shard_map(lambda f: jax.lax.psum(f, parallel.AXIS)[0], mesh=mesh,
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
