"""Training checkpoints of a workdir: the latest train states, for resuming, and the best student.

    WORKDIR/checkpoints/latest/<step>/{state,meta}   the whole train state + {best_value, best_epoch}
    WORKDIR/checkpoints/best/<step>/variables        the student's variables at the best evaluation
    WORKDIR/swa/checkpoints/best/<step>/variables    the SWA student's at its best evaluation (config.swa)

Both are orbax `CheckpointManager`s, written synchronously (the train state's buffers are donated to the
next step, so a save must finish first) and atomically (orbax writes a temporary directory and renames
it). Two latest states are kept so that a damaged newest one falls back to the one before; a workdir
whose checkpoints are all unreadable is refused, never restarted from scratch. An unreadable newer
checkpoint is moved to `checkpoints/unreadable/` (kept for inspection), so that its step is written
again. A write that fails (full or read-only disk) leaves the previous checkpoint intact and raises
CheckpointWriteError. Every process of a multi-process run calls every method here (orbax's protocol:
the primary process writes metadata).

A workdir's model.json (the student's spec) and its best student make it usable as a model directory:
`load_model` and `fingerprint` read a model directory or a workdir (`variables_dir` knows both layouts).
WORKDIR/swa has the same layout (model.json and checkpoints/best), so it is a model directory too.
"""

import datetime
import logging
import os
import pathlib
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from mmard_jax.errors import CheckpointError, CheckpointWriteError
from mmard_jax.models import store
from mmard_jax.tensorstore_errors import error_summary, is_io_failure, quiet_thread_errors

LATEST = "checkpoints/latest"
BEST = "checkpoints/best"  # the best student: <step>/variables (an orbax CheckpointManager)
SWA_DIR = "swa"  # the SWA student's model directory inside a workdir (a workdir's layout: model.json, BEST)
SWA_BEST = f"{SWA_DIR}/{BEST}"
UNREADABLE = "checkpoints/unreadable"  # where unreadable latest checkpoints are moved on a fallback
KEEP_LATEST = 2


def _manager(directory: pathlib.Path, max_to_keep: int, best_metric: Optional[str] = None) -> ocp.CheckpointManager:
    """A synchronous orbax CheckpointManager keeping `max_to_keep` steps (by `best_metric` if given)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode="max",
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def committed_steps(directory) -> list:
    """The steps of an orbax manager directory whose writes completed (integer names; temporaries excluded)."""
    directory = pathlib.Path(directory)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def holds_run(workdir) -> bool:
    """Whether a workdir holds a run's saved state (a latest or best checkpoint, readable or not): then a
    restart must resume it (or refuse); without one there is nothing to resume and a start is a fresh one."""
    workdir = pathlib.Path(workdir)
    return bool(committed_steps(workdir / LATEST) or committed_steps(workdir / BEST))


def best_step(directory: pathlib.Path) -> Optional[int]:
    """The step of a workdir's best checkpoint (the highest finished step directory), None if there is none."""
    steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit() and (p / store.VARIABLES_DIR).is_dir()]
    return max(steps) if steps else None


def variables_dir(directory) -> pathlib.Path:
    """Where a model directory or a training workdir (its best student) keeps the model's variables."""
    directory = pathlib.Path(directory)
    if (directory / store.VARIABLES_DIR).is_dir():
        return directory / store.VARIABLES_DIR
    if (directory / BEST).is_dir():
        step = best_step(directory / BEST)
        if step is None:
            raise CheckpointError(f"{directory / BEST} holds no checkpoint yet (no evaluation has finished)")
        return directory / BEST / str(step) / store.VARIABLES_DIR
    raise CheckpointError(f"{directory}: found {store.SPEC_FILE} but neither {store.VARIABLES_DIR}/ nor {BEST}/")


def load_model(directory, dtype: str = "float32", input_shape=None,
               conv_grad: str = "auto") -> Tuple[Any, Dict[str, Any]]:
    """(module, variables) of a model directory or of a training workdir's best student (`store.load_model`: at the
    input shape its model.json records unless `input_shape`, the data's, is given)."""
    return store.load_model(directory, dtype, input_shape, locate=variables_dir, conv_grad=conv_grad)


def fingerprint(directory) -> str:
    """`store.fingerprint` of a model directory or a training workdir (its best student)."""
    return store.fingerprint(directory, locate=variables_dir)


