"""Training: `train_and_evaluate(config, workdir)` and its command line.

    python -m mmard_jax.train --config=configs/default.py --workdir=DIR [--config.method.alpha=0.5]

Re-running the same command resumes from the latest checkpoint; an interrupted and resumed run ends with
bitwise the same parameters as an uninterrupted one (data order, augmentation and attack randomness are
functions of (seed, epoch, step), and the whole train state is checkpointed). Outputs in DIR: metrics.jsonl
(one JSON record per epoch), TensorBoard events (tb/), checkpoints/, model.json (the student's spec),
config.json, history.jsonl (every start and resume), accuracy.png and summary.md/json at the end.
Multi-process runs (--coordinator_address/--num_processes/--process_id, or SLURM/Open MPI): see
`mmard_jax.distributed`; every process trains its share of each global batch, process 0 writes these files.
"""

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Dict

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mmard_jax import (
    checkpoints,
    cli,
    config_guard,
    config_lib,
    data,
    distributed,
    evaluator,
    files,
    input_pipeline,
    methods,
    models,
    parallel,
    preemption,
    reporting,
    robustness,
    runtime,
    stopping,
    swa,
    train_step,
    xla_env,
)
from mmard_jax.attacks import autoattack, suite
from mmard_jax.errors import CheckpointError, ConfigError, NonFiniteLossError
from mmard_jax.models import layers, store


def due(step: int, every: int, last: bool = False) -> bool:
    """Whether a periodic action (log, checkpoint, evaluation) falls on `step`: every `every` steps, or at the end."""
    return last or (every > 0 and step % every == 0)


def check_config(config) -> None:
    """Errors that would otherwise surface only after hours of training."""
    for field in ("attacks", "final_attacks"):
        unknown = [a for a in config.eval[field] if a not in suite.ATTACKS]
        if unknown:
            raise ConfigError(f"config.eval.{field}: unknown attack(s) {unknown}; known: {', '.join(suite.ATTACKS)}")
    if config.best_metric not in config.eval.attacks:
        raise ConfigError(f"config.best_metric={config.best_metric!r} is not evaluated during training "
                          f"(config.eval.attacks={tuple(config.eval.attacks)}): the best checkpoint could never be "
                          "chosen")
    for name in ("batch_size", "num_epochs", "eval.batch_size"):
        cli.positive_int(f"config.{name}", _get(config, name))
    for name in ("dataset.n_train", "eval.n_examples"):  # -1 (or any negative) means the whole split
        if _get(config, name) == 0:
            raise ConfigError(f"--config.{name}=0: give a positive number of examples, or -1 for the whole split")
    for block in ("attack", "eval"):
        norm = cli.choice(f"config.{block}.norm", config[block].norm, robustness.NORMS)
        cli.parse_eps(config[block].eps, f"config.{block}.eps", norm=norm)
    input_pipeline.check(config)  # the data set's name, source, pipeline and augmentation
    cli.choice("config.dataset.class_order", config.dataset.get("class_order", ""), ("",) + data.CLASS_ORDERS)
    for name in ("student.arch",) + (("peer.arch",) if config.peer.arch else ()):
        cli.choice(f"config.{name}", _get(config, name), sorted(models.MODELS))
    for name in ("student.conv_grad", "teacher.conv_grad"):
        cli.choice(f"config.{name}", _get(config, name), layers.CONV_GRAD_MODES)
    try:
        config_lib.resolve_method(config.method)
    except ValueError as err:
        raise ConfigError(f"config.method: {err}") from None
    if swa_enabled(config):
        swa.check(config)
    mesh = parallel.data_mesh()
    for name in ("batch_size", "eval.batch_size"):
        parallel.check_divisible(_get(config, name), mesh, f"config.{name}")


def swa_enabled(config) -> bool:
    """Whether the run keeps an SWA student (configs written before `config.swa` existed have none)."""
    return "swa" in config and bool(config.swa.enabled)


def _get(config, dotted: str):
    """config['a.b'] -> config.a.b."""
    for key in dotted.split("."):
        config = config[key]
    return config


