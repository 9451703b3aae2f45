"""Training checkpoints of a workdir: the latest train states, for resuming, and the best student.

    WORKDIR/checkpoints/latest/<step>/{state,meta}   the whole train state + {best_value, best_epoch}
    WORKDIR/checkpoints/best/<step>/variables        the student's variables at the best evaluation

Both are orbax `CheckpointManager`s, written synchronously (the train state's buffers are donated to the
next step, so a save must finish first) and atomically (orbax writes a temporary directory and renames
it). Two latest states are kept so that a damaged newest one falls back to the one before; a workdir
whose checkpoints are all unreadable is refused, never restarted from scratch. Every process of a
multi-process run calls every method here (orbax's protocol: the primary process writes metadata).
"""

import pathlib
from typing import Any, Callable, Dict, Optional, Tuple

import orbax.checkpoint as ocp

from mmard_jax.models.store import BEST, CheckpointError

LATEST = "checkpoints/latest"
KEEP_LATEST = 2


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (read-only or full disk); the previous one is intact."""


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


class TrainCheckpoints:
    """The latest train states (two kept) and the best student of one workdir; the trainer's only orbax user."""

    def __init__(self, workdir, best_metric: str, say: Callable[[str], None] = print):
        self.directory = pathlib.Path(workdir).absolute()
        self._latest = _manager(self.directory / LATEST, KEEP_LATEST)
        self._best = _manager(self.directory / BEST, 1, best_metric)
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

        A checkpoint that cannot be read is reported and the one before it tried; if none can be read the
        workdir is refused (CheckpointError), so a damaged run is never silently restarted from scratch.
        """
        steps = sorted(self._latest.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                restored = self._latest.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as err:  # orbax/tensorstore raise many types for truncated or missing files
                failures.append(f"step {step} ({_first_line(err)})")
                self._say(f"checkpoint {self.directory / LATEST / str(step)} is unreadable: {_first_line(err)}")
                continue
            if failures:
                self._say(f"resuming from the previous good checkpoint, step {step}")
            return restored["state"], dict(restored["meta"])
        if failures:
            raise CheckpointError(
                f"{self.directory / LATEST}: no checkpoint can be read ({'; '.join(failures)}); refusing to start "
                f"from scratch over a run: move the workdir away to start anew")
        return None

    def save_latest(self, state, meta: Dict[str, Any]) -> None:
        """Saves the train state at its step (no-op if that step is saved already)."""
        step = int(state.step)
        if step in self._latest.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._guarded_save(self._latest, step, args, None, LATEST)

    def save_best(self, step: int, variables, value: float) -> None:
        """Saves the student's variables as the best checkpoint (evaluated `value` of the best metric)."""
        if step in self._best.all_steps():
            return
        args = ocp.args.Composite(variables=ocp.args.StandardSave(variables))
        self._guarded_save(self._best, step, args, {self._best_metric: value}, BEST)

    def _guarded_save(self, manager, step, args, metrics, where: str) -> None:
        """One save; an I/O failure becomes CheckpointWriteError naming the step kept intact."""
        try:
            manager.save(step, args=args, metrics=metrics, force=True)
            manager.wait_until_finished()
        except OSError as err:
            kept = manager.latest_step()
            raise CheckpointWriteError(
                f"could not write checkpoint step {step} to {self.directory / where} ({_first_line(err)}); "
                f"the previous checkpoint ({'step ' + str(kept) if kept is not None else 'none'}) is intact: "
                f"free disk space or fix permissions, then rerun the same command") from err

    def close(self) -> None:
        """Waits for and releases both managers."""
        self._latest.close()
        self._best.close()
