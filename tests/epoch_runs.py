"""Short runs through the real trainer shared by the tests of state that lives across epochs (tests/test_swa.py,
test_fair.py, test_absld.py): the fault-injection tiny run (WRN-10-1 on digits, 2 epochs of 8 steps of 32), its
metrics.jsonl records, and the same run stopped at the epoch boundary (or mid-epoch) and resumed."""

import json
import pathlib

import orbax.checkpoint as ocp
import pytest

from mmard_jax import checkpoints, preemption, train
from mmard_jax.tools import fault_injection as fault

STEPS_PER_EPOCH = fault.STEPS // 2


def fault_config(root):
    """The fault-injection run's config (`fault_injection.prepare` writes its file and data under `root`)."""
    namespace = {}
    exec(fault.prepare(root).read_text(), namespace)
    return namespace["get_config"]()


def tiny_config(root, method_block):
    """The fault-injection run with `method_block`: no SWA, one evaluation at the end, no final attacks,
    checkpoints only at epoch ends."""
    config = fault_config(root)
    config.method = method_block
    config.swa.enabled = False
    config.eval.final_attacks = ()
    config.eval.every_epochs = 2
    config.checkpoint_every_steps = 0
    return config


def train_uninterrupted(tmp_path_factory, name, make_config):
    """(root, config) of `make_config(root)` trained to the end in ROOT/run, ROOT a fresh temporary folder `name`
    (the module-scoped reference run the epoch-state tests compare against)."""
    root = tmp_path_factory.mktemp(name)
    config = make_config(root)
    train.train_and_evaluate(config, root / "run", progress=False)
    return root, config


def records(workdir):
    """The per-epoch records of a workdir's metrics.jsonl."""
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def final_state(workdir, step=fault.STEPS):
    """The train state saved after `step` (by default the run's last step; a pytree of NumPy arrays)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(pathlib.Path(workdir) / checkpoints.LATEST / str(step) / "state")


def train_resumed_at_the_boundary(config, workdir, monkeypatch, stop=STEPS_PER_EPOCH) -> None:
    """Trains `config` in `workdir` stopped (and saved) after step `stop` (by default epoch 1's last step, before the
    method's epoch update), then reruns it to the end."""
    original = preemption.PreemptionGuard.should_stop
    monkeypatch.setattr(preemption.PreemptionGuard, "should_stop",
                        lambda self, step=None, agree=None: step == stop)
    with pytest.raises(preemption.PreemptedError):
        train.train_and_evaluate(config, workdir, progress=False)
    monkeypatch.setattr(preemption.PreemptionGuard, "should_stop", original)
    train.train_and_evaluate(config, workdir, progress=False)