@dataclasses.dataclass
class Run:
    """Everything a training run holds besides its state: data, networks, optimizers, outputs."""

    config: Any
    workdir: pathlib.Path
    mesh: Any
    method: methods.Method
    nets: train_step.Networks
    frozen: Dict[str, Any]
    txs: Dict[str, Any]
    schedule: Any
    settings: train_step.StepSettings
    images: Any
    labels: Any
    n_train: int
    input_shape: tuple
    steps_per_epoch: int
    evaluator: evaluator.Evaluator
    ckpt: checkpoints.TrainCheckpoints
    sinks: reporting.MetricSinks
    guard: preemption.PreemptionGuard
    agree: stopping.StopAgreement
    meta: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"best_value": -math.inf, "best_epoch": -1})
    step_fns: Dict[str, Any] = dataclasses.field(default_factory=dict)
    swa_bn: Any = None  # the jitted BN recompute of the SWA student (swa.make_bn_pass) where config.swa is on
    num_classes: int = 0
    epoch_update: Any = None  # the jitted method.epoch_update where the method keeps state across epochs
    initial: Dict[str, Any] = dataclasses.field(default_factory=dict)  # trained networks' starting variables
    test_stream: Any = None  # (source, view) where the evaluation streams in chunks (config.eval.chunk_size > 0)
    feed: Any = None  # the grain stream (data.stream.Stream) of this process's batches where the pipeline streams

    def step_fn(self, phase: str):
        """The compiled step of a phase (built on first use; the streamed step where the pipeline streams)."""
        if phase not in self.step_fns:
            self.step_fns[phase] = train_step.make_train_step(self.nets, self.method, phase, self.txs, self.schedule,
                                                              self.settings, self.mesh, self.config.seed,
                                                              streamed=self.feed is not None)
        return self.step_fns[phase]


def load_data(config):
    """The training and test splits of the config's data set (optionally their first examples only), resident."""
    return input_pipeline.load_by_name(config)


def load_frozen(cfg, role: str, num_classes: int, input_shape, conv_grad: str = "auto"):
    """(module, variables) of a teacher named in the config, its convolutions' input gradient by `conv_grad`;
    clear errors for a missing or mismatched one."""
    if not cfg.checkpoint:
        raise ConfigError(f"this method needs a {role}: set --config.{role}.checkpoint to a model directory "
                          f"(from `python -m mmard_jax.convert`) or a training workdir of this project")
    module, variables = checkpoints.load_model(cfg.checkpoint, dtype=cfg.dtype, input_shape=input_shape,
                                                conv_grad=conv_grad)
    if module.num_classes != num_classes:
        raise ConfigError(f"{role} {cfg.checkpoint} has {module.num_classes} classes, the data set {num_classes}")
    return module, variables


def build_networks(config, method: methods.Method, num_classes: int, input_shape):
    """The step's modules (trained ones with cross-device BatchNorm), the teachers' variables, the student's spec."""
    spec = store.model_spec(config.student.arch, num_classes, dict(config.student.kwargs), input_shape=input_shape)
    trained = {"bn_axis_name": parallel.AXIS, "conv_grad": config.student.conv_grad}
    nets, frozen = {"student": store.build_module(spec, config.student.dtype, **trained)}, {}
    used = method.networks()
    if "peer" in used:
        peer_spec = store.model_spec(config.peer.arch or config.student.arch, num_classes,
                                     dict(config.peer.kwargs) if config.peer.arch else dict(config.student.kwargs))
        nets["peer"] = store.build_module(peer_spec, config.peer.dtype, **trained)
    for role in ("teacher", "teacher2"):
        if role in used:
            nets[role], frozen[role] = load_frozen(config[role], role, num_classes, input_shape,
                                                   config.teacher.conv_grad)
    if "rteacher" in used:  # CIARD: the robust teacher of config.teacher, trained (its variables start the state)
        module, frozen["rteacher"] = load_frozen(config.teacher, "teacher", num_classes, input_shape,
                                                 config.teacher.conv_grad)
        nets["rteacher"] = module.clone(bn_axis_name=parallel.AXIS)
    return train_step.Networks(**nets), frozen, spec


def split_initial(frozen: Dict[str, Any]):
    """(the teachers' variables the step reads, {trained network: the variables it starts from} where not a random
    initialization: CIARD's robust teacher)."""
    initial = {k: v for k, v in frozen.items() if k in methods.core.TRAINED}
    return {k: v for k, v in frozen.items() if k not in initial}, initial


