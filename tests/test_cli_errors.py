"""User errors of every command line (train, evaluate, convert, export, demo, run_table) are one line
`PROG: error: MESSAGE` on stderr with status 2 and no traceback; a programming error keeps its traceback.

Each case is its own process running the program's `__main__` code with its own argv. To keep 40 processes
cheap, one runner process imports the heavy dependencies (JAX, orbax, torch) once and forks a child per case
(nothing in the runner starts a JAX backend or a thread before it forks); the child runs the program with
`runpy`, exactly as `python -m PROG` or `python scripts/PROG.py` would.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from mmard_jax.tools import fault_injection as fault

REPO = pathlib.Path(__file__).resolve().parent.parent

RUNNER = r'''
import json, os, runpy, selectors, signal, sys

CASE_TIMEOUT = 120  # seconds; every case fails within a few

# The programs' dependencies, not the programs (runpy would warn about a module imported before it runs).
import jax, flax, optax, orbax.checkpoint, torch, safetensors  # noqa: F401
from mmard_jax import checkpoints, cli, config_guard, config_lib, data, distributed, evaluator, files  # noqa: F401
from mmard_jax import methods, models, parallel, preemption, reporting, runtime, train_step, xla_env  # noqa: F401
from mmard_jax.attacks import autoattack, suite  # noqa: F401
from mmard_jax.interop import convert, export  # noqa: F401


def bug():
    raise KeyError("a programming error")


def child(case):
    sys.argv = [case.get("script") or case["module"]] + case["argv"]
    if case.get("bug"):  # a bug in library code called by the program: must keep its traceback
        module, name = case["bug"].rsplit(".", 1)
        setattr(sys.modules[module], name, lambda *a, **k: bug())
    if case.get("script"):
        runpy.run_path(case["script"], run_name="__main__")
    else:
        runpy.run_module(case["module"], run_name="__main__", alter_sys=True)


def collect(fds):
    """Everything the child writes to its stdout and stderr pipes, read as it comes (a full pipe would block it)."""
    data = {fd: b"" for fd in fds}
    with selectors.DefaultSelector() as sel:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            for key, _ in sel.select():
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    data[key.fd] += chunk
                else:
                    sel.unregister(key.fd)
                    os.close(key.fd)
    return [data[fd].decode(errors="replace") for fd in fds]


results = []
for case in json.loads(sys.stdin.read()):
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.alarm(CASE_TIMEOUT)  # a case that starts real work instead of failing ends here (SIGALRM)
        os.close(out_r)
        os.close(err_r)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        code = 0
        try:
            child(case)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(out_w)
    os.close(err_w)
    out, err = collect([out_r, err_r])
    _, status = os.waitpid(pid, 0)
    results.append({"status": os.waitstatus_to_exitcode(status), "stdout": out, "stderr": err})
print(json.dumps(results))
'''


def run_cases(cases, env):
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(cases), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A model directory, a damaged copy, a tiny training config and some things that are not what a flag wants."""
    root = tmp_path_factory.mktemp("cli_errors")
    config = fault.prepare(root)
    model = root / "teacher"
    damaged = root / "damaged_model"
    shutil.copytree(model, damaged)
    data = max((damaged / "variables").rglob("d/*"), key=lambda p: p.stat().st_size)
    os.truncate(data, 100)
    (root / "empty_dir").mkdir()
    (root / "a_file").write_text("not a directory\n")
    env = dict(os.environ, MMARD_XLA_CACHE=str(root / "xla_cache"))
    return {"root": root, "config": config, "model": model, "damaged": damaged, "env": env}


