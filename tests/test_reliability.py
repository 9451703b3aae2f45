"""What survives what, on the real trainer (`python -m mmard_jax.train` in subprocesses, the tiny run of
scripts/fault_injection.py): SIGTERM mid-epoch saves that step and exits 143, and the rerun ends bitwise equal
to an uninterrupted run; a second SIGTERM during the save exits at once and keeps the previous checkpoint; a
second trainer on a workdir in use is refused; a dead run's lock is taken over; a resume with other settings
is refused in one line; --extend_epochs trains longer and is recorded; a damaged latest checkpoint falls back
to the previous one, all damaged is refused; a failed write keeps the previous checkpoint; SIGKILL at a random
moment (the fault-injection script, one trial).

Every run is the fault-injection script's streamed one (`--pipeline=stream`: grain's iterator state resumes with the
train state, the SWA student without its BatchNorm recompute): one uninterrupted reference run then serves every
comparison, the script's trial included. The resident pipeline's resumes: tests/test_swa.py (mid-epoch, with the
SWA BatchNorm recompute), test_absld.py, test_ciard.py, test_fair.py (at the epoch boundary) and test_multihost.py
(a killed two-process run). Every subprocess shares one XLA compilation cache.
"""

import asyncio
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import typing

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmard_jax import checkpoints, config_guard, tensorstore_errors, train
from mmard_jax.tools import fault_injection as fault

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 600  # seconds a trainer subprocess may take (a hang fails the test instead of blocking the suite)
STEPS_PER_EPOCH = 8
PIPELINE = "stream"  # every run's input pipeline (the fault-injection trial's: it reuses the reference run)


# Runs the trainer with orbax's final rename of each checkpoint item held back for 60 s while $SLOW_SAVE exists
# (writing SLOW_SAVE.saving first): a save that is surely in progress when the second signal comes.
SLOW_SAVE = '''
import asyncio, os, pathlib, runpy
from orbax.checkpoint._src.path import atomicity

flag = pathlib.Path(os.environ["SLOW_SAVE"])
finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def slow_finalize(self):
    if flag.exists():
        flag.with_name(flag.name + ".saving").write_text(str(self.get()))
        await asyncio.sleep(60)
    return await finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
runpy.run_module("mmard_jax.train", run_name="__main__", alter_sys=True)
'''


def train_command(config, workdir, *extra):
    """The trainer's command line on the streamed pipeline (the fault-injection script's, with `extra`)."""
    return fault.train_command(config, workdir, *fault.PIPELINE_FLAGS[PIPELINE], *extra)


def start(config, workdir, env, *extra) -> subprocess.Popen:
    """`train_command` started, its stdout and stderr in one pipe."""
    return fault.start(config, workdir, env, *fault.PIPELINE_FLAGS[PIPELINE], *extra)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, config file, environment): the teacher and config of the fault-injection run, one compile cache."""
    root = tmp_path_factory.mktemp("reliability")
    config = fault.prepare(root)
    env = dict(fault.environment(root), MMARD_XLA_CACHE=str(root / "xla_cache"))
    return root, config, env


def wait_for(predicate, watch, what: str, timeout: float = TIMEOUT):
    """Polls the trainer until `predicate()`; fails the test if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        alive = watch.poll()
        assert alive, f"the trainer ended before {what}:\n{watch.output.decode(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def reference(tiny):
    """The uninterrupted run (DIR/reference_stream with its stats file: the fault-injection script reuses it). While
    it holds the workdir it is stopped (SIGSTOP) and a second trainer is started on the same workdir; then it is
    continued and finishes."""
    root, config, env = tiny
    workdir = root / fault.reference_name(PIPELINE)
    began = time.monotonic()
    watch = fault.Watch(start(config, workdir, env), workdir)
    wait_for(lambda: (workdir / "run.lock").is_file(), watch, "taking the lock")
    os.kill(watch.proc.pid, signal.SIGSTOP)
    try:
        intruder = subprocess.run(train_command(config, workdir), cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=TIMEOUT)
        holder = json.loads((workdir / "run.lock").read_text())
    finally:
        os.kill(watch.proc.pid, signal.SIGCONT)
    code, out = watch.finish(TIMEOUT)
    assert code == 0, out[-3000:]
    fault.save_reference_stats(root, time.monotonic() - began, watch, PIPELINE)
    return {"workdir": workdir, "state": fault.final_state(workdir), "intruder": intruder, "holder": holder,
            "pid": watch.proc.pid}


