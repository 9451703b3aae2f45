"""The trainer end to end: CLI outputs, a NaN stop
that keeps the last good checkpoint, and clear errors for a missing teacher."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmard_jax import checkpoints, train
from mmard_jax.cli import UserError
from mmard_jax.models import store
from mmard_jax.tools import fault_injection as fault  # its tiny run (WRN-10-1 on digits, 2 epochs) is this file's too

REPO = pathlib.Path(__file__).resolve().parent.parent


def tiny_config(teacher):
    namespace = {}
    exec(fault.TINY_CONFIG.replace("TEACHER", repr(str(teacher))), namespace)
    return namespace["get_config"]()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    config = fault.prepare(root)
    return root, root / "teacher", config


def cli(config, workdir, cache, *extra):
    env = dict(os.environ, MMARD_XLA_CACHE=str(cache), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "mmard_jax.train", f"--config={config}", f"--workdir={workdir}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def latest_state(workdir):
    """(step, state as a nested dict) of the newest latest-checkpoint, read with orbax directly."""
    latest = pathlib.Path(workdir) / checkpoints.LATEST
    step = max(int(p.name) for p in latest.glob("*") if p.name.isdigit())
    with ocp.StandardCheckpointer() as checkpointer:
        return step, checkpointer.restore(latest / str(step) / "state")


# The CLI's files a person reads and its saved state: tests/test_reliability.py, on its uninterrupted reference run.


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path):
    _, teacher, _ = setup
    config = tiny_config(teacher)
    config.eval.final_attacks = ()
    # From epoch 1 on the learning rate is 1e29: the first update of epoch 1 overflows.
    config.optim.schedule = "piecewise"
    config.optim.boundaries = (1,)
    config.optim.decay = 1e30
    with pytest.raises(train.NonFiniteLossError,
                       match=r"NaN/inf at step \d+.*last good checkpoint \(step \d+\)") as err:
        train.train_and_evaluate(config, tmp_path, progress=False)
    bad, kept = map(int, re.search(r"at step (\d+).*\(step (\d+)\)", str(err.value)).groups())
    assert 8 <= bad < 16 and 8 <= kept <= bad  # broke in epoch 1; the checkpoint precedes the bad update
    step, state = latest_state(tmp_path)
    assert step == kept and int(state["bad_step"]) == -1
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["nets"]["student"]["params"]))
    assert not (tmp_path / "summary.md").exists()


def test_missing_teacher_is_a_clear_error(setup, tmp_path):
    _, teacher, _ = setup
    config = tiny_config(teacher)
    config.teacher.checkpoint = ""
    with pytest.raises(UserError, match="needs a teacher: set --config.teacher.checkpoint"):
        train.train_and_evaluate(config, tmp_path / "a", progress=False)
    config.teacher.checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(store.CheckpointError, match="nowhere.*model.json is missing"):
        train.train_and_evaluate(config, tmp_path / "b", progress=False)


def test_batch_that_does_not_divide_fails_before_training(setup, tmp_path):
    _, teacher, _ = setup
    config = tiny_config(teacher)
    config.batch_size = 33
    with pytest.raises(ValueError, match="batch_size 33 does not divide by the 2 devices"):
        train.train_and_evaluate(config, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_config_errors_come_before_training(setup, tmp_path):
    _, teacher, _ = setup
    config = tiny_config(teacher)
    config.eval.attacks = ("clean", "pgd_s")
    with pytest.raises(ValueError, match="best_metric='pgd_t' is not evaluated during training"):
        train.train_and_evaluate(config, tmp_path, progress=False)
    config.eval.attacks = ("clean", "pgd_t")
    config.eval.final_attacks = ("clean", "pgd20")
    with pytest.raises(ValueError, match=r"final_attacks: unknown attack\(s\) \['pgd20'\]"):
        train.train_and_evaluate(config, tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


def test_resume_with_another_teacher_behind_the_same_path_is_refused(setup, tmp_path):
    """config.json records the teachers' fingerprints: a teacher replaced behind the same path (here: a workdir
    whose best checkpoint moved on) is a change of what is trained, refused in one line."""
    from mmard_jax import config_guard
    from mmard_jax.models import store as model_store

    teacher = tmp_path / "teacher_run"
    teacher.mkdir()
    spec = model_store.model_spec("wide_resnet", 10, {"depth": 10, "width": 1})
    (teacher / model_store.SPEC_FILE).write_text(json.dumps(spec))
    variables = model_store.abstract_variables(model_store.build_module(spec), (16, 16, 3))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    saved = checkpoints.TrainCheckpoints(teacher, "pgd_t")
    saved.save_best(5, variables, 0.5)
    config = tiny_config(teacher)
    (tmp_path / "run").mkdir()
    train.record_start(tmp_path / "run", config, extend_epochs=False)
    run = checkpoints.TrainCheckpoints(tmp_path / "run", "pgd_t")
    run.save_best(1, variables, 0.1)  # the run has saved state: a restart is a resume
    run.close()
    saved.save_best(9, variables, 0.6)  # the teacher run went on: another best checkpoint behind the same path
    saved.close()
    with pytest.raises(config_guard.ConfigChangedError, match="fingerprints.teacher"):
        train.record_start(tmp_path / "run", config, extend_epochs=False)