def build_optimizers(config, nets: train_step.Networks, steps_per_epoch: int):
    """One optimizer per trained network (the peer and CIARD's robust teacher have their own blocks), and the
    student's schedule."""
    txs, schedules = {}, {}
    for name in nets.trained():
        opt = {"student": config.optim, "peer": config.peer.optim}.get(name) or config.rteacher.optim
        epochs = opt.get("schedule_epochs", 0) or config.num_epochs
        schedules[name] = train_step.make_lr_schedule(opt.lr, steps_per_epoch, epochs, opt.schedule,
                                                      tuple(opt.boundaries), opt.decay, opt.per_epoch)
        txs[name] = train_step.make_optimizer(schedules[name], opt.momentum, opt.weight_decay, opt.nesterov)
    return txs, schedules["student"]


def step_settings(config) -> train_step.StepSettings:
    a = config.attack
    return train_step.StepSettings(
        eps=a.eps, step_size=a.step_size, steps=a.steps, norm=a.norm, gaussian_scale=a.gaussian_scale, init=a.init,
        student_bn=a.student_bn, unroll=runtime.resolve_unroll(a.unroll), crop_padding=config.dataset.crop_padding,
        flip=config.dataset.flip, base_lr=config.optim.lr)


def setup(config, workdir: pathlib.Path, progress: bool, guard) -> Run:
    """Data, networks, optimizers, evaluator, checkpoints and metric sinks of a run (no state yet)."""
    mesh = parallel.data_mesh()  # its batch sizes divide: check_config ran first
    inputs = input_pipeline.load(config)
    test = inputs.test
    method = config_lib.resolve_method(config.method)
    nets, frozen, spec = build_networks(config, method, inputs.num_classes, inputs.input_shape)
    frozen, initial = split_initial(frozen)
    steps_per_epoch = data.num_train_steps(inputs.n_train, config.batch_size)
    txs, schedule = build_optimizers(config, nets, steps_per_epoch)
    eval_student = store.build_module(spec, config.student.dtype, conv_grad=config.student.conv_grad)
    ev = robustness.make_evaluator(eval_student, test.images, test.labels, mesh=mesh,
                                   batch_size=config.eval.batch_size, eps=config.eval.eps, norm=config.eval.norm,
                                   unroll=runtime.resolve_unroll(config.eval.unroll),
                                   matmul_precision=config.eval.get("matmul_precision", "highest"), progress=progress)
    # Resident: every process holds the whole training split on every device and gathers its batches from it (CIFAR:
    # 150 MB). Streamed: each process reads its rows of every global batch from the source (input_pipeline).
    feed, images, labels = None, None, None
    if inputs.pipeline == "device":
        images, labels = parallel.put_replicated((inputs.train.images, inputs.train.labels), mesh)
    else:
        feed = input_pipeline.open_stream(config, inputs, parallel.local_rows(mesh, config.batch_size))
    with_swa = swa_enabled(config)
    if parallel.is_primary():
        files.write_json_atomic(workdir / store.SPEC_FILE, spec)
        if with_swa:  # the SWA student's model directory: a workdir's layout (model.json, checkpoints/best)
            (workdir / checkpoints.SWA_DIR).mkdir(exist_ok=True)
            files.write_json_atomic(workdir / checkpoints.SWA_DIR / store.SPEC_FILE, spec)
    sinks = reporting.MetricSinks(workdir, progress)
    settings = step_settings(config)
    run = Run(config, workdir, mesh, method, nets, parallel.put_replicated(frozen, mesh), txs, schedule,
              settings, images, labels, inputs.n_train, tuple(inputs.input_shape), steps_per_epoch, ev,
              checkpoints.TrainCheckpoints(workdir, config.best_metric, say=sinks.say, swa=with_swa), sinks,
              guard, stopping.StopAgreement(mesh), feed=feed)
    run.num_classes = inputs.num_classes
    run.initial = initial
    run.test_stream = (inputs.test_source, inputs.test_view) if inputs.test_source is not None else None
    if method.epoch_terms:
        run.epoch_update = jax.jit(method.epoch_update, donate_argnums=(0,), out_shardings=parallel.replicated(mesh))
    if with_swa:
        run.meta.update(swa_best_value=-math.inf, swa_best_epoch=-1)
        if config.swa.bn_recompute:
            run.swa_bn = swa.make_bn_pass(nets.student, settings, mesh, config.seed)
    return run


