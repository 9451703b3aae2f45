"""One-line errors for the CLIs: what a user can fix is one line and status 2; bugs keep their traceback.

    from mmard_jax import cli
    cli.run(main)          # instead of absl's app.run(main)

Exit statuses of a program started with `run`:
  0    success
  1    a programming error (or any exception not listed below): Python's traceback is printed
  2    a user error: exactly one line `PROG: error: MESSAGE` on stderr, no traceback
  130  interrupted by Ctrl-C outside a PreemptionGuard (`PROG: interrupted`)
  128+N  a `preemption.PreemptedError` after signal N (143 for SIGTERM, 130 for SIGINT): the run saved and stopped

User errors are `errors.UserError` and its subclasses (every error class of the project a user can fix), absl's
flag errors and `app.UsageError`, and config files that ml_collections cannot load or overrides naming keys the
config lacks. Set MMARD_JAX_TRACEBACK=1 to get the full traceback of a user error too.
"""

import difflib
import math
import os
import pathlib
import re
import sys
import traceback
from typing import Any, Callable, List, Optional, Sequence

from absl import app, flags

from mmard_jax import preemption
from mmard_jax.errors import UserError

TRACEBACK_ENV = "MMARD_JAX_TRACEBACK"
USER_ERROR_STATUS = 2
INTERRUPT_STATUS = 130
# Errors a user can fix besides the project's own: absl's flag errors (IllegalFlagValueError, ...) and UsageError.
_ABSL_USER_ERRORS = (flags.Error, app.UsageError)
# Raised by ml_collections when a program touches a config whose file could not be loaded.
_CONFIG_NOT_LOADED = "Configuration is not available because of an earlier failure to load"
_CONFIG_PARSE = "Error whilst parsing config file:"


# ---------------------------------------------------------------- classifying and formatting


def one_line(text: str) -> str:
    """A message folded onto one line: its lines stripped and joined by '; ' (by ' ' after a line ending in ':')."""
    out = ""
    for line in (s.strip() for s in str(text).splitlines()):
        if not line:
            continue
        out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def _main_module_name() -> Optional[str]:
    """The importable name of __main__ ('mmard_jax.train' under `python -m`), for PROG in messages."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None)


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is one a user can fix (see the module docstring), rather than a bug."""
    if isinstance(err, (UserError,) + _ABSL_USER_ERRORS):
        return True
    return isinstance(err, OSError) and str(err).startswith(_CONFIG_NOT_LOADED)


def _program_name() -> str:
    """PROG in messages: the module under `python -m`, else the script or console-script name."""
    name = _main_module_name()
    if name and name != "__main__":
        return name.removesuffix(".__main__")
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def _message(err: BaseException) -> str:
    """The user-facing text of an error (ml_collections' embedded traceback reduced to its last line)."""
    text = str(err)
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    if _CONFIG_PARSE in text:  # "flag --config=F: Error whilst parsing config file:\n\nTraceback ...\nValueError: ..."
        head = text.split(_CONFIG_PARSE, 1)[0]
        last = [s for s in text.splitlines() if s.strip()][-1].strip()
        return one_line(f"{head}the config file raised {last}")
    if isinstance(err, flags.Error):
        text += " (--helpshort lists the flags)"
    return one_line(text) or type(err).__name__


def fail(message: str, status: int = USER_ERROR_STATUS, prog: Optional[str] = None) -> None:
    """Prints `PROG: error: MESSAGE` as one line on stderr and exits with `status` (2: a user error)."""
    sys.stdout.flush()
    sys.stderr.write(f"{prog or _program_name()}: error: {one_line(message)}\n")
    sys.stderr.flush()
    sys.exit(status)


def _report(err: BaseException, prog: Optional[str]) -> None:
    """Exits for a user error or a preemption (one line); returns for anything else (the caller re-raises)."""
    if not (isinstance(err, preemption.PreemptedError) or is_user_error(err)):
        return
    if os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes"):
        traceback.print_exc()
    if isinstance(err, preemption.PreemptedError):
        sys.stdout.flush()
        sys.stderr.write(f"{prog or _program_name()}: {one_line(str(err))}\n")
        sys.stderr.flush()
        sys.exit(err.exit_status)
    fail(_message(err), prog=prog)


