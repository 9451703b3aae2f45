"""Training: `train_and_evaluate(config, workdir)` and its command line.

    python -m mmard_jax.train --config=configs/default.py --workdir=DIR [--config.method.alpha=0.5]

Re-running the same command resumes from the latest checkpoint; an interrupted and resumed run ends
with bitwise the same parameters as an uninterrupted one (data order, augmentation and attack
randomness are functions of (seed, epoch, step), and the whole train state is checkpointed).
Outputs in DIR: metrics.jsonl (one JSON record per epoch), TensorBoard events (tb/), checkpoints/,
model.json (the student's spec), config.json, accuracy.png and summary.md at the end.
"""

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from mmard_jax import checkpoints, data, methods, parallel, reporting, runtime, train_step
from mmard_jax.attacks import suite

TEACHER_FORWARDS = frozenset({"t_nat", "t_adv", "inner:t_nat", "inner:t_iter"})


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient became NaN/inf; the run stopped and kept its last good checkpoint."""


def resolve_method(method_cfg) -> methods.Method:
    """The config's `method` block -> a resolved Method (its other fields are outer hyper-parameters)."""
    cfg = dict(method_cfg)
    name = cfg.pop("name")
    inner = cfg.pop("inner", "") or None
    outer = cfg.pop("outer", "") or None
    return methods.get_method(name, inner=inner, outer=outer, **cfg)


def _phases(method: methods.Method, num_epochs: int):
    return sorted({method.phase(e) for e in range(num_epochs)})


def _needs_any(method: methods.Method, num_epochs: int, names) -> bool:
    return any(method.forwards(p) & names for p in _phases(method, num_epochs))


def load_teacher(cfg, role: str, num_classes: int, input_shape):
    """(module, variables) of a teacher named in the config; clear errors for a missing or mismatched one."""
    if not cfg.checkpoint:
        raise ValueError(
            f"this method needs a {role}: set --config.{role}.checkpoint to a model directory "
            f"(from `python -m mmard_jax.convert`) or a training workdir of this project"
        )
    module, variables = checkpoints.load_model(cfg.checkpoint, dtype=cfg.dtype, input_shape=input_shape)
    if module.num_classes != num_classes:
        raise ValueError(f"{role} {cfg.checkpoint} has {module.num_classes} classes, the data set {num_classes}")
    return module, variables


class MetricsLog:
    """metrics.jsonl: one record per epoch; on resume, records past the restored step are dropped."""

    def __init__(self, path: pathlib.Path, restored_step: int):
        self.path = path
        self.records = []
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec["step"] <= restored_step:
                    self.records.append(rec)
        self._rewrite()

    def _rewrite(self):
        checkpoints.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: Dict[str, Any]):
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def check_config(config) -> None:
    """Errors that would otherwise surface only after hours of training."""
    for field in ("attacks", "final_attacks"):
        unknown = [a for a in config.eval[field] if a not in suite.ATTACKS]
        if unknown:
            raise ValueError(f"config.eval.{field}: unknown attack(s) {unknown}; known: {', '.join(suite.ATTACKS)}")
    if config.best_metric not in config.eval.attacks:
        raise ValueError(
            f"config.best_metric={config.best_metric!r} is not evaluated during training "
            f"(config.eval.attacks={tuple(config.eval.attacks)}): the best checkpoint could never be chosen"
        )