def cases(p):
    """(program, argv, expected part of the one-line message) for each user error; {root} etc. are paths."""
    root, model, cfg = p["root"], p["model"], p["config"]
    ev = "mmard_jax.evaluate"
    tr = "mmard_jax.train"
    train = [f"--config={cfg}", f"--workdir={root}/run"]
    table = "scripts/run_table.py"
    return [
        (ev, [f"--checkpoint={model}", "--eps=abc"], "--eps='abc' is not a number or a fraction like 8/255"),
        (ev, [f"--checkpoint={model}", "--eps=-8/255"], "--eps='-8/255' = -0.0313725 is outside (0, 1]"),
        (ev, [f"--checkpoint={model}", "--eps=2"], "--eps='2' = 2 is outside (0, 1]"),
        (ev, [f"--checkpoint={model}", "--n_examples=0"], "--n_examples=0 must be a positive integer"),
        (ev, [f"--checkpoint={model}", "--batch_size=0"], "--batch_size=0 must be a positive integer"),
        (ev, [f"--checkpoint={model}", "--batch_size=33", "--dataset=digits", "--attacks=clean"],
         "--batch_size 33 does not divide by the 2 devices"),
        (ev, [f"--checkpoint={root}/missing"], f"--checkpoint='{root}/missing': no such directory"),
        (ev, [f"--checkpoint={root}/empty_dir", "--dataset=digits"],
         "is neither a model directory nor a training workdir"),
        (ev, [f"--checkpoint={model}", "--attacks=clean,pgd99"], "--attacks: unknown attack(s) ['pgd99']"),
        (ev, [f"--checkpoint={model}", "--dataset=mnist"], "flag --dataset=mnist: value should be one of"),
        (ev, [f"--checkpoint={model}", "--dataset=svhn", "--source=pickle"],
         "--source='pickle' is not one of: auto, mat, tfds"),
        (ev, [f"--checkpoint={model}", "--class_order=wnids"], "--class_order applies to --dataset=tiny_imagenet only"),
        (ev, [f"--checkpoint={model}", "--dataset=tiny_imagenet", f"--data_dir={root}/empty_dir", "--attacks=clean"],
         f"tiny_imagenet (test) was not found in {root}/empty_dir.; Looked for: {root}/empty_dir/tiny-imagenet-200/"),
        (ev, [f"--checkpoint={model}", "--dataset=imagenet"], "--dataset=imagenet reads --data_dir (an image folder"),
        (ev, [f"--checkpoint={model}", "--dataset=imagenet", f"--data_dir={root}/empty_dir"],
         f"{root}/empty_dir: class folder(s) ['n01440764', 'n01443537', 'n01484850'] of the image list are missing"),
        (ev, [f"--checkpoint={p['damaged']}", "--dataset=digits", "--attacks=clean"],
         "the stored variables do not fit the model in model.json (wide_resnet), or are damaged: ValueError: "),
        (tr, train + ["--config.attack.eps=-0.03"], "--config.attack.eps='-0.03' = -0.03 is outside (0, 1]"),
        (tr, train + ["--config.eval.eps=2.0"], "--config.eval.eps='2.0' = 2 is outside (0, 1]"),
        (tr, train + ["--config.dataset.name=mnist"], "--config.dataset.name='mnist' is not one of: cifar10"),
        (tr, train + ["--config.dataset.class_order=alpha"],
         "--config.dataset.class_order='alpha' is not one of: , sorted, wnids"),
        (tr, train + ["--config.student.arch=resnet99"], "--config.student.arch='resnet99' is not one of"),
        (tr, train + ["--config.method.name=ard2"], "config.method: unknown method 'ard2'"),
        (tr, train + ["--config.batch_size=0"], "--config.batch_size=0 must be a positive integer"),
        (tr, train + ["--config.batch_size=33"], "config.batch_size 33 does not divide by the 2 devices"),
        (tr, train + ["--config.eval.batch_size=-4"], "--config.eval.batch_size=-4 must be a positive integer"),
        (tr, train + ["--config.eval.n_examples=0"], "--config.eval.n_examples=0: give a positive number"),
        (tr, train + ["--config.optim.lr=abc"], "--config.optim.lr"),
        (tr, train + ["--config.no_such_key=1"], "no key 'no_such_key' in the config"),
        (tr, [f"--config={root}/missing.py", f"--workdir={root}/run"], "cannot load the config file"),
        (tr, train[:1], "--workdir must have a value other than None"),
        # A start that fails before its first checkpoint does not tie the workdir to its settings: the second
        # start, with another teacher, fails on that teacher, not on a "started with other settings" refusal.
        (tr, train + [f"--config.teacher.checkpoint={root}/missing_teacher"], "missing_teacher/model.json is missing"),
        (tr, train + [f"--config.teacher.checkpoint={root}/empty_dir"], "empty_dir/model.json is missing"),
        ("mmard_jax.convert", [f"--src={root}/missing.pt", f"--dst={root}/out", "--arch=resnet18", "--num_classes=10"],
         f"--src='{root}/missing.pt': no such file"),
        ("mmard_jax.convert", [f"--src={cfg}", f"--dst={root}/out", "--arch=resnet18", "--num_classes=0"],
         "--num_classes=0 must be a positive integer"),
        ("mmard_jax.convert", [f"--src={cfg}", f"--dst={root}/out", "--arch=resnet99"], "flag --arch=resnet99"),
        ("mmard_jax.convert", [f"--src={cfg}", f"--dst={root}/out", "--robustbench=NoSuchModel", "--dataset=cifar10"],
         "'NoSuchModel' is not a supported RobustBench cifar10 Linf model"),
        ("mmard_jax.export", [f"--src={root}/empty_dir", f"--dst={root}/x.pt"],
         "is neither a model directory nor a training workdir"),
        ("mmard_jax.export", [f"--src={root}/missing", f"--dst={root}/x.pt"], "no such directory"),
        ("mmard_jax.export", [f"--src={model}", f"--dst={root}/empty_dir"], "is a directory, expected a file"),
        ("mmard_jax.demo", ["--dtype=float16"], "flag --dtype=float16: value should be one of <float32|bfloat16>"),
        ("mmard_jax.demo", [f"--workdir={root}/a_file"], "is a file, expected a directory"),
        ("mmard_jax.demo", ["--margin=2"], "--margin=2.0 must be in [0, 1)"),
        (table, [f"--table={root}/missing.py", f"--workroot={root}/t"], f"--table='{root}/missing.py': no such file"),
        (table, [f"--table={cfg}", f"--workroot={root}/t"], "defines no RUNS: not a table config"),
        (table, ["--table=configs/table3.py", f"--workroot={root}/t", "--only=method=nope"],
         "--only=method=nope matches no run of configs/table3.py"),
        (table, ["--table=configs/table3.py", f"--workroot={root}/t", "--", "--config.nope=1"],
         "override --config.nope: no key 'nope' in the config"),
        (table, ["--table=configs/table3.py", f"--workroot={root}/t", "--", "--config.attack.eps=2"],
         "--config.attack.eps='2.0' = 2 is outside (0, 1]"),
    ]


