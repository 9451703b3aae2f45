"""PreemptionGuard: SIGTERM/SIGINT finish the step, save and exit 128+N; a second signal ends the process at once."""

import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mmard_jax import preemption
from mmard_jax.preemption import PreemptedError, PreemptionGuard

REPO = pathlib.Path(__file__).resolve().parent.parent

LOOP = textwrap.dedent('''
    """A training loop under the guard: each step sleeps a little; the save callback may be slow."""
    import os, pathlib, time
    from mmard_jax import cli
    from mmard_jax.preemption import PreemptionGuard

    def save(step):
        print(f"saving {step}", flush=True)
        time.sleep(float(os.environ["SAVE_SECONDS"]))
        pathlib.Path(os.environ["SAVED"]).write_text(str(step))

    def main(argv):
        with PreemptionGuard() as guard:
            for step in range(1, 100000):
                time.sleep(0.02)  # the step's work
                print(f"done {step}", flush=True)
                if guard.should_stop(step):
                    save(step)
                    raise guard.error(step)

    if __name__ == "__main__":
        cli.run(main)
''')


def _start(tmp_path, save_seconds=0.0):
    (tmp_path / "loop.py").write_text(LOOP)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAVE_SECONDS": str(save_seconds), "SAVED": str(tmp_path / "saved")}
    proc = subprocess.Popen([sys.executable, "loop.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc


def _read_until(proc, prefix):
    """Stdout lines up to and including the first that starts with `prefix`."""
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, f"the loop ended before printing {prefix!r}: {proc.stderr.read()}"
        lines.append(line.strip())
        if line.startswith(prefix):
            return lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_loop_finishes_the_step_saves_and_exits(tmp_path, sig):
    proc = _start(tmp_path)
    lines = _read_until(proc, "done 3")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    lines += out.splitlines()
    done = [int(x.split()[1]) for x in lines if x.startswith("done")]
    saved = int((tmp_path / "saved").read_text())
    assert saved == done[-1] >= 3 and lines[-1] == f"saving {saved}"  # the step in progress finished, nothing after
    assert proc.returncode == 128 + sig
    name = signal.Signals(sig).name
    assert err.splitlines() == [
        f"received {name}: finishing step, saving, then exiting (a second signal exits at once, without saving)",
        f"loop.py: preempted at step {saved}; rerun the same command to resume",
    ]


def test_second_signal_during_a_slow_save_exits_at_once(tmp_path):
    proc = _start(tmp_path, save_seconds=60)
    _read_until(proc, "done 2")
    proc.send_signal(signal.SIGTERM)
    _read_until(proc, "saving")
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - start < 5
    assert proc.returncode == -signal.SIGTERM  # ended by the signal itself (a shell shows 143)
    assert not (tmp_path / "saved").exists()
    assert err.splitlines()[-1] == "received SIGTERM again: exiting now, without saving"


def test_handlers_are_restored_after_the_context():
    before = {s: signal.getsignal(s) for s in preemption.DEFAULT_SIGNALS}
    with PreemptionGuard() as guard:
        assert all(signal.getsignal(s) == guard._handle for s in preemption.DEFAULT_SIGNALS)
    assert {s: signal.getsignal(s) for s in preemption.DEFAULT_SIGNALS} == before
    guard.restore()  # idempotent
    assert {s: signal.getsignal(s) for s in preemption.DEFAULT_SIGNALS} == before


def test_handlers_are_restored_after_an_exception():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(PreemptedError):
        with PreemptionGuard() as guard:
            raise guard.error(5)
    assert signal.getsignal(signal.SIGTERM) == before


def test_signal_in_process_sets_the_flag(capfd):
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert guard.requested and guard.should_stop(2) and guard.stopped_at == 2
        error = guard.error(2)
    assert "received SIGTERM: finishing step, saving, then exiting" in capfd.readouterr().err
    assert str(error) == "preempted at step 2; rerun the same command to resume" and error.exit_status == 143


def test_agree_decides_for_all_processes():
    seen = []
    with PreemptionGuard() as guard:
        assert guard.should_stop(7, agree=lambda local: seen.append(local) or True)  # another process got the signal
        assert not guard.should_stop(8, agree=lambda local: seen.append(local) or False)
    assert seen == [False, False] and guard.stopped_at == 7
    assert guard.error(7).exit_status == 128 + signal.SIGTERM


def test_preempted_error():
    error = PreemptedError(12, signal.SIGINT)
    assert (error.step, error.exit_status) == (12, 130)
    assert str(error) == "preempted at step 12; rerun the same command to resume"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.step, copy.signum, str(copy)) == (12, signal.SIGINT, str(error))