def _mean_metrics(history) -> Dict[str, float]:
    """Averages of per-step device metrics fetched in one transfer."""
    if not history:
        return {}
    fetched = jax.device_get(history)
    return {k: float(np.mean([h[k] for h in fetched])) for k in fetched[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, progress: bool = True) -> Dict[str, Any]:
    """Trains the student of `config` in `workdir` (resuming if a checkpoint is there) and evaluates it.

    Returns the summary (also written to summary.md / summary.json).
    """
    workdir = pathlib.Path(workdir).absolute()
    check_config(config)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.data_mesh()
    parallel.check_divisible(config.batch_size, mesh, "batch_size")
    parallel.check_divisible(config.eval.batch_size, mesh, "eval.batch_size")

    ds = config.dataset
    train_ds = data.load_dataset(ds.name, "train", data_dir=ds.data_dir or None, source=ds.source, download=ds.download)
    test_ds = data.load_dataset(ds.name, "test", data_dir=ds.data_dir or None, source=ds.source, download=ds.download)
    if ds.n_train > 0:
        train_ds = dataclasses.replace(train_ds, images=train_ds.images[: ds.n_train], labels=train_ds.labels[: ds.n_train])
    if config.eval.n_examples > 0:
        n = config.eval.n_examples
        test_ds = dataclasses.replace(test_ds, images=test_ds.images[:n], labels=test_ds.labels[:n])
    input_shape = train_ds.images.shape[1:]
    num_classes = train_ds.num_classes

    method = resolve_method(config.method)
    spec = checkpoints.model_spec(config.student.arch, num_classes, dict(config.student.kwargs))
    student = checkpoints.build_module(spec, config.student.dtype, bn_axis_name=parallel.AXIS)
    eval_student = checkpoints.build_module(spec, config.student.dtype)

    teacher = teacher2 = None
    t_vars = t2_vars = {}
    if _needs_any(method, config.num_epochs, TEACHER_FORWARDS):
        teacher, t_vars = load_teacher(config.teacher, "teacher", num_classes, input_shape)
    if _needs_any(method, config.num_epochs, {"t2_nat"}):
        teacher2, t2_vars = load_teacher(config.teacher2, "teacher2", num_classes, input_shape)

    steps_per_epoch = data.num_train_steps(len(train_ds), config.batch_size)
    opt = config.optim
    schedule = train_step.make_lr_schedule(
        opt.lr, steps_per_epoch, config.num_epochs, opt.schedule, tuple(opt.boundaries), opt.decay, opt.per_epoch
    )
    tx = train_step.make_optimizer(schedule, opt.momentum, opt.weight_decay, opt.nesterov)
    settings = train_step.StepSettings(
        eps=config.attack.eps, step_size=config.attack.step_size, steps=config.attack.steps,
        gaussian_scale=config.attack.gaussian_scale, unroll=runtime.resolve_unroll(config.attack.unroll),
        crop_padding=ds.crop_padding, flip=ds.flip, base_lr=opt.lr,
    )

    rep = parallel.replicated(mesh)
    # RBG keys for the initial parameters: threefry init programs take many seconds to compile on CPU.
    init_key = jax.random.key(config.seed, impl="rbg")
    state = train_step.init_state(student, method, tx, init_key, input_shape)
    latest = checkpoints.checkpoint_manager(workdir / checkpoints.LATEST, max_to_keep=1)
    best = checkpoints.checkpoint_manager(workdir / checkpoints.BEST, max_to_keep=1, best_metric=config.best_metric)
    meta = {"best_value": -math.inf, "best_epoch": -1}
    if latest.latest_step() is not None:
        restored = latest.restore(
            latest.latest_step(),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(jax.eval_shape(lambda: state)), meta=ocp.args.JsonRestore()),
        )
        state, meta = restored["state"], dict(restored["meta"])
        logging.info("resumed from step %d in %s", int(state.step), workdir)
        print(f"resumed from step {int(state.step)} ({workdir})", flush=True)
    state = jax.device_put(state, rep)
    t_vars, t2_vars = jax.device_put((t_vars, t2_vars), rep)
    images = jax.device_put(jnp.asarray(train_ds.images), rep)
    labels = jax.device_put(jnp.asarray(train_ds.labels, jnp.int32), rep)

    checkpoints.write_json_atomic(workdir / checkpoints.SPEC_FILE, spec)
    checkpoints.write_json_atomic(workdir / "config.json", json.loads(config.to_json_best_effort()))
    start_step = int(state.step)
    log = MetricsLog(workdir / "metrics.jsonl", start_step)
    writer = reporting.SummaryWriter(workdir / "tb")
    step_fns, evaluators = {}, {}

    def save_latest():
        _raise_if_nonfinite(state, latest)
        if int(state.step) not in latest.all_steps():
            latest.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    eval_unroll = runtime.resolve_unroll(config.eval.unroll)
    n_devices = mesh.devices.size
    print(f"{config.method.name}: {config.student.arch} on {ds.name} ({len(train_ds)} train / {len(test_ds)} test), "
          f"{steps_per_epoch} steps/epoch x {config.num_epochs} epochs, batch {config.batch_size} on {n_devices} device(s)",
          flush=True)
    for epoch in range(start_step // steps_per_epoch, config.num_epochs):
        phase = method.phase(epoch)
        if phase not in step_fns:
            step_fns[phase] = train_step.make_train_step(
                student, teacher, teacher2, method, phase, tx, schedule, settings, mesh, config.seed
            )
        batches = jax.device_put(
            jnp.asarray(data.train_batch_indices(config.seed, epoch, len(train_ds), config.batch_size)),
            parallel.batch_sharded(mesh, axis=1),
        )
        first = int(state.step) - epoch * steps_per_epoch
        epoch_start = time.perf_counter()
        history, t0, seen = [], time.perf_counter(), 0
        bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{config.num_epochs}",
                   disable=not progress, dynamic_ncols=True)
        epoch_history = []
        for i in range(first, steps_per_epoch):
            state, m = step_fns[phase](state, t_vars, t2_vars, images, labels, batches[i], jnp.asarray(epoch, jnp.int32))
            history.append(m)
            seen += config.batch_size
            step = int(epoch * steps_per_epoch + i + 1)
            if step % config.log_every_steps == 0 or i == steps_per_epoch - 1:
                means = _mean_metrics(history)
                epoch_history.append((len(history), means))
                rate = seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{means['loss']:.4f}", **_acc_postfix(means), img_s=f"{rate:.0f}")
                writer.scalars(step, {f"train/{k}": v for k, v in means.items()} | {"train/images_per_s": rate})
                history, t0, seen = [], time.perf_counter(), 0
            if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and i < steps_per_epoch - 1:
                save_latest()
            bar.update(1)
        bar.close()
        _raise_if_nonfinite(state, latest)

        record = {"epoch": epoch + 1, "step": int(state.step)}
        record.update({f"train_{k}": v for k, v in _weighted(epoch_history).items()})
        if (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == config.num_epochs:
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            correct = suite.evaluate_split(
                eval_student, variables, test_ds.images, test_ds.labels, config.eval.attacks,
                eps=config.eval.eps, batch_size=config.eval.batch_size, seed=_eval_seed(config, epoch + 1),
                mesh=mesh, unroll=eval_unroll, progress=progress, evaluators=evaluators,
            )
            record.update({f"test_{k}": float(v.mean()) for k, v in correct.items()})
            value = record.get(f"test_{config.best_metric}")
            if value is not None and value > meta["best_value"]:
                meta = {"best_value": value, "best_epoch": epoch + 1}
                if int(state.step) not in best.all_steps():
                    best.save(int(state.step), args=ocp.args.Composite(variables=ocp.args.StandardSave(variables)),
                              metrics={config.best_metric: value})
            print(f"epoch {epoch + 1}: " + ", ".join(f"{k[5:]} {v:.2%}" for k, v in record.items() if k.startswith("test_")),
                  flush=True)
        record["seconds"] = time.perf_counter() - epoch_start
        log.append(record)
        writer.scalars(int(state.step), {k.replace("_", "/", 1): v for k, v in record.items() if k.startswith(("test_", "train_"))})
        save_latest()
    writer.close()

    final = {}
    if config.eval.final_attacks:
        # The best checkpoint under every final attack, with the best epoch's evaluation seed: the
        # attacks that evaluation already ran give the same numbers, so they are taken from its record.
        best_record = next((r for r in log.records if r["epoch"] == meta["best_epoch"]), {})
        final = {a: best_record[f"test_{a}"] for a in config.eval.final_attacks if f"test_{a}" in best_record}
        missing = [a for a in config.eval.final_attacks if a not in final]
        if missing:
            _, variables = checkpoints.load_model(workdir, dtype=config.student.dtype, input_shape=input_shape)
            correct = suite.evaluate_split(
                eval_student, variables, test_ds.images, test_ds.labels, missing, eps=config.eval.eps,
                batch_size=config.eval.batch_size, seed=_eval_seed(config, meta["best_epoch"]), mesh=mesh,
                unroll=eval_unroll, progress=progress, evaluators=evaluators,
            )
            final.update(reporting.mean_accuracies(correct))
        final = {a: final[a] for a in config.eval.final_attacks}
    return reporting.finish_run(workdir, config, log.records, meta, final)


def _acc_postfix(means: Dict[str, float]) -> Dict[str, str]:
    return {k: f"{v:.3f}" for k, v in means.items() if k.startswith("acc_")}


def _weighted(chunks) -> Dict[str, float]:
    """Epoch means from the per-log-interval means, weighted by the steps in each interval."""
    total = sum(n for n, _ in chunks)
    if not total:
        return {}
    return {k: sum(n * m[k] for n, m in chunks) / total for k in chunks[-1][1]}


def _eval_seed(config, epoch: int) -> int:
    """The attack seed of the evaluation after `epoch` (1-based): fresh randomness every epoch."""
    return config.seed + 1000 * epoch


def _raise_if_nonfinite(state: train_step.TrainState, latest) -> None:
    bad = int(state.bad_step)
    if bad >= 0:
        kept = latest.latest_step()
        where = f"the last good checkpoint (step {kept}) is kept in {latest.directory}" if kept is not None else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"the loss or a gradient became NaN/inf at step {bad}; training stopped and {where}. "
            f"Lower --config.optim.lr, check the teacher checkpoint, or try float32 (--config.student.dtype=float32)."
        )


FLAGS = flags.FLAGS


def define_flags():
    """The CLI's flags, defined only when run as a program (the module is also a library)."""
    config_flags.DEFINE_config_file("config", None, "Training configuration file (ml_collections).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports (resumes if it holds a run).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.quiet_logging()
    runtime.enable_compilation_cache()
    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(reporting.summary_markdown(summary))


def run():
    """Console-script entry point (`mmard-train`)."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
