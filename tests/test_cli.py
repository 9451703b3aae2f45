"""cli: user errors are exactly one line `PROG: error: MESSAGE` and status 2; bugs keep their traceback."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from absl import app, flags

from mmard_jax import cli, errors
from mmard_jax.cli import UserError

REPO = pathlib.Path(__file__).resolve().parent.parent

PROGRAM = textwrap.dedent('''
    """A tiny absl program that fails in the way $CASE names."""
    import os
    from absl import app, flags
    from ml_collections import config_flags
    from mmard_jax import cli, config_guard, errors, run_lock

    config_flags.DEFINE_config_file("config", None, "Config file.")
    flags.DEFINE_integer("n", 1, "A number.")
    flags.DEFINE_string("eps", "8/255", "A radius.")
    flags.DEFINE_string("workdir", None, "A directory.")
    if os.environ.get("CASE") == "required":
        flags.mark_flags_as_required(["workdir"])


    def main(argv):
        case = os.environ.get("CASE", "ok")
        if case == "user":
            raise cli.UserError("--thing=3 is not allowed")
        if case == "multiline":
            raise cli.UserError("headline:\\n  a: 1 -> 2\\n  b: 3 -> 4")
        if case == "usage":
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if case == "eps":
            cli.parse_eps(flags.FLAGS.eps)
        if case == "config":
            print(flags.FLAGS.config.a)
        if case == "locked":
            lock = run_lock.WorkdirLock(flags.FLAGS.workdir).acquire()
            run_lock.WorkdirLock(flags.FLAGS.workdir).acquire()
        if case == "changed":
            config_guard.check_resume({"optim": {"lr": 0.1}, "seed": 0}, {"optim": {"lr": 0.2}, "seed": 1},
                                      workdir="runs/a")
        if case == "project":  # a project error class: a subclass of errors.UserError
            raise errors.CheckpointError("runs/x is neither a model directory nor a training workdir")
        if case == "keyerror":
            return {}["missing"]
        if case == "interrupt":
            raise KeyboardInterrupt
        print("ok", flags.FLAGS.n)


    if __name__ == "__main__":
        cli.run(main)
''')

CONFIG = textwrap.dedent('''
    import ml_collections

    def get_config(arg=None):
        if arg == "bad":
            raise ValueError("unknown config argument 'x'; accepted: ['method']")
        return ml_collections.ConfigDict({"a": 1, "optim": {"lr": 0.1}})
''')


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    d = tmp_path_factory.mktemp("prog")
    (d / "prog.py").write_text(PROGRAM)
    (d / "cfg.py").write_text(CONFIG)
    (d / "broken.py").write_text("def get_config(:\n")
    (d / "buggy.py").write_text("def get_config(arg=None):\n    return {'a': 1}[arg]\n")
    return d


def _run(program, case, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CASE": case}
    env.pop(cli.TRACEBACK_ENV, None)
    return subprocess.run([sys.executable, "prog.py", *args], cwd=program, env=env, capture_output=True, text=True,
                          timeout=60)


def _one_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "FATAL" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("prog.py: error: ")
    return lines[0][len("prog.py: error: "):]


def test_success_is_status_0(program):
    proc = _run(program, "ok", "--n=3")
    assert proc.returncode == 0 and proc.stdout == "ok 3\n" and proc.stderr == ""


@pytest.mark.parametrize("case,args,expected", [
    ("user", (), "--thing=3 is not allowed"),
    ("multiline", (), "headline: a: 1 -> 2; b: 3 -> 4"),
    ("usage", ("extra",), "unexpected arguments: ['extra']"),
    ("eps", ("--eps=abc",), "--eps='abc' is not a number or a fraction like 8/255"),
    ("project", (), "runs/x is neither a model directory nor a training workdir"),
    ("changed", (), "the run in runs/a was started with other settings (runs/a/config.json): start a new --workdir "
                    "for these settings, or rerun with the saved ones. Refused: optim.lr: 0.1 -> 0.2; seed: 0 -> 1"),
])
def test_user_errors_in_main_are_one_line(program, case, args, expected):
    assert _one_line(_run(program, case, *args)) == expected


def test_workdir_locked_is_one_line(program, tmp_path):
    message = _one_line(_run(program, "locked", f"--workdir={tmp_path}"))
    expected = f"{tmp_path / 'run.lock'} is already held by this process (another WorkdirLock on {tmp_path})"
    assert message == expected


@pytest.mark.parametrize("case,args,expected", [
    ("ok", ("--bogus",), "Unknown command line flag 'bogus' (--helpshort lists the flags)"),
    ("ok", ("--n=abc",), "flag --n=abc: invalid literal for int() with base 10: 'abc' (--helpshort lists the flags)"),
    ("required", (), "flag --workdir=None: Flag --workdir must have a value other than None. "
                     "(--helpshort lists the flags)"),
    ("config", ("--config=nope.py",), "--config=nope.py: cannot load the config file "
                                      "([Errno 2] No such file or directory: 'nope.py')"),
    ("config", ("--config=nope.py", "--config.a=2"), "--config=nope.py: cannot load the config file "
                                                     "([Errno 2] No such file or directory: 'nope.py')"),
    ("config", ("--config=cfg.py", "--config.optim.lrr=2"),
     "--config.optim.lrr: no key 'lrr' in the config; Did you mean \"lr\" instead of \"lrr\"? (an override can only "
     "set a key the config file defines)"),
    ("config", ("--config=cfg.py", "--config.zz=2"),
     "--config.zz: no key 'zz' in the config (an override can only set a key the config file defines)"),
    ("config", ("--config=cfg.py", "--config.a=abc"), "flag --config.a=abc: invalid literal for int()"),
    ("config", ("--config=cfg.py:bad",), "flag --config=cfg.py:bad: the config file raised ValueError: unknown config "
                                         "argument 'x'; accepted: ['method']"),
    ("config", ("--config=broken.py",), "config file broken.py, line 1: SyntaxError: invalid syntax"),
])
def test_flag_and_config_errors_are_one_line(program, case, args, expected):
    assert _one_line(_run(program, case, *args)).startswith(expected)


def test_unknown_override_of_the_training_config_is_one_line(program):
    args = (f"--config={REPO / 'configs/default.py'}", "--config.optim.lrr=0.2")
    assert _one_line(_run(program, "config", *args)) == (
        "--config.optim.lrr: no key 'lrr' in the config; Did you mean \"lr\" instead of \"lrr\"? (an override can "
        "only set a key the config file defines)")


def test_config_file_loads(program):
    proc = _run(program, "config", "--config=cfg.py", "--config.a=5")
    assert proc.returncode == 0 and proc.stdout == "5\nok 1\n", proc.stderr


def test_programming_error_keeps_its_traceback(program):
    proc = _run(program, "keyerror")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "KeyError: 'missing'" in proc.stderr


def test_bug_in_a_config_file_keeps_its_traceback(program):
    proc = _run(program, "config", "--config=buggy.py:b")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'b'" in proc.stderr


def test_traceback_env_shows_user_error_tracebacks(program):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CASE": "user", cli.TRACEBACK_ENV: "1"}
    proc = subprocess.run([sys.executable, "prog.py"], cwd=program, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.splitlines()[-1] == "prog.py: error: --thing=3 is not allowed"


def test_keyboard_interrupt_is_status_130(program):
    proc = _run(program, "interrupt")
    assert proc.returncode == 130 and proc.stderr.strip() == "prog.py: interrupted"


# ---------------------------------------------------------------- in-process


def test_is_user_error_by_class():
    """The project's UserError and its subclasses, absl's flag errors and UsageError are user errors; others bugs."""
    assert cli.UserError is errors.UserError
    for cls in (errors.UserError, errors.CheckpointWriteError, errors.NonFiniteLossError, errors.DownloadError):
        assert cli.is_user_error(cls("x")) and cli.is_user_error(type("Sub", (cls,), {})("x"))
    assert cli.is_user_error(flags.IllegalFlagValueError("x")) and cli.is_user_error(flags.UnrecognizedFlagError("x"))
    assert cli.is_user_error(app.UsageError("x"))
    assert not cli.is_user_error(ValueError("x")) and not cli.is_user_error(KeyError("x"))
    assert not cli.is_user_error(FileNotFoundError("x")) and not cli.is_user_error(FloatingPointError("x"))


def _exception_classes(path: pathlib.Path):
    """The names of the classes `path` defines whose bases look like exceptions (read, not imported)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b) for b in node.bases]
            if any(b.endswith(("Error", "Exception", "Interrupt")) for b in bases):
                yield node.name


