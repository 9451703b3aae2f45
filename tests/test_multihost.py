"""Multi-process runs on jax.distributed, tested with two local CPU processes (scripts/launch_local.sh, one device
each) against this process with two devices: the same parameters (to float32 rounding; measured bitwise, since with
two summands every all-reduce adds the same two numbers, whichever process holds them), the same evaluation
records and reports, files
written once, a kill -9 of one process ending the other with a line naming it, and a rerun resuming bitwise.
All two-process runs come from one module fixture that overlaps them (the suite's 2 cores stay busy while one
launch waits on its processes). Also: cluster detection as JAX does it, and one-line errors for a bad or
unreachable coordinator."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tolerances
from mmard_jax import checkpoints, cli, distributed, evaluate, methods, stopping, train
from mmard_jax.models import store
from mmard_jax.tools import bench_layouts as bmp
from multihost_worker import EVAL_ATTACKS, EVAL_BATCH, EVAL_N, FAIR, SPEC, random_variables, tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / "scripts" / "launch_local.sh"
TESTS = pathlib.Path(__file__).resolve().parent
SCHEDULER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                  "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "JAX_COORDINATOR_ADDRESS",
                  "JAX_COORDINATOR_PORT")


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """scripts/launch_local.sh 2 -- COMMAND, its output collected line by line (with arrival times)."""

    def __init__(self, command, cache: pathlib.Path, n: int = 2):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), MMARD_XLA_CACHE=str(cache),
                   PYTHON=sys.executable)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([str(LAUNCH), str(n), "--", *command], cwd=REPO, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))
        self.ended_at = time.monotonic()  # every process (and the launcher) has closed its output

    def pid(self, process: int):
        for _, line in list(self.lines):
            found = re.match(rf"launch_local: process {process} of \d+ is pid (\d+)", line)
            if found:
                return int(found.group(1))
        return None

    def wait(self, timeout: float = 400) -> int:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.proc.returncode

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def latest_step(workdir) -> int:
    return max(int(p.name) for p in (pathlib.Path(workdir) / checkpoints.LATEST).glob("*") if p.name.isdigit())


def latest_state(workdir):
    """(step, state) of a workdir's newest latest-checkpoint, read onto one device whatever layout wrote it."""
    directory = pathlib.Path(workdir) / checkpoints.LATEST
    step = latest_step(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(directory / str(step) / "state")
        tree = getattr(meta, "item_metadata", meta)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        return step, checkpointer.restore(directory / str(step) / "state", target)


def assert_same_state(workdir_a, workdir_b):
    """The newest states of two runs of one config agree to float32 rounding (tests/tolerances.py): one process
    with two devices and two processes with one compile separate programs, whose kernels may round differently.
    Measured on this suite's CPUs: bitwise equal (each device runs the same shapes, and an all-reduce of two
    summands is exact in either order). The tolerance is that of the 1-vs-2-device train-step test."""
    step_a, a = latest_state(workdir_a)
    step_b, b = latest_state(workdir_b)
    assert step_a == step_b
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in pairs)
    print(f"{workdir_a.name} vs {workdir_b.name}: max abs difference {diff:.3g}")
    tolerances.assert_trees_close(a, b, rtol=1e-5, atol=1e-6)