# ---------------------------------------------------------------- absl programs


def main_wrapper(main: Callable[[List[str]], Any], prog: Optional[str] = None) -> Callable[[List[str]], Any]:
    """`main` for app.run with user errors as one line and status 2; other exceptions propagate with their traceback."""

    def wrapped(argv):
        try:
            return main(argv)
        except KeyboardInterrupt:
            sys.stdout.flush()
            sys.stderr.write(f"\n{prog or _program_name()}: interrupted\n")
            sys.exit(INTERRUPT_STATUS)
        except Exception as err:  # noqa: BLE001 - user errors exit here, the rest is re-raised unchanged
            _report(err, prog)
            raise

    wrapped.__name__ = getattr(main, "__name__", "main")
    wrapped.__doc__ = getattr(main, "__doc__", None)
    return wrapped


def _ml_collections_frames(err: BaseException) -> List[bool]:
    """For each frame of `err`'s traceback, outermost first: whether it is ml_collections code."""
    out, tb = [], err.__traceback__
    while tb is not None:
        out.append("ml_collections" in pathlib.PurePath(tb.tb_frame.f_code.co_filename).parts)
        tb = tb.tb_next
    return out


def _config_user_error(err: BaseException) -> bool:
    """Whether ml_collections raised `err` for a user's mistake (missing key, file or module), not a config file bug."""
    frames = _ml_collections_frames(err)
    if isinstance(err, (KeyError, AttributeError)):
        return bool(frames) and frames[-1]  # a KeyError inside a config file's own code is a bug in that file
    return any(frames)


def _override_names(argv: Sequence[str]) -> List[str]:
    """The `--config.a.b` overrides on a command line (any config flag name)."""
    out = []
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if name.startswith("-") and "." in name:
            out.append(name.lstrip("-"))
    return out


def _config_error_message(err: BaseException, argv: Sequence[str], flag_values=flags.FLAGS) -> str:
    """One line for an error ml_collections raised while parsing a config flag or its overrides."""
    if isinstance(err, (KeyError, AttributeError)):
        inner: Any = err  # ConfigDict raises AttributeError(KeyError("'key'\nDid you mean ...?"))
        while isinstance(inner, (KeyError, AttributeError)) and inner.args:
            inner = inner.args[0]
        lines = [s.strip() for s in str(inner).splitlines() if s.strip()]
        found = re.search(r"'([^']+)'", lines[0] if lines else "")
        key = found.group(1) if found else one_line(str(inner))
        hint = "".join(f"; {line}" for line in lines[1:])
        hits = [o for o in _override_names(argv) if key in o.split(".")[1:]]
        where = f"--{hits[0]}" if hits else "a --config.* override"
        return f"{where}: no key {key!r} in the config{hint} (an override can only set a key the config file defines)"
    if isinstance(err, SyntaxError):
        return f"config file {err.filename}, line {err.lineno}: {type(err).__name__}: {err.msg}"
    if isinstance(err, OSError) and str(err).startswith(_CONFIG_NOT_LOADED):  # overrides of a file that did not load
        detail = [s.strip() for s in str(err).splitlines() if s.strip()]
        given = [a for a in argv[1:] if a.split("=", 1)[0].lstrip("-") in _config_flag_names(flag_values)]
        return f"{given[-1] if given else 'config file'}: cannot load the config file ({detail[-1]})"
    return f"config file: {type(err).__name__}: {_message(err)}"


def _config_flag_names(flag_values) -> List[str]:
    """The names of the ml_collections config flags defined in `flag_values`."""
    return [n for n in list(flag_values) if type(flag_values[n]).__module__.startswith("ml_collections.config_flags")
            and "." not in n]


