"""SIGTERM/SIGINT in the training loop: a first signal stops cleanly (finish the step, save, exit), a second at once.

    with preemption.PreemptionGuard() as guard:
        for step in ...:
            state = train_step(state)
            if guard.should_stop(step):          # multi-process: guard.should_stop(step, agree=any_process)
                save_checkpoint(state)
                raise guard.error(step)          # "preempted at step N; rerun the same command to resume"

Exit statuses (with `cli.run`, which turns PreemptedError into one line on stderr):
  128+N  after the first signal N, once the caller saved and raised PreemptedError: 143 for SIGTERM, 130 for SIGINT
         (the shell's status of a program ended by that signal; schedulers read it as "preempted, may requeue").
  killed by signal N  on a second signal: the handler restores the default action and re-sends the signal, so the
         process ends at once without saving (a parent sees returncode -N, a shell 128+N). The previous
         checkpoint survives: every checkpoint write is a temporary file or directory renamed into place.
Python runs signal handlers between bytecodes in the main thread, so a signal that arrives during one long
device call is seen when that call returns (within a step); SIGKILL is the only truly immediate stop.
"""

import os
import signal
import threading
from typing import Callable, Dict, Optional, Sequence

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptedError(Exception):
    """The run stopped after a SIGTERM/SIGINT at `step`, having saved; rerunning the command resumes it."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step = int(step)
        self.signum = int(signum)
        self.exit_status = 128 + self.signum
        super().__init__(f"preempted at step {self.step}; rerun the same command to resume")

    def __reduce__(self):
        return type(self), (self.step, self.signum)


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15 (the number itself for an unnamed signal)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _write_stderr(text: str) -> None:
    """Unbuffered write to fd 2: safe inside a signal handler even while the main code is writing to sys.stderr."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


class PreemptionGuard:
    """Context manager: installs the SIGTERM/SIGINT handlers of a training loop, restores the old ones on exit."""

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.signum: Optional[int] = None  # the first signal received, None while none came
        self.stopped_at: Optional[int] = None  # the step at which should_stop first returned True
        self._previous: Dict[int, object] = {}

    # -- installing and restoring

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread (Python runs signal handlers there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Puts back the handlers that were installed before __enter__ (idempotent)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        """First signal: set the flag and say what happens next. Second: end the process now, by that signal."""
        del frame
        if self.signum is None:
            self.signum = signum
            _write_stderr(f"received {signal_name(signum)}: finishing step, saving, then exiting "
                          f"(a second signal exits at once, without saving)\n")
            return
        _write_stderr(f"received {signal_name(signum)} again: exiting now, without saving\n")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # only reached if the signal is blocked or ignored by default

    # -- the loop's questions

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signum is not None

    def should_stop(self, step: Optional[int] = None, agree: Optional[Callable[[bool], bool]] = None) -> bool:
        """Whether to stop after `step`: the local flag, or `agree(flag)` (a cross-process OR) so all stop together."""
        # Single process: the local flag. Multi-process: `agree` is a collective (e.g. an all-reduce of the flag) that
        # every process calls at the same steps, so that all of them stop, and save, at the same step.
        stop = bool(agree(self.requested)) if agree is not None else self.requested
        if stop and self.stopped_at is None and step is not None:
            self.stopped_at = int(step)
        return stop

    def error(self, step: int) -> PreemptedError:
        """The PreemptedError to raise after saving at `step` (its exit status follows the signal received)."""
        return PreemptedError(step, self.signum if self.signum is not None else signal.SIGTERM)