@pytest.fixture(scope="module")
def preempted(tiny, reference):
    """A run stopped by SIGTERM once its first step is done (no periodic checkpoints): (workdir, status, output)."""
    root, config, env = tiny
    workdir = root / "preempted"
    watch = fault.Watch(start(config, workdir, env, "--config.checkpoint_every_steps=0"), workdir)
    wait_for(lambda: watch.step >= 1, watch, "the first step")
    os.kill(watch.proc.pid, signal.SIGTERM)
    code, out = watch.finish(TIMEOUT)
    return workdir, code, out


def copy_run(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def trainer(config, workdir, env, *extra, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(config, workdir, *extra), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT, **kw)


def error_lines(proc: subprocess.CompletedProcess, prog: str = "mmard_jax.train"):
    """The `PROG: error: ...` lines of stderr (tqdm's bars share stderr), after checking there is no traceback."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error: ")]


def saved_state(workdir, step):
    """The train state of one latest checkpoint, as nested dicts of arrays (read with orbax directly)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(pathlib.Path(workdir) / checkpoints.LATEST / str(step) / "state")


# ---------------------------------------------------------------- preemption


def test_sigterm_mid_epoch_saves_that_step_and_the_rerun_is_bitwise(tiny, reference, preempted):
    root, config, env = tiny
    workdir, code, out = preempted
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "received SIGTERM: finishing step, saving, then exiting (a second signal exits at once" in out
    found = re.search(r"mmard_jax\.train: preempted at step (\d+); rerun the same command to resume", out)
    assert found, out[-3000:]
    step = int(found.group(1))
    assert 1 <= step < STEPS_PER_EPOCH  # mid-epoch, and with checkpoint_every_steps=0 only the stop saved
    assert fault.committed(workdir) == [step]
    assert int(saved_state(workdir, step)["step"]) == step
    assert "Traceback" not in out and not (workdir / "run.lock").exists()

    # The rerun is stopped again, and a second SIGTERM comes while that stop's checkpoint is being written.
    work = copy_run(workdir, root / "sigterm_twice")
    flag = root / "slow_save"
    (root / "slow_save.py").write_text(SLOW_SAVE)
    args = train_command(config, work, "--config.checkpoint_every_steps=0")[3:]  # after `python -m mmard_jax.train`
    proc = subprocess.Popen([sys.executable, str(root / "slow_save.py"), *args], cwd=REPO,
                            env=dict(env, SLOW_SAVE=str(flag)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watch = fault.Watch(proc, work)
    wait_for(lambda: watch.step > step, watch, "a step after the resume")
    flag.touch()
    os.kill(proc.pid, signal.SIGTERM)
    saving = root / "slow_save.saving"
    wait_for(saving.exists, watch, "the save after SIGTERM")
    os.kill(proc.pid, signal.SIGTERM)
    code, out = watch.finish(30)  # without the second signal's exit this save alone would take 60 s
    assert code == -signal.SIGTERM, out[-3000:]  # ended by the signal itself, as the shell expects
    assert "received SIGTERM again: exiting now, without saving" in out
    assert "preempted at step" not in out and f"resumed from step {step}" in out
    assert fault.committed(work) == [step]  # the interrupted write never replaced the previous checkpoint
    assert list((work / checkpoints.LATEST).glob(f"*{fault.TMP_MARK}*")) or list(
        (work / "checkpoints/best").glob(f"*{fault.TMP_MARK}*"))
    assert (work / "run.lock").exists()  # the dead run's lock

    # A plain rerun takes the dead run's lock over, resumes from the saved step and ends like the reference.
    done = trainer(config, work, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"run\.lock: taking over the stale lock of PID \d+ on host .*, which is no longer running",
                     done.stderr), done.stderr[-3000:]
    assert f"resumed from step {step}" in done.stdout
    assert fault.differences(fault.final_state(work), reference["state"]) == []


def test_evaluate_on_a_run_without_a_best_checkpoint_is_one_line(tiny, preempted):
    _, _, env = tiny
    workdir, _, _ = preempted
    proc = subprocess.run([sys.executable, "-m", "mmard_jax.evaluate", f"--checkpoint={workdir}", "--dataset=digits"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"mmard_jax.evaluate: error: {workdir}/checkpoints/best holds no checkpoint yet (no evaluation has finished)"]


# ---------------------------------------------------------------- one writer per workdir


def test_second_trainer_is_refused_at_once_while_the_first_finishes(reference):
    intruder, holder = reference["intruder"], reference["holder"]
    assert intruder.returncode == 2, intruder.stderr[-3000:]
    lines = intruder.stderr.strip().splitlines()
    assert len(lines) == 1, intruder.stderr
    assert lines[0].startswith(f"mmard_jax.train: error: {reference['workdir']} is in use by another run: "
                               f"PID {reference['pid']} on host {holder['host']} since {holder['started']}")
    assert f"kill {reference['pid']}" in lines[0]
    assert (reference["workdir"] / "summary.json").is_file()  # the first run went on and finished
    assert not (reference["workdir"] / "run.lock").exists()


# ---------------------------------------------------------------- resuming with other settings


def test_resume_with_other_settings_is_refused_in_one_line(tiny, reference):
    _, config, env = tiny
    workdir = reference["workdir"]
    saved = {name: (workdir / name).read_bytes() for name in ("config.json", "history.jsonl", "metrics.jsonl")}
    cases = [
        (["--config.optim.lr=0.5", "--config.method.alpha=0.5", "--config.attack.steps=3", "--config.seed=1"],
         ["attack.steps: 2 -> 3", "method.alpha: 1.0 -> 0.5", "optim.lr: 0.1 -> 0.5", "seed: 0 -> 1"]),
        (["--config.student.kwargs.width=2"], ["student.kwargs.width: 1 -> 2"]),  # another architecture
    ]
    for extra, changes in cases:
        proc = trainer(config, workdir, env, *extra)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"mmard_jax.train: error: the run in {workdir} was started with other settings ({workdir}/config.json): "
            "start a new --workdir for these settings, or rerun with the saved ones. Refused: "), proc.stderr
        assert lines[0].endswith("Refused: " + "; ".join(changes)), lines[0]
    assert {name: (workdir / name).read_bytes() for name in saved} == saved  # nothing was rewritten


def test_extend_epochs_needs_its_flag_and_is_recorded(tiny, reference):
    root, config_file, env = tiny
    work = copy_run(reference["workdir"], root / "extended")
    namespace = {}
    exec(config_file.read_text(), namespace)
    longer = fault.with_pipeline(namespace["get_config"](), PIPELINE)
    longer.num_epochs = 3
    with pytest.raises(config_guard.ConfigChangedError, match=r"to train longer, add --extend_epochs\. Refused:\s+"
                       r"num_epochs: 2 -> 3 \(growing it needs --extend_epochs\)"):
        train.train_and_evaluate(longer, work, progress=False)
    assert json.loads((work / "config.json").read_text())["num_epochs"] == 2
    # With the flag (and another logging cadence) the run resumes into epoch 3 of 3. It is stopped there with
    # SIGKILL: training on would compile the step again (its schedule has the new length), the slowest part.
    watch = fault.Watch(start(config_file, work, env, "--config.num_epochs=3", "--extend_epochs",
                              "--config.log_every_steps=4"), work)
    wait_for(lambda: b"epoch 3/3:" in watch.output, watch, "epoch 3")
    watch.proc.kill()
    _, out = watch.finish(TIMEOUT)
    assert f"resumed from step {2 * STEPS_PER_EPOCH}" in out and "Traceback" not in out
    history = [json.loads(line) for line in (work / "history.jsonl").read_text().splitlines()]
    assert [h["kind"] for h in history] == ["start", "extend"]
    assert sorted((c["key"], c["old"], c["new"]) for c in history[-1]["changes"]) == [
        ("log_every_steps", 2, 4), ("num_epochs", 2, 3)]
    assert json.loads((work / "config.json").read_text())["num_epochs"] == 3


# ---------------------------------------------------------------- damaged and unwritable checkpoints


def test_damaged_latest_checkpoint_falls_back_to_the_previous_and_ends_bitwise(tiny, reference):
    root, config, env = tiny
    work = copy_run(reference["workdir"], root / "damaged_latest")
    previous, newest = fault.committed(work)
    data = max((work / checkpoints.LATEST / str(newest) / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)
    proc = trainer(config, work, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {work}/checkpoints/latest/{newest} is unreadable: " in proc.stdout
    assert f"resuming from the previous good checkpoint, step {previous}" in proc.stdout
    assert f"moved the unreadable checkpoint of step {newest} to {work}/checkpoints/unreadable/{newest}-" in proc.stdout
    assert f"resumed from step {previous}" in proc.stdout
    assert len(list((work / checkpoints.UNREADABLE).iterdir())) == 1
    assert fault.committed(work) == [previous, newest]  # the step was trained and written again
    assert fault.differences(fault.final_state(work), reference["state"]) == []


def test_all_checkpoints_damaged_is_refused_and_never_restarted(tiny, reference):
    root, config, env = tiny
    work = copy_run(reference["workdir"], root / "damaged_all")
    previous, newest = fault.committed(work)
    shutil.rmtree(work / checkpoints.LATEST / str(newest) / "state")  # partly deleted
    os.truncate(work / checkpoints.LATEST / str(previous) / "state" / "_METADATA", 100)  # truncated
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*") if "checkpoints" in p.parts)
    metrics = (work / "metrics.jsonl").read_bytes()
    proc = trainer(config, work, env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert re.fullmatch(
        rf"mmard_jax\.train: error: {work}/checkpoints/latest: no checkpoint can be read \(step {newest}: .+; "
        rf"step {previous}: .+\); refusing to start from scratch over a run: move the workdir away to start anew",
        line), line
    assert "state" in line.split(f"step {newest}:")[1].split(";")[0]  # names what is missing
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*") if "checkpoints" in p.parts) == before
    assert (work / "metrics.jsonl").read_bytes() == metrics


# Runs the trainer with writes past LIMIT bytes failing with EFBIG, as on a full disk (root cannot write past an
# RLIMIT_FSIZE either): the limit and the ignored SIGXFSZ (else the write kills the process) survive the exec.
FILE_SIZE_LIMIT = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def test_failed_checkpoint_write_keeps_the_previous_one_and_stops_clearly(tiny, preempted):
    root, config, env = tiny
    work = copy_run(preempted[0], root / "unwritable")
    (step,) = fault.committed(work)
    kept = jax.tree.leaves(saved_state(work, step))
    # The train state's file is ~0.6 MB, every other file of the run (JSON, metrics, events) far below 200 kB.
    proc = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, "200000", *train_command(config, work)[1:]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert re.fullmatch(
        rf"mmard_jax\.train: error: could not write checkpoint step \d+ to {work}/checkpoints/latest \(.*File too "
        rf"large.*\); the previous checkpoint \(step {step}\) is intact: free disk space or fix permissions, then "
        rf"rerun the same command", line), line
    assert fault.committed(work) == [step]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved_state(work, step)), kept, strict=True))
    assert not (work / "run.lock").exists()


def test_uninterrupted_run_writes_what_a_person_reads(reference):
    """The trainer CLI's outputs on the reference run: the saved state (no teacher in it), one metrics record per
    epoch, the summaries, plot, TensorBoard events and a loadable best student."""
    workdir = reference["workdir"]
    latest = workdir / checkpoints.LATEST
    step = max(int(p.name) for p in latest.glob("*") if p.name.isdigit())
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(latest / str(step) / "state")
    assert step == 2 * STEPS_PER_EPOCH
    assert set(state) == {"step", "nets", "method_state", "bad_step", "swa"} and set(state["nets"]) == {"student"}
    assert int(state["swa"]["count"]) == 2  # the SWA student (config.swa, from the first epoch) is saved with it
    assert [json.loads(x)["epoch"] for x in (workdir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    for name in ("summary.md", "summary.json", "accuracy.png", "model.json", "config.json", "swa/model.json"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert set(json.loads((workdir / "summary.json").read_text())["final"]) == {"clean", "fgsm", "pgd_t"}
    assert "| best checkpoint, final attacks |" in (workdir / "summary.md").read_text()
    module, variables = checkpoints.load_model(workdir, input_shape=(16, 16, 3))
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jax.numpy.zeros((1, 16, 16, 3))))
    assert jax.tree.structure(variables) == jax.tree.structure(abstract)


# ---------------------------------------------------------------- SIGKILL at random moments


def test_fault_injection_trial_ends_bitwise_equal(tiny, reference):
    """One trial of scripts/fault_injection.py, the kind that matters most: SIGKILL during a checkpoint write (the
    kill after a step is SIGTERM's test above without the handler; more trials: run the script), on the streamed
    input pipeline: the killed run's grain iterator state comes back from the checkpoint with the train state, and
    the resumed run ends bitwise equal to the uninterrupted one (the module's reference run, which the script finds
    complete in its --workdir and reuses)."""
    root, _, env = tiny
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fault_injection.py"), "--trials=1", "--seed=0",
                           f"--workdir={root}", "--pipeline=stream"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"reference: {reference['workdir']} (" in proc.stdout  # the reference the other tests compare with
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 1 and rows[0].endswith("| yes |"), proc.stdout
    assert "write #" in rows[0] and "the write of" in rows[0]  # the kill is aimed at a checkpoint write
    resumed = re.search(r"\| (\d+)(?: \(fallback\))? \| yes \|$", rows[0])
    assert resumed and int(resumed.group(1)) % STEPS_PER_EPOCH, rows[0]  # grain's state restored inside an epoch
    assert "1 of 1 trials ended bitwise equal to the uninterrupted run" in proc.stdout


# ---------------------------------------------------------------- the checkpoint class itself (in-process, small)


class TinyState(typing.NamedTuple):
    step: jax.Array
    w: jax.Array


def tiny_state(step: int) -> TinyState:
    return TinyState(jax.numpy.asarray(step, jax.numpy.int32), jax.numpy.full((4, 3), float(step)))


def test_partly_deleted_newest_checkpoint_falls_back_and_is_written_again(tmp_path):
    said = []
    ckpt = checkpoints.TrainCheckpoints(tmp_path, "pgd_t", say=said.append)
    for step in (1, 2):
        ckpt.save_latest(tiny_state(step), {"best_value": step / 10, "best_epoch": step})
    ckpt.close()
    shutil.rmtree(tmp_path / checkpoints.LATEST / "2" / "state")
    ckpt = checkpoints.TrainCheckpoints(tmp_path, "pgd_t", say=said.append)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tiny_state(0))
    state, meta = ckpt.restore(abstract)
    assert int(state.step) == 1 and float(state.w[0, 0]) == 1.0 and meta == {"best_value": 0.1, "best_epoch": 1}
    assert (said[0].startswith(f"checkpoint {tmp_path}/checkpoints/latest/2 is unreadable: KeyError: ")
            and "state" in said[0])
    assert said[1].startswith(f"moved the unreadable checkpoint of step 2 to {tmp_path}/checkpoints/unreadable/2-")
    assert said[2] == "resuming from the previous good checkpoint, step 1"
    assert [p.name for p in (tmp_path / checkpoints.UNREADABLE).iterdir()][0].startswith("2-")
    ckpt.save_latest(tiny_state(2), meta)  # step 2 is written again, not skipped as "already saved"
    ckpt.close()
    assert fault.committed(tmp_path) == [1, 2]
    said.clear()
    ckpt = checkpoints.TrainCheckpoints(tmp_path, "pgd_t", say=said.append)
    state, _ = ckpt.restore(abstract)
    ckpt.close()
    assert int(state.step) == 2 and float(state.w[0, 0]) == 2.0 and said == []
    assert checkpoints.holds_run(tmp_path) and not checkpoints.holds_run(tmp_path / "elsewhere")


def test_failed_write_is_told_apart_from_a_bug(tmp_path, monkeypatch):
    ckpt = checkpoints.TrainCheckpoints(tmp_path, "pgd_t")
    ckpt.save_latest(tiny_state(1), {})

    def full_disk(*args, **kwargs):
        try:
            raise OSError(28, "No space left on device")
        except OSError as err:  # how tensorstore reports it: a ValueError carrying the OS error's text
            raise ValueError("OUT_OF_RANGE: Error writing \"w/0\": Failed writing: [os_error_code='28']") from err

    monkeypatch.setattr(ckpt._latest, "save", full_disk)
    with pytest.raises(checkpoints.CheckpointWriteError, match=r"could not write checkpoint step 2 to .*checkpoints/"
                       r"latest \(OSError: \[Errno 28\] No space left on device\); the previous checkpoint \(step 1\)"):
        ckpt.save_latest(tiny_state(2), {})
    monkeypatch.setattr(ckpt._latest, "save", lambda *a, **k: {}["a bug"])
    with pytest.raises(KeyError):  # not an I/O failure: it stays a bug, with its traceback
        ckpt.save_latest(tiny_state(2), {})
    assert fault.committed(tmp_path) == [1]


def test_error_summary_keeps_the_innermost_reason():
    try:
        try:
            raise ValueError("OUT_OF_RANGE: Error reading \"w/0\" in OCDBT database at local file \"" + "x" * 400
                             + "\": Requested byte range [0, 9) is not valid for value of size 5")
        except ValueError as inner:
            raise Exception("Encountered error while reading array index. See full TensorStore details") from inner
    except Exception as err:  # noqa: BLE001 - the shape of orbax's wrapped errors
        summary = tensorstore_errors.error_summary(err)
    assert summary.startswith("ValueError: OUT_OF_RANGE: Error reading \"w/0\"") and " ... " in summary
    assert summary.endswith("Requested byte range [0, 9) is not valid for value of size 5") and len(summary) < 330
    # The operating system's reason in the middle of a long line (before tensorstore's JSON spec) is kept too.
    mid = ValueError("OUT_OF_RANGE: Error opening \"zarr\" driver: Error writing \"a/.zarray\" in OCDBT database at "
                     "local file \"" + "x" * 200 + "\": File too large [os_error_code='27'] [spec='"
                     + "{}" * 200 + "']")
    summary = tensorstore_errors.error_summary(mid)
    assert "File too large [os_error_code='27']" in summary and len(summary) < 360, summary
    # Only the code, after the spec (as CI's tensorstore wrote it): the operating system's words are added.
    bare = ValueError("OUT_OF_RANGE: Error opening \"zarr\" driver: Error writing \"bad_step/.zarray\" in OCDBT "
                      "database at local file \"" + "x" * 200 + "\" [spec='" + "{\"a\":1}" * 40
                      + "'] [os_error_code='27']")
    summary = tensorstore_errors.error_summary(bare)
    assert summary.endswith("[os_error_code='27'] [File too large, os error 27]") and len(summary) < 400, summary
    assert tensorstore_errors.error_summary(
        ValueError("x [os_error_code=2] No such file or directory")).count("No such file") == 1
    assert not checkpoints.is_io_failure(ValueError("unsupported pytree leaf"))
    assert checkpoints.is_io_failure(ValueError("Failed to write 10 bytes: File too large [os_error_code='27']"))


def test_a_failed_read_is_told_once_not_also_by_orbax_threads():
    """While a checkpoint is read (store.load_model), ERROR records that orbax or tensorstore code logs from its
    threads are dropped (the failure reaches the caller as one CheckpointError, the CLI's one line); others pass,
    and after the read everything passes again."""
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    absl_logger, handler = logging.getLogger("absl"), Keep()
    absl_logger.addHandler(handler)

    def log(path, level, message):
        absl_logger.handle(logging.LogRecord("absl", level, path, 1, message, None, None))

    orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "future.py")
    try:
        with tensorstore_errors.quiet_thread_errors():
            log(orbax_file, logging.ERROR, "orbax thread raised an exception")
            log(orbax_file, logging.WARNING, "orbax warning")
            log(os.path.join("mmard_jax", "train.py"), logging.ERROR, "ours")
        log(orbax_file, logging.ERROR, "after the read")
    finally:
        absl_logger.removeHandler(handler)
    assert seen == ["orbax warning", "ours", "after the read"]


def test_a_failed_write_s_sibling_tasks_are_not_logged_too():
    """After a failed save, asyncio's 'Task exception was never retrieved' for orbax's other writes (collected at
    any later moment, CI once printed their tracebacks under the one-line error) is dropped when the exception is
    an I/O failure; a task that died of a bug is still logged, and after a successful save everything is."""
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(str(record.exc_info[1]))

    async def fail(message):
        raise ValueError(message)

    def abandon(message):
        loop = asyncio.new_event_loop()
        task = loop.create_task(fail(message))
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        del task
        gc.collect()  # the task's finaliser hands its unretrieved exception to the loop's handler, which logs it

    tasks_logger, handler = logging.getLogger("asyncio"), Keep()
    earlier = [f for f in tasks_logger.filters if isinstance(f, tensorstore_errors.AbandonedIoTasks)]
    for f in earlier:  # left, for good, by a failed save of an earlier test in this process
        tasks_logger.removeFilter(f)
    tasks_logger.addHandler(handler)
    io_error = "Failed to write 91413 bytes to file 16: File too large [os_error_code='27']"
    try:
        with tensorstore_errors.quiet_thread_errors():
            abandon(io_error)
        abandon(io_error)  # after a success: logged
        with pytest.raises(ValueError), tensorstore_errors.quiet_thread_errors():
            raise ValueError(io_error)
        abandon(io_error)  # after a failure: dropped for good
        abandon("unsupported pytree leaf")
    finally:
        tasks_logger.removeHandler(handler)
        for f in [f for f in tasks_logger.filters if isinstance(f, tensorstore_errors.AbandonedIoTasks)]:
            tasks_logger.removeFilter(f)
        for f in earlier:
            tasks_logger.addFilter(f)
    assert seen == [io_error, "unsupported pytree leaf"]
