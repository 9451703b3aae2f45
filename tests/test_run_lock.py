"""WorkdirLock: one writer per workdir across processes; a stale lock is taken over once; foreign locks are kept."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mmard_jax import run_lock
from mmard_jax.run_lock import WorkdirLock, WorkdirLockedError

REPO = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _dead_pid() -> int:
    """The PID of a process that has exited (and was reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_lock(workdir: pathlib.Path, **fields) -> dict:
    """A lock file as this machine's process would write it, with `fields` replaced."""
    holder = run_lock._identity(["python", "-m", "mmard_jax.train", "--workdir", str(workdir)])
    holder.update(fields)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / run_lock.LOCK_FILE).write_text(json.dumps(holder))
    return holder


def test_acquire_writes_holder_and_release_is_idempotent(tmp_path):
    workdir = tmp_path / "run"
    lock = WorkdirLock(workdir, command=["prog", "--flag"])
    with lock:
        holder = json.loads((workdir / "run.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"] == ["prog", "--flag"] and holder["started"]
        assert holder["process_start"] == run_lock.process_start_ticks(os.getpid())
        assert lock.held
    assert not (workdir / "run.lock").exists() and not lock.held
    lock.release()  # again: nothing to do
    lock.release()
    with WorkdirLock(workdir):  # the workdir is free again
        pass


def test_second_acquirer_in_another_process_is_refused_with_the_holders_info(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from mmard_jax.run_lock import WorkdirLock, WorkdirLockedError
        try:
            WorkdirLock({str(tmp_path)!r}).acquire()
        except WorkdirLockedError as e:
            print(e)
            sys.exit(3)
    """)
    with WorkdirLock(tmp_path) as lock:
        proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 3, proc.stderr
        message = proc.stdout.strip()
        assert f"PID {os.getpid()} on host {socket.gethostname()} since {lock.content['started']}" in message
        assert "wait for it to finish or stop it" in message and "another --workdir" in message
        assert json.loads((tmp_path / "run.lock").read_text())["token"] == lock.content["token"]  # untouched


def test_second_lock_object_in_the_same_process_is_refused(tmp_path):
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirLockedError, match="already held by this process"):
            WorkdirLock(tmp_path).acquire()


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead, process_start=None)
    with WorkdirLock(tmp_path) as lock:
        assert json.loads((tmp_path / "run.lock").read_text())["token"] == lock.content["token"]
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and f"PID {dead}" in err and str(tmp_path / "run.lock") in err


def test_reused_pid_is_stale(tmp_path, capsys):
    """A live PID that started at another time than the holder is another process: the lock is stale."""
    _write_lock(tmp_path, pid=os.getpid(), process_start=run_lock.process_start_ticks(os.getpid()) - 1)
    with WorkdirLock(tmp_path):
        pass
    assert "taking over" in capsys.readouterr().err


@pytest.mark.parametrize("alive", [True, False])
def test_lock_from_another_host_is_never_taken_over(tmp_path, alive):
    pid = os.getpid() if alive else _dead_pid()
    _write_lock(tmp_path, host="gpu-node-17", pid=pid)
    with pytest.raises(WorkdirLockedError) as info:
        WorkdirLock(tmp_path).acquire()
    message = str(info.value)
    assert f"PID {pid} on host gpu-node-17 since" in message
    assert f"if that run is gone, delete {tmp_path / 'run.lock'}" in message
    assert json.loads((tmp_path / "run.lock").read_text())["host"] == "gpu-node-17"


def test_lock_from_before_a_reboot_of_this_host_is_taken_over(tmp_path, capsys):
    _write_lock(tmp_path, pid=os.getpid(), boot_id="00000000-0000-0000-0000-000000000000")  # a live PID, another boot
    with WorkdirLock(tmp_path):
        pass
    assert f"which ran before {socket.gethostname()} rebooted" in capsys.readouterr().err


def test_lock_from_another_pid_namespace_is_not_taken_over(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), pid_namespace="pid:[1]")
    with pytest.raises(WorkdirLockedError, match=r"another PID namespace \(another container\?\).*delete"):
        WorkdirLock(tmp_path).acquire()


def test_force_takes_over_any_lock(tmp_path, capsys):
    _write_lock(tmp_path, host="gpu-node-17", pid=os.getpid())
    with WorkdirLock(tmp_path, force=True) as lock:
        assert json.loads((tmp_path / "run.lock").read_text())["token"] == lock.content["token"]
    assert "PID %d on host gpu-node-17" % os.getpid() in capsys.readouterr().err


def test_unreadable_lock_is_refused_naming_the_file(tmp_path):
    (tmp_path / "run.lock").write_text("{half a lock")
    with pytest.raises(WorkdirLockedError, match=r"run.lock: not a valid lock file .*delete"):
        WorkdirLock(tmp_path).acquire()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = WorkdirLock(tmp_path).acquire()
    other = _write_lock(tmp_path, token="someone-else")
    lock.release()
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == other["token"]


def test_takeover_race_between_threads_has_one_winner(tmp_path, monkeypatch):
    """Both takers judge the same stale lock at the same time (a widened window): exactly one may win."""
    _write_lock(tmp_path, pid=_dead_pid())
    judge = run_lock.stale_reason

    def slow_judge(holder, me=None):
        time.sleep(0.2)
        return judge(holder, me)

    monkeypatch.setattr(run_lock, "stale_reason", slow_judge)
    results, locks = [], []

    def take():
        try:
            locks.append(WorkdirLock(tmp_path).acquire())
            results.append("won")
        except WorkdirLockedError:
            results.append("refused")

    threads = [threading.Thread(target=take) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == ["refused", "refused", "won"]
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == locks[0].content["token"]
    locks[0].release()


def test_concurrent_takeover_by_processes_has_one_winner(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    n, go, done = 5, time.time() + 1.0, tmp_path / "done"
    done.mkdir()
    code = textwrap.dedent(f"""
        import os, pathlib, time
        from mmard_jax.run_lock import WorkdirLock, WorkdirLockedError
        time.sleep(max(0.0, {go} - time.time()))  # all start together
        try:
            lock = WorkdirLock({str(tmp_path)!r}).acquire()
        except WorkdirLockedError:
            print("refused", flush=True)
            (pathlib.Path({str(done)!r}) / str(os.getpid())).touch()
        else:
            print("won", flush=True)
            deadline = time.time() + 20
            while len(os.listdir({str(done)!r})) < {n - 1} and time.time() < deadline:
                time.sleep(0.02)  # hold the lock until every other process has tried
            lock.release()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    outs = [p.communicate(timeout=30) for p in procs]
    results = sorted(out.strip() for out, _ in outs)
    assert results == ["refused"] * 4 + ["won"], outs
    assert sum("taking over" in err for _, err in outs) == 1
    assert not (tmp_path / "run.lock").exists()
