"""One writer per workdir: `WorkdirLock(workdir)` holds WORKDIR/run.lock while a run writes there.

    with run_lock.WorkdirLock(workdir):
        train(...)

The lock file is JSON {format, host, pid, started, command, boot_id, pid_namespace, process_start, token},
created complete and atomically (written to a temporary file, then hard-linked to run.lock, which fails if
run.lock exists; where hard links are unsupported, O_CREAT|O_EXCL). A second acquirer is refused at once with
WorkdirLockedError. A lock whose holder is provably gone is taken over, with a line on stderr: same host name,
and either this host has rebooted since (another boot id), or the same boot and PID namespace and the PID is
dead or now belongs to a process started at another time (PID reuse). A lock from another host, or from
another PID namespace of this host (another container), is never taken over automatically: the message says
how to remove it (or pass force=True). Taking over and releasing remove run.lock only while holding an
exclusive flock on WORKDIR/.run.lock.guard (a file that is never deleted), so two processes taking over the
same stale lock cannot both win, and a release never removes a lock that is no longer ours.
"""

import contextlib
import datetime
import errno
import json
import os
import pathlib
import socket
import sys
import uuid
from typing import Any, Dict, Optional, Sequence

from mmard_jax.errors import WorkdirLockedError

LOCK_FILE = "run.lock"
GUARD_FILE = ".run.lock.guard"
FORMAT = "mmard_jax.run_lock/1"
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS)


# ---------------------------------------------------------------- this process and others


def _read(path: str) -> Optional[str]:
    """A small /proc file's text, or None where it does not exist (not Linux) or cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def process_start_ticks(pid: int) -> Optional[int]:
    """The start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22); None if unknown."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name (field 2) may hold spaces and parentheses
    try:
        return int(fields[19])  # field 22 overall: the 20th after the name
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> Optional[str]:
    """This process's PID namespace ('pid:[4026531836]'): PIDs are comparable only within one namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pid_alive(pid: int, start_ticks: Optional[int] = None) -> bool:
    """Whether `pid` runs on this host and, when `start_ticks` is given, is the process that started then."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    if start_ticks is not None:
        now = process_start_ticks(pid)
        if now is not None and now != start_ticks:
            return False  # the PID was reused by a later process
    return True