def test_every_project_error_is_a_user_error_defined_in_errors():
    """Every exception class of the package is defined in errors.py and subclasses UserError, so the CLI's one
    `except` sees it; the one exception is PreemptedError (a stop, with its own exit status, not a mistake)."""
    package = REPO / "mmard_jax"
    elsewhere = {f"{p.relative_to(package)}:{name}" for p in package.rglob("*.py") if p.name != "errors.py"
                 for name in _exception_classes(p)}
    assert elsewhere == {"preemption.py:PreemptedError"}, elsewhere
    defined = set(_exception_classes(package / "errors.py"))
    assert defined == set(errors.__all__)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.UserError), name
    # Callers still catch the standard bases these errors had before there was one type.
    assert issubclass(errors.DatasetNotFoundError, FileNotFoundError) and issubclass(errors.DownloadError, OSError)
    assert issubclass(errors.NonFiniteLossError, FloatingPointError)


def test_errors_module_imports_no_jax_nor_the_package():
    tree = ast.parse((REPO / "mmard_jax" / "errors.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(n.split(".")[0] in ("jax", "jaxlib", "flax", "mmard_jax") for n in names), names
    code = "import sys, mmard_jax.errors; print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'absl')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == "[]", out.stdout


def test_one_line():
    assert cli.one_line("a\n\n  b  \nc:\n  d") == "a; b; c: d"
    assert cli.one_line("single") == "single"


def test_parse_eps():
    assert cli.parse_eps("8/255") == 8 / 255 and cli.parse_eps(" 0.0314 ") == 0.0314 and cli.parse_eps(1) == 1.0
    with pytest.raises(UserError, match=r"^--eps='abc' is not a number or a fraction like 8/255$"):
        cli.parse_eps("abc")
    with pytest.raises(UserError, match=r"^--eps='8/0' is not a number"):
        cli.parse_eps("8/0")
    for bad in ("0", "-1/255", "2", "nan", "inf"):
        with pytest.raises(UserError, match=r"is outside \(0, 1\]"):
            cli.parse_eps(bad)
    with pytest.raises(UserError, match=r"^--attack_eps="):
        cli.parse_eps("x", name="attack_eps")


def test_positive_int():
    assert cli.positive_int("batch_size", 4) == 4 and cli.positive_int("--batch_size", "12") == 12
    for bad in (0, -3, "-1"):
        with pytest.raises(UserError, match=r"^--batch_size=.* must be a positive integer$"):
            cli.positive_int("batch_size", bad)
    for bad in ("x", 2.5, True, None):
        with pytest.raises(UserError, match=r"is not an integer"):
            cli.positive_int("batch_size", bad)


def test_existing_path(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert cli.existing_path("src", f) == f and cli.existing_path("dir", tmp_path, kind="dir") == tmp_path
    with pytest.raises(UserError, match=r"^--src='.*nope': no such file$"):
        cli.existing_path("src", tmp_path / "nope")
    with pytest.raises(UserError, match=r"is a directory, expected a file"):
        cli.existing_path("src", tmp_path)
    with pytest.raises(UserError, match=r"is a file, expected a directory"):
        cli.existing_path("checkpoint", f, kind="dir")
    with pytest.raises(UserError, match=r"^--checkpoint is required"):
        cli.existing_path("checkpoint", None, kind="dir")


def test_choice():
    assert cli.choice("dataset", "digits", ("cifar10", "cifar100", "digits")) == "digits"
    with pytest.raises(UserError, match=r"^--dataset='cifar' is not one of: cifar10, cifar100, digits "
                                        r"\(did you mean 'cifar10'\?\)$"):
        cli.choice("dataset", "cifar", ("cifar10", "cifar100", "digits"))