def saved_form(state: train_step.TrainState) -> Dict[str, Any]:
    """The train state as checkpointed: its fields by name, without `swa` or `epoch_state` when the run keeps none
    (so the checkpoints of runs from before either existed restore unchanged)."""
    form = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    for optional in ("swa", "epoch_state"):
        if form[optional] is None:
            del form[optional]
    return form


def restore_or_init(run: Run):
    """The train state and best-checkpoint bookkeeping: restored from the latest checkpoint, or fresh."""
    key = jax.random.key(run.config.seed, impl="rbg")  # RBG init keys: threefry init programs compile slowly on CPU
    swa_init = swa.init if swa_enabled(run.config) else None
    state = parallel.put_replicated(
        train_step.init_state(run.nets, run.method, run.txs, key, run.input_shape, swa_init=swa_init,
                              num_classes=run.num_classes, initial=run.initial), run.mesh)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), saved_form(state))
    restored = run.ckpt.restore(abstract)
    if restored is None:
        return state
    form, meta = restored
    state = train_step.TrainState(**form)
    stream_state = meta.pop(input_pipeline.STATE_KEY, None)
    if run.feed is not None:
        if stream_state is None:
            raise CheckpointError(f"{run.workdir / checkpoints.LATEST}: the checkpoint of step {int(state.step)} "
                                  "holds no input stream position (written by the device pipeline?)")
        run.feed.restore(stream_state)  # grain's iterator continues exactly after the saved step's batch
    run.meta = {**run.meta, **meta}
    run.sinks.say(f"resumed from step {int(state.step)} ({run.workdir})")
    return state


def begin_epoch(run: Run, state, epoch: int):
    """The method's epoch states at the start of `epoch` (0-based): after every epoch but the first, the previous
    epoch's sums turned into this epoch's values (Fair-ARD's class weights, Fair-ARD.py:165-167), by a pure
    function. Applied when the state stands exactly at the epoch's first step, which every checkpoint saved at an
    epoch's end does (never in between): an uninterrupted run and one resumed from any checkpoint agree bitwise."""
    if run.epoch_update is None or epoch == 0 or int(state.step) != epoch * run.steps_per_epoch:
        return state
    # The coming epoch's first learning rate / the base rate (ABSLD's temperature rate decays with it), host side.
    lr_scale = np.float32(float(run.schedule(int(state.step))) / run.settings.base_lr)
    return state.replace(epoch_state=run.epoch_update(state.epoch_state, lr_scale))


def train_epoch(run: Run, state, epoch: int):
    """One epoch of steps from wherever the state is; returns the state and the epoch's mean training metrics."""
    cfg, spe = run.config, run.steps_per_epoch
    step_fn = run.step_fn(run.method.phase(epoch))
    if run.feed is None:
        batches = parallel.put_batch(
            data.train_batch_indices(cfg.seed, epoch, run.n_train, cfg.batch_size), run.mesh, axis=1)

        def batch(i):  # the resident split and the global batch's indices into it
            return run.images, run.labels, batches[i]
    else:
        def batch(i):  # this process's rows of the global batch, read and augmented by grain ahead of the step
            images, labels = run.feed.next()
            return (parallel.put_process_batch(images, run.mesh, cfg.batch_size),
                    parallel.put_process_batch(labels.astype(np.int32), run.mesh, cfg.batch_size))
    epoch_t = np.asarray(epoch, np.int32)
    first = int(state.step) - epoch * spe
    run.sinks.start_epoch(epoch, cfg.num_epochs, spe, first)
    history, chunks = [], []
    try:
        for i in range(first, spe):
            state, metrics = step_fn(state, run.frozen, *batch(i), epoch_t)
            history.append(metrics)
            step = epoch * spe + i + 1
            if due(step, cfg.log_every_steps, last=i == spe - 1):
                chunks.append(run.sinks.train_metrics(step, history, cfg.batch_size))
                history = []
            if run.guard.should_stop(step, agree=run.agree.lagged):
                save_latest(run, state)
                raise run.guard.error(step)
            if due(step, cfg.checkpoint_every_steps) and i < spe - 1:
                save_latest(run, state)
            run.sinks.advance()
    finally:
        run.sinks.end_epoch()  # also before an error (a failed save, a preemption) is printed: it ends the bar's line
    _raise_if_nonfinite(state, run.ckpt)
    return state, reporting.weighted_means(chunks)


def n_test(run: Run) -> int:
    """How many test examples an evaluation covers (a streamed one: the source's, up to config.eval.n_examples)."""
    if run.test_stream is None:
        return run.evaluator.n
    n, limit = len(run.test_stream[0]), run.config.eval.n_examples
    return n if limit <= 0 else min(n, limit)


