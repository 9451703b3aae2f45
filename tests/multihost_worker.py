"""One process of the two-process checks of tests/test_multihost.py, started by scripts/launch_local.sh.

    scripts/launch_local.sh 2 -- python tests/multihost_worker.py --out=DIR --teacher=TEACHER_DIR

Trains ARD with Fair-ARD's plug-in (`plugins=fair`: a train-mode attack, and per-class counts summed over every
device and process into the epoch state) on the streamed input pipeline (each process reads its rows of every
global batch through grain) for a few steps with `train.train_and_evaluate` (DIR/fair_ard, the teacher
TEACHER_DIR), evaluates a model directory it
saved from both processes with `evaluate.run_evaluation` (DIR/model, DIR/report), and exercises the
agreement helpers; each process leaves what it observed in DIR/obs_<process>.json. The test runs the same
work in one process over two devices and compares.
"""

import argparse
import json
import pathlib
import sys

from mmard_jax import config_lib, distributed

SPEC = {"arch": "wide_resnet", "num_classes": 10, "kwargs": {"depth": 10, "width": 1}}
EVAL_ATTACKS = ("clean", "pgd_s")
FAIR = ("fair",)  # the plug-in of the trained run (ARD + Fair-ARD)
EVAL_N, EVAL_BATCH = 50, 16  # 3 full batches and one of 2 examples: the split does not divide by the batch


def tiny_config(method: str, teacher: str = "", plugins=()):
    """A few steps of `method` (with `plugins`) on digits with a WRN-10-1 (the multi-process tests' configuration)."""
    c = config_lib.base_config(method, "wide_resnet", "digits", plugins=plugins)
    c.student.kwargs = {"depth": 10, "width": 1}
    c.teacher.checkpoint = teacher
    c.dataset.n_train = 96
    c.batch_size = 16
    c.num_epochs = 2
    c.attack.steps = 2
    c.attack.unroll = c.eval.unroll = "1"  # compile-bound: rolled loops compile fastest
    c.eval.n_examples = 40  # 2 batches of 16 and one of 8
    c.eval.batch_size = 16
    c.eval.attacks = c.eval.final_attacks = ("clean",)  # attacks across processes: the evaluation's pgd_s
    c.best_metric = "clean"
    c.checkpoint_every_steps = 3 if method == "mmard" else 0  # the kill test's mid-epoch checkpoint is MMARD's
    c.log_every_steps = 2
    if "fair" in plugins:  # the Fair-ARD run streams (grain): each process reads only its half of every batch
        c.dataset.pipeline = "stream"
    return c


def random_variables(seed: int = 0):
    """Host (NumPy) variables of the WRN-10-1 of SPEC, the same in every process (no init program to compile)."""
    import jax
    import numpy as np

    from mmard_jax.models import store

    shapes = store.abstract_variables(store.build_module(store.model_spec(**SPEC)), (16, 16, 3))
    rng = np.random.default_rng(seed)
    variables = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
    variables["batch_stats"] = jax.tree.map(lambda v: np.abs(v) + 0.5, variables["batch_stats"])
    return variables


def observe_helpers(out: pathlib.Path) -> dict:
    """What the agreement helpers give on this process: broadcasts, a failure on process 0, an unshared workdir."""
    import jax

    me = jax.process_index()
    obs = {"process": me, "broadcast": distributed.broadcast_json({"from": me, "values": [me, 1.5]})}
    try:
        distributed.on_primary(lambda: 1 // 0)
    except Exception as err:  # noqa: BLE001 - recorded for the test
        obs["on_primary_error"] = [type(err).__name__, str(err)]
    distributed.SHARED_CHECK_S = 1
    try:
        with distributed.workdir_lock(out / f"private_{me}"):  # each process its own directory: not shared
            obs["unshared"] = None
    except Exception as err:  # noqa: BLE001 - recorded for the test
        obs["unshared"] = [type(err).__name__, str(err)]
    return obs


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--coordinator_address")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    a = p.parse_args(argv)
    distributed.initialize(a.coordinator_address, a.num_processes, a.process_id, init_timeout=60, heartbeat_timeout=20)

    import jax

    from mmard_jax import evaluate, train
    from mmard_jax.models import store

    out = pathlib.Path(a.out)
    obs = observe_helpers(out)
    store.save_model(out / "model", store.model_spec(**SPEC), random_variables())
    obs["model_files"] = sorted(p.name for p in out.iterdir() if "model" in p.name)
    summary = train.train_and_evaluate(tiny_config("ard", a.teacher, FAIR), out / "fair_ard", progress=False)
    obs["summary_final"] = summary["final"]
    report = evaluate.run_evaluation(out / "model", "digits", list(EVAL_ATTACKS), n_examples=EVAL_N,
                                     batch_size=EVAL_BATCH, output=str(out / "report"), unroll="1", progress=False)
    obs["report_accuracy"] = report["accuracy"]
    (out / f"obs_{jax.process_index()}.json").write_text(json.dumps(obs))


if __name__ == "__main__":
    sys.exit(main())
