"""What orbax/tensorstore errors say, as one line: the innermost reason behind a failed checkpoint read or write,
and whether it was the operating system refusing a write (full or read-only disk). Text only: no jax, no orbax."""

import contextlib
import logging
import os
import re
import sys
from typing import List, Optional

# How tensorstore words an operating-system failure inside the ValueError it raises for a failed write.
_IO_FAILURE = re.compile(r"os_error_code|No space left|Read-only file system|File too large|Disk quota|"
                         r"Permission denied|Input/output error", re.IGNORECASE)


def error_chain(err: Optional[BaseException]) -> List[BaseException]:
    """`err` and the exceptions it was raised from, outermost first (as Python's traceback shows them)."""
    chain = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)
    return chain


def with_os_reason(line: str, text: str) -> str:
    """`line`, ending in the operating system's words for the error code in `text` when `line` lacks them
    (tensorstore sometimes gives only `[os_error_code='27']`, after a long spec that a summary cuts)."""
    code = re.search(r"os_error_code='?(\d+)", text)
    if not code:
        return line
    reason = os.strerror(int(code.group(1)))
    return line if reason in line else f"{line} [{reason}, os error {code.group(1)}]"


def error_summary(err: BaseException, limit: int = 300) -> str:
    """'Type: first line' of the innermost exception behind `err` (orbax wraps tensorstore's precise error,
    'Error reading ... in OCDBT database ...: Requested byte range ... is not valid', in a generic one)."""
    chain = error_chain(err)
    for e in reversed(chain):
        text = str(e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e).strip()
        if text:
            line = text.splitlines()[0]
            if len(line) > limit:  # keep the end too: tensorstore usually puts the operating system's reason there
                short = f"{line[:limit - limit // 3]} ... {line[-(limit // 3):]}"
                # or in the middle, before a spec
                reason = re.search(r"[^:\"\[\]]{0,80}\[os_error_code='?\d+'?\]", line)
                if reason and reason.group(0) not in short:
                    short = f"{line[:limit // 2]} ... {reason.group(0).strip()} ... {line[-(limit // 6):]}"
                line = short
            return f"{type(e).__name__}: {with_os_reason(line, text)}"
    return type(chain[0]).__name__


def is_io_failure(err: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is the operating system refusing a write."""
    return any(isinstance(e, OSError) or _IO_FAILURE.search(str(e)) for e in error_chain(err))


def is_abandoned_io_noise(exc: BaseException) -> bool:
    """The callbacks of a failed read's or write's other I/O, which tensorstore completes after orbax closed its
    loop."""
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class OrbaxThreadErrors(logging.Filter):
    """Drops ERROR records that orbax or tensorstore code logs (a failed read or write in one of their threads)."""

    def filter(self, record: logging.LogRecord) -> bool:
        where = record.pathname.replace(os.sep, "/")
        return not (record.levelno >= logging.ERROR and ("/orbax/" in where or "/tensorstore/" in where))


class AbandonedIoTasks(logging.Filter):
    """Drops asyncio's 'Task exception was never retrieved' for the other writes of a failed save: orbax gathers
    them, reports the first failure, and the rest surface when their tasks are collected (sooner or later)."""

    def filter(self, record: logging.LogRecord) -> bool:
        failure = record.exc_info[1] if record.exc_info else None
        return not (failure is not None and "never retrieved" in record.getMessage() and is_io_failure(failure))


@contextlib.contextmanager
def quiet_thread_errors(log_filter: Optional[logging.Filter] = None):
    """While orbax reads or writes, and for good once that failed: the failure reaches the caller as one exception
    (the CLIs' one line), not also as the threads' logged tracebacks (the absl records `log_filter` rejects; default
    `OrbaxThreadErrors`), the 'Event loop is closed' noise of the I/O orbax abandons, which arrives after the
    exception, and asyncio's log of the sibling writes' failures (`AbandonedIoTasks`). After a success all three
    are restored."""
    previous_hook, absl_logger = sys.unraisablehook, logging.getLogger("absl")
    log_filter = log_filter or OrbaxThreadErrors()
    tasks_logger, tasks_filter = logging.getLogger("asyncio"), AbandonedIoTasks()

    def hook(unraisable):
        if not is_abandoned_io_noise(unraisable.exc_value):
            previous_hook(unraisable)

    sys.unraisablehook = hook
    absl_logger.addFilter(log_filter)
    tasks_logger.addFilter(tasks_filter)
    yield
    sys.unraisablehook = previous_hook  # reached only after a success
    absl_logger.removeFilter(log_filter)
    tasks_logger.removeFilter(tasks_filter)