def _check_config_flags(flag_values, prog: Optional[str] = None) -> None:
    """Exits with one line when a config flag's file could not be loaded (ml_collections defers that error)."""
    for name in list(flag_values):
        value = flag_values[name].value
        if not type(value).__module__.startswith("ml_collections.config_flags"):
            continue
        try:
            getattr(value, "keys")
        except OSError as err:
            cause = err.__cause__ or err
            detail = [s.strip() for s in str(cause).splitlines() if s.strip()]
            fail(f"{flag_values[name].serialize()}: cannot load the config file "
                 f"({detail[-1] if detail else type(cause).__name__})", prog=prog)


def parse_flags(argv: Sequence[str], flags_parser: Optional[Callable] = None, flag_values=flags.FLAGS,
                prog: Optional[str] = None):
    """A flags_parser for app.run: flag and config-file errors become `PROG: error: MESSAGE` and status 2."""
    try:
        args = flags_parser(list(argv)) if flags_parser else flag_values(list(argv))
    except flags.Error as err:
        fail(_message(err), prog=prog)
    except (OSError, KeyError, AttributeError, SyntaxError, ImportError) as err:
        if not _config_user_error(err):
            raise
        fail(_config_error_message(err, argv, flag_values), prog=prog)
    _check_config_flags(flag_values, prog)
    return args


def run(main: Callable[[List[str]], Any], argv: Optional[Sequence[str]] = None,
        flags_parser: Optional[Callable] = None, prog: Optional[str] = None) -> None:
    """absl's app.run with one-line user errors (status 2) for flags, config files and `main`."""
    app.run(main_wrapper(main, prog), argv=None if argv is None else list(argv),
            flags_parser=lambda a: parse_flags(a, flags_parser, prog=prog))


# ---------------------------------------------------------------- validators


def _flag(name: str) -> str:
    """'eps' or '--eps' -> '--eps' (how messages name a setting)."""
    return "--" + str(name).lstrip("-")


def parse_eps(text: Any, name: str = "eps", norm: str = "Linf") -> float:
    """'8/255' or '0.0314' -> a radius of the `norm` ball: in (0, 1] under L-inf (images are in [0, 1]), any
    positive value under L2; anything else is a UserError naming the flag."""
    upper = 1.0 if norm == "Linf" else None
    raw = str(text).strip()
    try:
        if "/" in raw:
            num, den = raw.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(raw)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{_flag(name)}={raw!r} is not a number or a fraction like 8/255") from None
    if not math.isfinite(value) or not 0 < value <= (math.inf if upper is None else upper):
        bound = "(0, inf)" if upper is None else f"(0, {upper:g}]"
        raise UserError(f"{_flag(name)}={raw!r} = {value:g} is outside {bound}: images are in [0, 1], e.g. 8/255")
    return value


def positive_int(name: str, value: Any) -> int:
    """`value` (an int or its text) as an int > 0; else a UserError naming the flag."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
    except (TypeError, ValueError):
        raise UserError(f"{_flag(name)}={value!r} is not an integer (expected a positive integer)") from None
    if number <= 0:
        raise UserError(f"{_flag(name)}={value!r} must be a positive integer")
    return number


def existing_path(name: str, path: Any, kind: str = "file") -> pathlib.Path:
    """`path` as a Path that exists and is a file (kind='file') or a directory (kind='dir'); else a UserError."""
    if kind not in ("file", "dir"):
        raise ValueError(f"existing_path: kind must be 'file' or 'dir', got {kind!r}")
    if path is None or str(path) == "":
        raise UserError(f"{_flag(name)} is required (expected an existing {'directory' if kind == 'dir' else 'file'})")
    p = pathlib.Path(path).expanduser()
    wanted = "directory" if kind == "dir" else "file"
    if not p.exists():
        raise UserError(f"{_flag(name)}={str(path)!r}: no such {wanted}")
    if kind == "dir" and not p.is_dir():
        raise UserError(f"{_flag(name)}={str(path)!r} is a file, expected a directory")
    if kind == "file" and not p.is_file():
        raise UserError(f"{_flag(name)}={str(path)!r} is a directory, expected a file")
    return p


def choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """`value` if it is one of `choices`; else a UserError listing them (and the closest match)."""
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"{_flag(name)}={value!r} is not one of: {', '.join(map(str, choices))}{hint}")