class _OrbaxThreadFailure(logging.Filter):
    """Drops orbax's log of an exception in its save thread: the same exception reaches the caller of the save."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.pathname.endswith(os.path.join("futures", "future.py")) and "orbax" in record.pathname
                    and "raised an exception" in record.getMessage())


class TrainCheckpoints:
    """The latest train states (two kept) and the best student of one workdir; the trainer's only orbax user."""

    def __init__(self, workdir, best_metric: str, say: Callable[[str], None] = print, swa: bool = False):
        self.directory = pathlib.Path(workdir).absolute()
        self._latest = _manager(self.directory / LATEST, KEEP_LATEST)
        self._best = _manager(self.directory / BEST, 1, best_metric)
        self._best_swa = _manager(self.directory / SWA_BEST, 1, best_metric) if swa else None
        self._best_metric = best_metric
        self._say = say

    def has_run(self) -> bool:
        """Whether the workdir holds any latest checkpoint (readable or not)."""
        return bool(self._latest.all_steps())

    def last_good_step(self) -> Optional[int]:
        """The step of the newest latest-checkpoint (None if none was written)."""
        return self._latest.latest_step()

    def restore(self, abstract_state) -> Optional[Tuple[Any, Dict[str, Any]]]:
        """(state, meta) from the newest readable latest checkpoint, None in a fresh workdir.

        A checkpoint that cannot be read is reported and the one before it tried; once one is read, the
        unreadable newer ones are moved to checkpoints/unreadable/ so that their steps are saved again. If
        none can be read the workdir is refused (CheckpointError): a damaged run is never restarted from scratch.
        """
        steps = sorted(self._latest.all_steps(), reverse=True)
        unreadable = []
        for step in steps:
            try:
                restored = self._latest.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as err:  # orbax/tensorstore raise many types for truncated or missing files
                unreadable.append((step, error_summary(err)))
                self._say(f"checkpoint {self.directory / LATEST / str(step)} is unreadable: {error_summary(err)}")
                continue
            if unreadable:
                self._set_aside([s for s, _ in unreadable])
                self._say(f"resuming from the previous good checkpoint, step {step}")
            return restored["state"], dict(restored["meta"])
        if unreadable:
            reasons = "; ".join(f"step {s}: {why}" for s, why in unreadable)
            raise CheckpointError(
                f"{self.directory / LATEST}: no checkpoint can be read ({reasons}); refusing to start from scratch "
                f"over a run: move the workdir away to start anew")
        return None

    def _set_aside(self, steps) -> None:
        """Moves unreadable latest checkpoints to checkpoints/unreadable/<step>-<time> (the primary process)."""
        if jax.process_index() == 0:
            stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
            for step in steps:
                target = self.directory / UNREADABLE / f"{step}-{stamp}"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.directory / LATEST / str(step), target)
                self._say(f"moved the unreadable checkpoint of step {step} to {target}")
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("mmard_jax_unreadable_set_aside")
        self._latest.reload()

    def save_latest(self, state, meta: Dict[str, Any]) -> None:
        """Saves the train state (an object or a dict with a `step`) at its step (no-op if that step is saved
        already)."""
        step = int(state["step"] if isinstance(state, dict) else state.step)
        if step in self._latest.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._guarded_save(self._latest, step, args, None, LATEST)

    def save_best(self, step: int, variables, value: float, swa: bool = False) -> None:
        """Saves the student's (`swa`: the SWA student's) variables as its best checkpoint (evaluated `value` of the
        best metric)."""
        manager, where = (self._best_swa, SWA_BEST) if swa else (self._best, BEST)
        if step in manager.all_steps():
            return
        args = ocp.args.Composite(variables=ocp.args.StandardSave(variables))
        self._guarded_save(manager, step, args, {self._best_metric: value}, where)

    def _guarded_save(self, manager, step, args, metrics, where: str) -> None:
        """One save; an I/O failure becomes CheckpointWriteError naming the step kept intact (other errors,
        bugs, keep their traceback)."""
        try:
            # A failed write is told once, as CheckpointWriteError (orbax's logged thread traceback dropped).
            with quiet_thread_errors(_OrbaxThreadFailure()):
                manager.save(step, args=args, metrics=metrics, force=True)
                manager.wait_until_finished()
        except Exception as err:  # tensorstore reports a failed write as a ValueError carrying the OS error
            if not is_io_failure(err):
                raise
            kept = max(committed_steps(self.directory / where), default=None)  # on disk, not orbax's own list
            raise CheckpointWriteError(
                f"could not write checkpoint step {step} to {self.directory / where} ({error_summary(err)}); "
                f"the previous checkpoint ({'step ' + str(kept) if kept is not None else 'none'}) is intact: "
                f"free disk space or fix permissions, then rerun the same command") from err

    def close(self) -> None:
        """Waits for and releases the managers."""
        self._latest.close()
        self._best.close()
        if self._best_swa is not None:
            self._best_swa.close()