def records(workdir):
    return [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def eval_records(workdir):
    """The evaluation fields of metrics.jsonl: accuracies, i.e. counts of decisions, compared exactly. They are
    the decisions of models equal to rounding (assert_same_state); a trained model's margins cannot be kept clear
    of 0 by the test's data, so a record differing after equal states names a margin within rounding of 0."""
    return [{k: v for k, v in r.items() if k.startswith("test_") or k in ("epoch", "step")} for r in records(workdir)]


def our_lines(text: str, process: int):
    """The output lines of one process that our code printed (not JAX's, gloo's or the launcher's)."""
    prefix = f"[{process}] "
    noise = re.compile(r"\[Gloo\]|mmard_jax: process \d+ of \d+ joins|[IWEF]\d{4} |WARNING")  # JAX's, absl's, gloo's
    return [line[len(prefix):] for line in text.splitlines()
            if line.startswith(prefix) and not noise.match(line[len(prefix):])]


# ----------------------------------------------------------------------------- joining


@pytest.fixture
def clean_env(monkeypatch):
    for name in SCHEDULER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cluster_detection_follows_jax(clean_env):
    from jax._src import clusters  # the independent reference: JAX's own detection

    srun = {"SLURM_JOB_ID": "4103", "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
            "SLURM_LOCALID": "0"}
    batch_shell = {k: v for k, v in srun.items() if k != "SLURM_STEP_NODELIST"}  # sbatch's script, not an srun step
    ompi4 = {"OMPI_MCA_orte_hnp_uri": "3141.0;tcp://10.1.2.3:45678", "OMPI_COMM_WORLD_SIZE": "4",
             "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    one_task = dict(srun, SLURM_NTASKS="1", SLURM_PROCID="0")
    expected = {"srun": ("SLURM", "gpu017:61447", 2, 1), "ompi4": ("Open MPI", "10.1.2.3:61440", 4, 3),
                "batch_shell": None, "one_task": None, "none": None}
    for name, env in {"srun": srun, "batch_shell": batch_shell, "ompi4": ompi4, "one_task": one_task,
                      "none": {}}.items():
        for k in SCHEDULER_VARS:
            clean_env.delenv(k, raising=False)
        for k, v in env.items():
            clean_env.setenv(k, v)
        found = distributed.detect_cluster()
        jax_env = next((c for c in (clusters.OmpiCluster, clusters.SlurmCluster) if c.is_env_present()), None)
        if expected[name] is None:
            assert found is None, name
            continue
        assert jax_env is not None and (found.name, found.address, found.num_processes, found.process_id) == \
            expected[name], (name, found)
        assert found.address == jax_env.get_coordinator_address(None, None)
        assert (found.num_processes, found.process_id) == (jax_env.get_process_count(), jax_env.get_process_id())


def test_open_mpi_5_and_inconsistent_flags_are_one_line_errors(clean_env):
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "2")  # Open MPI 5 (PRRTE) sets no OMPI_MCA_orte_hnp_uri
    with pytest.raises(cli.UserError, match="cannot detect: pass --coordinator_address=HOST:PORT"):
        distributed.initialize()
    clean_env.delenv("OMPI_COMM_WORLD_SIZE")
    with pytest.raises(cli.UserError, match="go together"):
        distributed.initialize("127.0.0.1:1234", 2)
    with pytest.raises(cli.UserError, match="--process_id=2 must be in 0 .. 1"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(cli.UserError, match="expected HOST:PORT"):
        distributed.initialize("127.0.0.1", 2, 1)
    assert distributed.initialize() is False  # no flags, no scheduler: single-process, JAX untouched
    assert distributed.initialize("127.0.0.1:1234", 1, 0) is False
    with socket.socket() as busy:  # process 0 hosts the coordination service: its port must be free
        busy.bind(("", 0))
        busy.listen()
        with pytest.raises(cli.UserError, match=f"port {busy.getsockname()[1]} is in use"):
            distributed.initialize(f"127.0.0.1:{busy.getsockname()[1]}", 2, 0)


def test_unreachable_coordinator_fails_in_bounded_time_naming_it(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    cmd = [sys.executable, "-m", "mmard_jax.evaluate", f"--checkpoint={tmp_path}", f"--coordinator_address={address}",
           "--num_processes=2", "--process_id=1", "--init_timeout=3"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=120)
    print(f"unreachable coordinator: exit {proc.returncode} after {time.monotonic() - start:.1f} s")
    assert proc.returncode == cli.USER_ERROR_STATUS, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and address in errors[0] and "did not answer" in errors[0], proc.stderr
    assert f"process 1 of 2 joins the run at {address}" in proc.stderr  # said before waiting


# ----------------------------------------------------------------------------- training, faults, resuming, evaluation


def kill_after_first_checkpoint(launch: Launch, workdir: pathlib.Path, killed_at: list) -> None:
    """kill -9 of process 1 once the first checkpoint exists and process 0 has logged a step after it (TensorBoard's
    file grows), i.e. is past the checkpoint's barriers, back in the training loop."""
    def tb_size():
        return sum(p.stat().st_size for p in (workdir / "tb").glob("events.*"))

    size = None
    while launch.proc.poll() is None and not killed_at:
        if size is None and launch.pid(1) and any(p.name.isdigit() for p in (workdir / checkpoints.LATEST).glob("*")):
            size = tb_size()
        if size is not None and tb_size() > size:
            os.kill(launch.pid(1), 9)
            killed_at.append(time.monotonic())
        time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every multi-process run of this file, overlapped to keep both cores busy, and their one-process references.

    Two processes train MMARD with the train CLI; process 1 is killed after the first checkpoint and the same
    commands are rerun (resume). Meanwhile two other processes run tests/multihost_worker.py (ARD with Fair-ARD's
    plug-in, an evaluation, the agreement helpers), and this process computes the same MMARD, Fair-ARD and evaluation
    over two devices.
    """
    root = tmp_path_factory.mktemp("multihost")
    teacher = store.save_model(root / "teacher", store.model_spec(**SPEC), random_variables(seed=1))
    config_file = root / "config.py"
    config_file.write_text(f"from multihost_worker import tiny_config\n\n\ndef get_config():\n"
                           f"    return tiny_config('mmard', {str(teacher)!r})\n")
    r = types.SimpleNamespace(root=root, mmard=root / "mmard_two_processes", worker=root / "worker_two_processes")
    r.worker.mkdir()
    command = [sys.executable, "-m", "mmard_jax.train", f"--config={config_file}", f"--workdir={r.mmard}",
               "--heartbeat_timeout=20"]
    r.first, r.killed_at = Launch(command, root / "xla_cache"), []
    killer = threading.Thread(target=kill_after_first_checkpoint, args=(r.first, r.mmard, r.killed_at), daemon=True)
    killer.start()
    while r.first.pid(1) is None:  # its port is chosen: the worker's launch picks another
        time.sleep(0.05)
    r.work = Launch([sys.executable, str(TESTS / "multihost_worker.py"), f"--out={r.worker}", f"--teacher={teacher}"],
                    root / "xla_cache")

    r.mmard_ref = train.train_and_evaluate(tiny_config("mmard", str(teacher)), root / "mmard_one_process",
                                           progress=False)
    r.first_status = r.first.wait()
    killer.join()
    r.kept, r.finished_before_rerun = latest_step(r.mmard), (r.mmard / "summary.json").exists()
    r.second = Launch(command, root / "xla_cache")  # rerunning the same commands resumes
    r.fair_ref = train.train_and_evaluate(tiny_config("ard", str(teacher), FAIR), root / "fair_ard_one_process",
                                          progress=False)
    model = store.save_model(root / "one_process" / "model", store.model_spec(**SPEC), random_variables())
    r.eval_ref = evaluate.run_evaluation(model, "digits", list(EVAL_ATTACKS), n_examples=EVAL_N,
                                         batch_size=EVAL_BATCH, output=str(root / "report_one_process"), unroll="1",
                                         progress=False)
    r.second_status, r.work_status = r.second.wait(), r.work.wait()
    return r


def test_kill_of_one_process_stops_the_other_naming_it(runs):
    assert runs.killed_at, runs.first.text
    print(f"kill -9 of process 1: process 0 ended {runs.first.ended_at - runs.killed_at[0]:.1f} s later, "
          f"status {runs.first_status}")
    # The next collective fails at once and a roll call names process 1 (status 75). Had process 0 been waiting at
    # one of orbax's checkpoint barriers (coordination-service barriers, not collectives), only the heartbeat
    # would find the loss: JAX aborts it (134) with a message naming process 1. Both are bounded.
    ours = re.search(r"\[0\] mmard_jax.train: error: process 0 of 2 lost process\(es\) \[1\] .*Rerun the same "
                     r"commands to resume", runs.first.text)
    jaxs = re.search(r"unhealthy \(stopped sending heartbeats\):\s*(\[0\] )?1\s", runs.first.text)
    assert (runs.first_status == stopping.LOST_PROCESS_STATUS and ours) or (runs.first_status == 134 and jaxs), \
        runs.first.text


def test_mmard_resumed_two_processes_match_two_devices(runs):
    assert runs.second_status == 0, runs.second.text
    assert 3 <= runs.kept < 12 and not runs.finished_before_rerun
    assert f"[0] resumed from step {runs.kept} ({runs.mmard})" in runs.second.text
    assert_same_state(runs.mmard, runs.root / "mmard_one_process")
    assert eval_records(runs.mmard) == eval_records(runs.root / "mmard_one_process")
    summary = json.loads((runs.mmard / "summary.json").read_text())
    assert summary["final"] == runs.mmard_ref["final"] and set(summary["final"]) == {"clean"}


def test_files_a_person_reads_are_written_once_by_process_0(runs):
    workdir = runs.mmard
    assert [r["epoch"] for r in records(workdir)] == [1, 2]
    assert [json.loads(x)["kind"] for x in (workdir / "history.jsonl").read_text().splitlines()] == ["start", "resume"]
    assert len(list((workdir / "tb").glob("events.out.tfevents.*"))) == 2  # one writer per start
    for name in ("summary.md", "accuracy.png", "config.json", "model.json"):
        assert (workdir / name).is_file(), name
    for launch in (runs.first, runs.second, runs.work):
        assert our_lines(launch.text, 1) == [], launch.text  # process 1 prints nothing of its own
    assert [line for line in our_lines(runs.second.text, 0) if line.startswith("epoch 2:")] == [
        f"epoch 2: clean {runs.mmard_ref['last']['clean']:.2%}"]
    assert runs.second.text.count("Test accuracy (%):") == 1  # the summary's table, printed by process 0 only
    assert runs.work.text.count("wrote ") == 1 and "[0] wrote " in runs.work.text  # the report is written once


def test_fair_ard_two_processes_match_two_devices(runs):
    """ARD + Fair-ARD: the student's BatchNorm in train mode during the attack (synced over processes at every
    iterate), and the epoch state: the per-class counts of correct attack iterates summed over devices and processes
    (methods.core.EpochState), the class weights the epoch boundary makes of them, identical to one process's. The
    run streams its input (config.dataset.pipeline='stream'): each process reads only its shard of every global batch,
    the shards' union is the epoch (the counts below) and the global batches are one process's (the states)."""
    assert runs.work_status == 0, runs.work.text
    assert methods.attack_defaults("ard")["student_bn"] == "train"
    two, one = runs.worker / "fair_ard", runs.root / "fair_ard_one_process"
    assert_same_state(two, one)
    assert eval_records(two) == eval_records(one)
    (_, a), (_, b) = latest_state(two), latest_state(one)
    sums = a["epoch_state"]["fair"]["sums"]
    # Epoch 2's counts are of the whole epoch: every example once (96, the two processes' halves summed).
    assert int(np.sum(sums["examples"])) == tiny_config("ard").dataset.n_train and 0 < int(np.sum(sums["correct"]))
    assert tiny_config("ard", plugins=FAIR).dataset.pipeline == "stream"
    for workdir in (two, one):  # grain's iterator position (batches read by each process) is checkpointed
        meta = json.loads((workdir / checkpoints.LATEST / str(latest_step(workdir)) / "meta" / "metadata").read_text())
        assert meta["stream_state"] == {"next_index": 12}
    for part in ("sums", "value"):
        for key, value in a["epoch_state"]["fair"][part].items():
            np.testing.assert_array_equal(value, b["epoch_state"]["fair"][part][key], err_msg=f"{part}/{key}")
    fair = [{k: v for k, v in r.items() if k.startswith("fair_")} for r in records(two)]
    assert fair == [{k: v for k, v in r.items() if k.startswith("fair_")} for r in records(one)]
    assert fair[0]["fair_weights"] == [1.0] * 10 and len(set(fair[1]["fair_weights"])) > 1  # moved by epoch 1's
    obs = [json.loads((runs.worker / f"obs_{i}.json").read_text()) for i in (0, 1)]
    assert obs[0]["summary_final"] == obs[1]["summary_final"] == runs.fair_ref["final"]


def test_evaluation_two_processes_counts_every_example_once(runs):
    # The model directory both processes saved holds the variables; its evaluation covers every example once and
    # gives the single-process report.
    out, root = runs.worker, runs.root
    assert runs.work_status == 0, runs.work.text
    for a, b in zip(jax.tree.leaves(store.load_model(out / "model", input_shape=(16, 16, 3))[1]),
                    jax.tree.leaves(store.load_model(root / "one_process" / "model", input_shape=(16, 16, 3))[1])):
        np.testing.assert_array_equal(a, b)
    theirs = json.loads((out / "report" / "report.json").read_text())
    masks = dict(np.load(out / "report" / "masks.npz"))
    for name in EVAL_ATTACKS:
        assert masks[name].shape == (EVAL_N,)
        np.testing.assert_array_equal(masks[name], runs.eval_ref["masks"][name])
    mine = json.loads((root / "report_one_process" / "report.json").read_text())
    for key in ("accuracy", "counts", "gradients", "flags"):
        assert theirs[key] == mine[key], key
    assert {k: v for k, v in theirs["setup"].items() if k != "checkpoint"} == \
        {k: v for k, v in mine["setup"].items() if k != "checkpoint"}
    assert (out / "report" / "report.md").read_text().replace(str(out), "") == \
        (root / "report_one_process" / "report.md").read_text().replace(str(root / "one_process"), "")


def test_agreement_helpers_across_processes(runs):
    assert runs.work_status == 0, runs.work.text
    obs = [json.loads((runs.worker / f"obs_{i}.json").read_text()) for i in (0, 1)]
    assert obs[0]["broadcast"] == obs[1]["broadcast"] == {"from": 0, "values": [0, 1.5]}
    assert obs[0]["on_primary_error"][0] == "ZeroDivisionError"
    assert obs[1]["on_primary_error"] == ["UserError", "process 0 stopped: ZeroDivisionError: integer division or "
                                          "modulo by zero"]
    for o in obs:
        assert o["unshared"][0] == "UserError" and "is not shared: process(es) [1] cannot see" in o["unshared"][1]
        assert o["model_files"] == ["model"]  # no staging directory left behind


# ----------------------------------------------------------------------------- the benchmark's multi-process mode


def test_benchmark_multiprocess_mode_dispatches_and_compares_rounds():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--multiprocess",
                           "--cases=no_such_case"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0 and "unknown case 'no_such_case'" in proc.stderr  # benchmark.py hands the mode over
    assert bmp.parse_layout("2x1") == (2, 1)
    with pytest.raises(SystemExit, match="not PxD"):
        bmp.parse_layout("2")
    rows = [{"layout": "1x2", "step_s": s, "images_per_s": 128 / s} for s in (4.0, 2.0, 3.0)]
    merged = [bmp.merge_rounds(rows), bmp.merge_rounds([dict(r, layout="2x1", images_per_s=r["images_per_s"] / 2)
                                                         for r in rows])]
    assert merged[0]["step_s"] == 3.0 and merged[0]["images_per_s_rounds"] == [32.0, 64.0, 128 / 3]
    assert bmp.round_ratios(merged) == [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]  # within each round, not across