def test_user_errors_are_one_line_with_status_2(paths):
    table = cases(paths)
    specs = [{"script": str(REPO / prog), "argv": argv} if prog.endswith(".py") else {"module": prog, "argv": argv}
             for prog, argv, _ in table]
    results = run_cases(specs, paths["env"])
    failures = []
    for (prog, argv, expected), result in zip(table, results):
        name = pathlib.Path(prog).name if prog.endswith(".py") else prog
        lines = result["stderr"].strip().splitlines()
        ok = (result["status"] == 2 and len(lines) == 1 and lines[0].startswith(f"{name}: error: ")
              and expected in lines[0] and "Traceback" not in result["stdout"])
        if not ok:
            failures.append(f"{prog} {' '.join(argv)}: status {result['status']}, stderr {result['stderr'][-1500:]!r}")
    assert not failures, "\n".join(failures)


def test_programming_errors_keep_their_traceback(paths):
    root, cfg = paths["root"], paths["config"]
    results = run_cases([
        {"module": "mmard_jax.train", "argv": [f"--config={cfg}", f"--workdir={root}/bug"],
         "bug": "mmard_jax.parallel.data_mesh"},
        {"module": "mmard_jax.evaluate", "argv": [f"--checkpoint={paths['model']}", "--dataset=digits"],
         "bug": "mmard_jax.data.load_dataset"},
    ], paths["env"])
    for result in results:
        assert result["status"] == 1, result["stderr"][-3000:]
        assert "Traceback (most recent call last)" in result["stderr"]
        assert result["stderr"].strip().endswith("KeyError: 'a programming error'")