def evaluate(run: Run, variables, attacks, seed: int) -> robustness.RobustnessReport:
    """The student under `attacks` on the test split: resident, or streamed chunk by chunk through the run's
    evaluator (its compiled programs reused every epoch) where config.eval.chunk_size > 0."""
    if run.test_stream is None:
        return robustness.run(run.evaluator, variables, attacks, seed=seed, checks=False)
    source, view = run.test_stream
    cfg = run.config
    return robustness.evaluate_source(None, variables, source, transform=view, attacks=attacks, seed=seed,
                                      chunk_size=cfg.eval.chunk_size, n_examples=cfg.eval.n_examples,
                                      workers=input_pipeline.setting(cfg.dataset, "workers"),
                                      prepared=run.evaluator, progress=False, checks=False)


def evaluate_epoch(run: Run, variables, epoch: int, prefix: str = "test") -> Dict[str, Any]:
    """Test accuracies of a student (`prefix` 'test': the student, 'swa_test': the SWA student) after `epoch`
    (1-based) under the training-time attacks, as `{prefix}_{attack}`, and their per-class numbers
    (`robustness.per_class`) under `per_class_{prefix}`."""
    report = evaluate(run, variables, run.config.eval.attacks, eval_seed(run.config, epoch))
    return {**{f"{prefix}_{k}": v for k, v in report.accuracy.items()}, f"per_class_{prefix}": report.per_class}


def student_variables(state) -> Dict[str, Any]:
    return {"params": state.student.params, "batch_stats": state.student.batch_stats}


def update_best(run: Run, state, meta, record, swa_student: bool = False) -> Dict[str, Any]:
    """Saves the student's (`swa_student`: the SWA student's) best checkpoint when this epoch's best-metric
    accuracy is its highest so far."""
    prefix, key = ("swa_test", "swa_best") if swa_student else ("test", "best")
    value = record.get(f"{prefix}_{run.config.best_metric}")
    if value is None or value <= meta[f"{key}_value"]:
        return meta
    variables = swa.variables(state.swa) if swa_student else student_variables(state)
    run.ckpt.save_best(int(state.step), variables, value, swa=swa_student)
    return {**meta, f"{key}_value": value, f"{key}_epoch": record["epoch"]}


def final_evaluation(run: Run, meta, records, swa_student: bool = False) -> Dict[str, Any]:
    """The best checkpoint (`swa_student`: the SWA student's) under every final attack, with the best epoch's
    evaluation seed: the attacks that evaluation already ran give the same numbers, so they are taken from its
    record. Returns {'accuracy': {attack: value}, 'per_class': {attack: robustness.per_class entry}}."""
    prefix, key, directory = (("swa_test", "swa_best", run.workdir / checkpoints.SWA_DIR) if swa_student
                              else ("test", "best", run.workdir))
    attacks = tuple(run.config.eval.final_attacks)
    best_epoch = meta.get(f"{key}_epoch", -1)
    best_record = next((r for r in records if r["epoch"] == best_epoch), {})
    final = {a: best_record[f"{prefix}_{a}"] for a in attacks if f"{prefix}_{a}" in best_record}
    per_class = {a: v for a, v in best_record.get(f"per_class_{prefix}", {}).items() if a in final}
    missing = [a for a in attacks if a not in final]
    if missing:
        _, variables = checkpoints.load_model(directory, dtype=run.config.student.dtype,
                                              input_shape=run.input_shape)
        report = evaluate(run, variables, missing, eval_seed(run.config, best_epoch))
        final.update(report.accuracy)
        per_class.update(report.per_class)
    return {"accuracy": {a: final[a] for a in attacks}, "per_class": {a: per_class[a] for a in attacks
                                                                       if a in per_class}}


def swa_after_epoch(run: Run, state, epochs_done: int):
    """The SWA student after `epochs_done` epochs: the student's parameters averaged in and its BatchNorm
    statistics recomputed when due (swa.due); the state unchanged otherwise."""
    if not swa.due(run.config, epochs_done):
        return state
    averaged = jax.jit(swa.average, donate_argnums=(0,))(state.swa, state.student.params)
    if run.swa_bn is not None:
        idx = parallel.put_batch(swa.bn_batches(run.config.seed, epochs_done - 1, run.n_train, run.config.batch_size),
                                 run.mesh, axis=1)
        stats = run.swa_bn(averaged.params, averaged.batch_stats, run.images, run.labels, idx,
                           np.asarray(epochs_done - 1, np.int32))
        averaged = averaged.replace(batch_stats=stats)
    return state.replace(swa=averaged)