def _identity(command: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The lock file's content for this process."""
    pid = os.getpid()
    return {
        "format": FORMAT,
        "host": socket.gethostname(),
        "pid": pid,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": list(sys.argv if command is None else command),
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": _pid_namespace(),
        "process_start": process_start_ticks(pid),
        "token": uuid.uuid4().hex,
    }


def read_holder(workdir) -> Optional[Dict[str, Any]]:
    """The content of WORKDIR/run.lock (None: no lock; {'unreadable': reason} for a file that is not a lock)."""
    path = pathlib.Path(workdir) / LOCK_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        return {"unreadable": f"{type(err).__name__}: {err}"}
    try:
        holder = json.loads(text)
    except json.JSONDecodeError as err:
        return {"unreadable": f"not JSON ({err})"}
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or not holder.get("host"):
        return {"unreadable": "no host and pid"}
    return holder


def stale_reason(holder: Dict[str, Any], me: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why a lock's holder is provably gone ('is no longer running', 'ran before H rebooted'); None if it may run."""
    me = me or _identity(None)
    if "unreadable" in holder or holder.get("host") != me["host"]:
        return None  # another host: its processes cannot be checked from here
    if holder.get("boot_id") and me.get("boot_id") and holder["boot_id"] != me["boot_id"]:
        return f"ran before {me['host']} rebooted"  # no process survives a reboot
    if holder.get("boot_id") != me.get("boot_id") or holder.get("pid_namespace") != me.get("pid_namespace"):
        return None  # another PID namespace (a container): its PIDs mean nothing here
    return None if pid_alive(int(holder["pid"]), holder.get("process_start")) else "is no longer running"


def is_stale(holder: Dict[str, Any], me: Optional[Dict[str, Any]] = None) -> bool:
    """Whether a lock's holder is provably gone (see `stale_reason`)."""
    return stale_reason(holder, me) is not None


def _describe(holder: Dict[str, Any]) -> str:
    """'PID 123 on host h since 2026-01-01T10:00:00+00:00 (python -m mmard_jax.train ...)'."""
    command = " ".join(holder.get("command") or []) or "unknown command"
    return f"PID {holder['pid']} on host {holder['host']} since {holder.get('started', 'an unknown time')} ({command})"


def _refusal(path: pathlib.Path, holder: Dict[str, Any], me: Dict[str, Any]) -> WorkdirLockedError:
    """The error for a lock held by someone else, saying what to do."""
    workdir = path.parent
    if "unreadable" in holder:
        return WorkdirLockedError(
            f"{path}: not a valid lock file ({holder['unreadable']}); if no run is using {workdir}, delete {path}"
        )
    head = f"{workdir} is in use by another run: {_describe(holder)}"
    if holder.get("host") != me["host"]:
        return WorkdirLockedError(
            f"{head}; this process cannot check a run on another host: wait for it to finish or stop it there, "
            f"use another --workdir, or, if that run is gone, delete {path}"
        )
    if holder.get("pid_namespace") != me.get("pid_namespace") or holder.get("boot_id") != me.get("boot_id"):
        return WorkdirLockedError(
            f"{head}; it was started in another PID namespace (another container?), so it cannot be checked "
            f"from here: if that run is gone, delete {path}; or use another --workdir"
        )
    if holder["pid"] == me["pid"] and holder.get("process_start") == me.get("process_start"):
        return WorkdirLockedError(f"{path} is already held by this process (another WorkdirLock on {workdir})")
    return WorkdirLockedError(
        f"{head}; wait for it to finish or stop it (kill {holder['pid']}), or use another --workdir")


# ---------------------------------------------------------------- the lock


def _create_exclusive(path: pathlib.Path, text: str) -> bool:
    """Creates `path` holding `text`, complete, only if it does not exist; False if it exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in _NO_LINKS:
                raise
        try:  # a filesystem without hard links: exclusive create, then write (readers may see it half-written)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _guard(workdir: pathlib.Path):
    """An exclusive flock on WORKDIR/.run.lock.guard (released by the kernel if we die); yields False if unsupported."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:
        yield False
        return
    fd = os.open(workdir / GUARD_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                yield False
                return
            raise
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class WorkdirLock:
    """Exclusive ownership of a workdir for one run (context manager, or acquire()/release())."""

    def __init__(self, workdir, command: Optional[Sequence[str]] = None, force: bool = False):
        self.workdir = pathlib.Path(workdir).absolute()
        self.path = self.workdir / LOCK_FILE
        self.command = command
        self.force = force  # take over any lock (a --force_unlock flag: the user says its holder is gone)
        self.content: Optional[Dict[str, Any]] = None  # what we wrote, while we hold the lock

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self.content is not None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock (creating the workdir), or a stale one; WorkdirLockedError if another run holds it."""
        if self.held:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        me = _identity(self.command)
        text = json.dumps(me, indent=2) + "\n"
        if _create_exclusive(self.path, text):
            self.content = me
            return self
        with _guard(self.workdir) as guarded:
            # Nobody else removes run.lock while we hold the guard: what we read stays until we remove it.
            holder = read_holder(self.workdir)
            if holder is None:  # released meanwhile
                if _create_exclusive(self.path, text):
                    self.content = me
                    return self
                holder = read_holder(self.workdir) or {"unreadable": "vanished while being read"}
            reason = stale_reason(holder, me)
            if self.force:
                reason = reason or "was declared gone by the user (force)"
            elif reason is None:
                raise _refusal(self.path, holder, me)
            elif not guarded:
                raise WorkdirLockedError(
                    f"{self.path} is a stale lock ({_describe(holder)} {reason}), but this filesystem has no flock to "
                    f"take it over safely: if no run is using {self.workdir}, delete {self.path}"
                )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            who = _describe(holder) if "unreadable" not in holder else f"an unreadable lock ({holder['unreadable']})"
            kind = "lock" if self.force else "stale lock"
            print(f"{self.path}: taking over the {kind} of {who}, which {reason}", file=sys.stderr, flush=True)
            if not _create_exclusive(self.path, text):  # a fresh acquirer (not stale) got in first
                raise _refusal(self.path, read_holder(self.workdir) or {"unreadable": "vanished"}, me)
        self.content = me
        return self

    def release(self) -> None:
        """Removes run.lock if it is still ours (idempotent; never removes a lock someone else now holds)."""
        if not self.held:
            return
        mine, self.content = self.content, None
        with _guard(self.workdir):
            holder = read_holder(self.workdir)
            if holder and holder.get("token") == mine["token"]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