def swa_catch_up(run: Run, state):
    """A run stopped right after an epoch's last step (before that epoch's SWA update was saved) does that
    update on resume, so that the resumed run holds what an uninterrupted one does."""
    if state.swa is None or int(state.step) % run.steps_per_epoch:
        return state
    done = int(state.step) // run.steps_per_epoch
    if int(state.swa.count) < swa.expected_count(run.config, done):
        state = swa_after_epoch(run, state, done)
    return state

def save_latest(run: Run, state) -> None:
    """The latest checkpoint: the train state, the best-checkpoint bookkeeping and, where the pipeline streams, the
    grain iterator's state (JSON in the metadata; every process's is the same: they read in lockstep)."""
    _raise_if_nonfinite(state, run.ckpt)
    meta = run.meta if run.feed is None else {**run.meta, input_pipeline.STATE_KEY: run.feed.state()}
    run.ckpt.save_latest(saved_form(state), meta)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, progress: bool = True,
                       extend_epochs: bool = False) -> Dict[str, Any]:
    """Trains the student of `config` in `workdir` (resuming if a checkpoint is there) and evaluates it.

    Returns the summary (also written to summary.md / summary.json). One writer per workdir (a lock), a
    resume must use the same settings (`config_guard`), SIGTERM/SIGINT save the state and stop cleanly.
    """
    workdir = pathlib.Path(workdir).absolute()
    check_config(config)
    workdir.mkdir(parents=True, exist_ok=True)
    with distributed.workdir_lock(workdir) as lock, stopping.on_hard_exit(lock.release if lock else None), \
            preemption.PreemptionGuard() as guard:
        record_start(workdir, config, extend_epochs)
        run = setup(config, workdir, progress, guard)
        state = restore_or_init(run)
        if swa_enabled(config):
            state = swa_catch_up(run, state)
        run.sinks.open(int(state.step))
        run.sinks.say(f"{config.method.name}: {config.student.arch} on {config.dataset.name} ({run.n_train} train / "
                      f"{n_test(run)} test), {run.steps_per_epoch} steps/epoch x {config.num_epochs} epochs, "
                      f"batch {config.batch_size} on {run.mesh.devices.size} device(s), "
                      f"{jax.process_count()} process(es)")
        for epoch in range(int(state.step) // run.steps_per_epoch, config.num_epochs):
            start = time.perf_counter()
            state = begin_epoch(run, state, epoch)
            state, train_means = train_epoch(run, state, epoch)
            record = {"epoch": epoch + 1, "step": int(state.step), **{f"train_{k}": v for k, v in train_means.items()}}
            if state.epoch_state is not None:  # e.g. Fair-ARD's weights used this epoch and its Kappa
                record.update(run.method.epoch_summary(jax.device_get(state.epoch_state)))
            if swa_enabled(config):
                state = swa_after_epoch(run, state, epoch + 1)
            if due(epoch + 1, config.eval.every_epochs, last=epoch + 1 == config.num_epochs):
                record.update(evaluate_epoch(run, student_variables(state), epoch + 1))
                run.meta = update_best(run, state, run.meta, record)
                if swa_enabled(config) and int(state.swa.count) > 0:  # PeerAiD main.py:625, 742: once started
                    record.update(evaluate_epoch(run, swa.variables(state.swa), epoch + 1, prefix="swa_test"))
                    run.meta = update_best(run, state, run.meta, record, swa_student=True)
            record["seconds"] = time.perf_counter() - start
            run.sinks.epoch(record)
            save_latest(run, state)
            if run.guard.should_stop(int(state.step), agree=run.agree.now) and epoch + 1 < config.num_epochs:
                raise run.guard.error(int(state.step))
        final = final_evaluation(run, run.meta, run.sinks.records) if config.eval.final_attacks else {}
        swa_info = None
        if swa_enabled(config):
            swa_final = (final_evaluation(run, run.meta, run.sinks.records, swa_student=True)
                         if config.eval.final_attacks and run.meta.get("swa_best_epoch", -1) > 0 else {})
            swa_info = {"start_epoch": swa.resolve_start(config), "snapshots": int(state.swa.count),
                        "final": swa_final}
        run.sinks.close()
        run.ckpt.close()
        if run.feed is not None:
            run.feed.close()
        return reporting.finish_run(workdir, config, run.sinks.records, run.meta, final, evaluation_notes(config),
                                    swa=swa_info)


def record_start(workdir: pathlib.Path, config, extend_epochs: bool) -> None:
    """Refuses a resume whose settings change what is trained (config_guard); records every start in history.jsonl."""
    new = json.loads(config.to_json_best_effort())
    new["fingerprints"] = teacher_fingerprints(config)

    def check_and_record():  # by process 0 only: the workdir's files are shared; the others get its verdict
        # Without a saved state (a start that failed before its first checkpoint) there is nothing to resume.
        old = config_guard.load_saved_config(workdir) if checkpoints.holds_run(workdir) else None
        changes = config_guard.check_resume(old, new, allow_extend=extend_epochs, workdir=workdir) if old else []
        kind = "start" if old is None else ("extend" if any(c.key == "num_epochs" for c in changes) else "resume")
        config_guard.append_history(workdir, config_guard.history_record(changes, kind))
        files.write_json_atomic(workdir / "config.json", new)  # after an allowed resume: cadence/locations/epochs

    distributed.on_primary(check_and_record)


def teacher_fingerprints(config) -> Dict[str, str]:
    """What the teachers the method uses hold (checkpoints.fingerprint), recorded in config.json: a resume whose teacher
    changed behind the same path is refused like any other change of what is trained."""
    used = set(config_lib.resolve_method(config.method).networks())
    if "rteacher" in used:  # CIARD's trained robust teacher starts from config.teacher
        used.add("teacher")
    return {role: checkpoints.fingerprint(config[role].checkpoint) if pathlib.Path(config[role].checkpoint).is_dir()
            else "missing" for role in ("teacher", "teacher2") if role in used}


def evaluation_notes(config) -> Dict[str, str]:
    """What the summary says of the final evaluation: AutoAttack's version (only a float32 model at full
    precision with the standard settings is 'standard')."""
    if "aa" not in config.eval.final_attacks:
        return {}
    version = autoattack.describe(autoattack.STANDARD, compute_dtype=config.student.dtype,
                                  matmul_precision=config.eval.get("matmul_precision", "highest"))
    return {"AutoAttack": version}


def eval_seed(config, epoch: int) -> int:
    """The attack seed of the evaluation after `epoch` (1-based): fresh randomness every epoch."""
    return config.seed + 1000 * epoch


def _raise_if_nonfinite(state: train_step.TrainState, ckpt: checkpoints.TrainCheckpoints) -> None:
    bad = int(state.bad_step)
    if bad >= 0:
        kept = ckpt.last_good_step()
        where = (f"the last good checkpoint (step {kept}) is kept in {ckpt.directory / checkpoints.LATEST}"
                 if kept is not None else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"the loss or a gradient became NaN/inf at step {bad}; training stopped and {where}. "
            f"Lower --config.optim.lr, check the teacher checkpoint, or try float32 (--config.student.dtype=float32).")


FLAGS = flags.FLAGS


def define_flags():
    """The CLI's flags, defined only when run as a program (the module is also a library)."""
    config_flags.DEFINE_config_file("config", None, "Training configuration file (ml_collections).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports (resumes if it holds a run).")
    flags.DEFINE_bool("extend_epochs", False, "Allow a resume with a larger --config.num_epochs (recorded in "
                      "history.jsonl; the learning-rate schedule is then that of the longer run).")
    distributed.define_flags()
    xla_env.define_flags()
    runtime.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    xla_env.apply_cpu_defaults(FLAGS.xla_cpu_defaults)  # first: before anything may start a JAX backend
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.quiet_logging()  # before joining: jax.distributed logs at INFO level
    distributed.initialize_from_flags()
    with stopping.exit_on_lost_process(FLAGS.heartbeat_timeout):
        runtime.enable_compilation_cache(FLAGS.compilation_cache)
        summary = train_and_evaluate(FLAGS.config, FLAGS.workdir, extend_epochs=FLAGS.extend_epochs)
        if parallel.is_primary():
            print(reporting.summary_markdown(summary))


def run():
    """Console-script entry point (`mmard-train`)."""
    define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
