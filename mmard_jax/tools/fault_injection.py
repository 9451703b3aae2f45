"""Fault injection: SIGKILL a tiny training run at seeded random moments, resume it, compare with an uninterrupted run.

The library of `scripts/fault_injection.py` (and of tests/test_train.py, test_reliability.py, test_cli_errors.py,
which share its tiny run). `run(trials, seed, root)`: in ROOT it writes a random WRN-10-1 teacher and a tiny
config (WRN-10-1 student on the digits set, 256 training examples, batch 32, 2 epochs, PGD-2), trains it once
without interruption (ROOT/reference; reused when it is already complete), then runs the trials. Each trial starts
the trainer in a fresh workdir, kills it with SIGKILL (no handler runs) at one seeded random moment, and
reruns the same command, which must resume and complete. A moment is one of
  save   while the j-th checkpoint of the run is being written: the trainer is killed a random fraction of
         the shortest write of the reference run after orbax's temporary directory appears (most land mid-write);
  step   once the progress bar shows global step k;
  time   t seconds after the start, uniform over the reference run's duration (start-up, restore,
         compilation, training, evaluation, the final report).
A trial passes when the resumed run ends with the same train state (every leaf: step, parameters, BatchNorm
statistics, optimizer state) and the same best checkpoint, bitwise, and the same final accuracies as the
reference.

`pipeline='stream'` runs every command with the streamed input pipeline (grain; its iterator state is in the
checkpoint too) and the SWA student without its BatchNorm recompute (which reads the resident split); its reference
is ROOT/reference_stream (tests/test_reliability.py trains it there once for all its tests and this trial).

Subprocesses share a persistent XLA compilation cache ($MMARD_XLA_CACHE, default ROOT/xla_cache).
"""

import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Tuple

# The trainer runs as `python -m mmard_jax.train` from the folder that holds this package.
PACKAGE_PARENT = pathlib.Path(__file__).resolve().parents[2]

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax writes a checkpoint into <step>.orbax-checkpoint-tmp, then renames it
CHECKPOINT_DIRS = ("checkpoints/latest", "checkpoints/best", "swa/checkpoints/best")
# tqdm's bar: "epoch 1/2:  38%|███▊      | 3/8 [00:06<00:30, ...]"
PROGRESS = re.compile(rb"epoch (\d+)/\d+: +\d+%\|[^|]*\| *(\d+)/(\d+)")

TINY_CONFIG = '''"""The tiny run of mmard_jax/tools/fault_injection.py, tests/test_train.py and \
tests/test_reliability.py."""
from mmard_jax import config_lib


def get_config(arg=None):
    c = config_lib.base_config("mmard", "wide_resnet", "digits")
    c.student.kwargs = {"depth": 10, "width": 1}
    c.teacher.checkpoint = TEACHER
    c.dataset.n_train = 256
    c.dataset.flip = False
    c.batch_size = 32
    c.num_epochs = 2
    c.attack.steps = 2
    c.eval.n_examples = 64
    c.eval.batch_size = 32
    c.eval.attacks = ("clean", "pgd_t")
    c.eval.final_attacks = ("clean", "fgsm", "pgd_t")
    c.attack.unroll = c.eval.unroll = "1"  # compile-bound: rolled loops compile fastest
    c.checkpoint_every_steps = 3
    c.log_every_steps = 2
    c.swa.enabled = True  # an SWA student from the first epoch: resumes must restore it bitwise too
    c.swa.start_epoch = 0
    return c
'''
STEPS = 16  # 2 epochs x 256 / 32
PIPELINES = ("device", "stream")
# The trainer's settings per pipeline beyond the config file (the same file for both). The streamed run keeps the SWA
# student but not its BatchNorm recompute (it reads the resident split; the device run covers it).
PIPELINE_SETTINGS = {"device": {}, "stream": {"dataset.pipeline": "stream", "swa.bn_recompute": False}}
PIPELINE_FLAGS = {name: tuple(f"--config.{key}={str(value).lower() if isinstance(value, bool) else value}"
                              for key, value in settings.items()) for name, settings in PIPELINE_SETTINGS.items()}


# ---------------------------------------------------------------- the run


def prepare(root) -> pathlib.Path:
    """DIR/teacher (a random WRN-10-1 model directory) and DIR/tiny_config.py naming it; returns the config file."""
    root = pathlib.Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    teacher, config = root / "teacher", root / "tiny_config.py"
    if not (teacher / "model.json").is_file():
        import jax  # noqa: PLC0415 - only the preparation needs JAX in this process
        import jax.numpy as jnp  # noqa: PLC0415

        from mmard_jax.models import store  # noqa: PLC0415

        spec = store.model_spec("wide_resnet", 10, {"depth": 10, "width": 1})
        module = store.build_module(spec)
        init = jax.jit(lambda k: module.init(k, jnp.zeros((1, 16, 16, 3)), train=False))
        store.save_model(teacher, spec, init(jax.random.key(0, impl="rbg")))
    text = TINY_CONFIG.replace("TEACHER", repr(str(teacher)))
    if not config.is_file() or config.read_text() != text:
        config.write_text(text)
    return config


def with_pipeline(config, pipeline: str):
    """`config` (a ConfigDict of the tiny run, changed in place and returned) as PIPELINE_FLAGS[pipeline] sets it."""
    config.update_from_flattened_dict(PIPELINE_SETTINGS[pipeline])
    return config


def environment(root) -> Dict[str, str]:
    """The trainer's environment: unbuffered output, the shared compilation cache."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("MMARD_XLA_CACHE", str(pathlib.Path(root).absolute() / "xla_cache"))
    return env


def train_command(config, workdir, *extra) -> List[str]:
    return [sys.executable, "-m", "mmard_jax.train", f"--config={config}", f"--workdir={workdir}", *extra]


def start(config, workdir, env, *extra) -> subprocess.Popen:
    """The trainer on `workdir`, its stdout and stderr in one pipe."""
    return subprocess.Popen(train_command(config, workdir, *extra), cwd=PACKAGE_PARENT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def temporaries(workdir: pathlib.Path) -> set:
    """The orbax temporary directories under the workdir's checkpoint managers (checkpoints being written)."""
    found = set()
    for sub in CHECKPOINT_DIRS:
        try:
            found.update(f"{sub}/{name}" for name in os.listdir(workdir / sub) if TMP_MARK in name)
        except FileNotFoundError:
            pass
    return found


def committed(workdir: pathlib.Path, sub: str = "checkpoints/latest") -> List[int]:
    """The completed checkpoint steps of one manager directory."""
    try:
        return sorted(int(n) for n in os.listdir(workdir / sub) if n.isdigit())
    except FileNotFoundError:
        return []


class Watch:
    """Follows a running trainer: its output (global step from the progress bar) and its checkpoint writes (each
    appearance of an orbax temporary directory; leftovers of an earlier kill count once they vanished and came back)."""

    def __init__(self, proc: subprocess.Popen, workdir: pathlib.Path):
        self.proc, self.workdir = proc, pathlib.Path(workdir)
        self.output = bytearray()
        self.step = 0
        self.present = temporaries(self.workdir)
        self.leftover = set(self.present)
        self.writes: List[Tuple[str, float]] = []  # (name, time it appeared)
        self.lifetimes: List[float] = []
        self._born: Dict[str, float] = {}
        os.set_blocking(proc.stdout.fileno(), False)

    def poll(self) -> bool:
        """Reads what is new; False once the process has ended."""
        try:
            chunk = self.proc.stdout.read()
        except BlockingIOError:
            chunk = None
        if chunk:
            self.output += chunk
            hits = PROGRESS.findall(bytes(self.output[-4096:]))
            if hits:
                epoch, done, total = map(int, hits[-1])
                self.step = max(self.step, (epoch - 1) * total + done)
        now, names = time.monotonic(), temporaries(self.workdir)
        for name in sorted(names - self.present):
            if name not in self.leftover:
                self.writes.append((name, now))
                self._born[name] = now
        for name in self.present - names:
            if name in self._born:
                self.lifetimes.append(now - self._born.pop(name))
        self.leftover &= names
        self.present = names
        return self.proc.poll() is None

    def finish(self, timeout: float) -> Tuple[int, str]:
        """Waits for the end; (return code, all output)."""
        deadline = time.monotonic() + timeout
        while self.poll():
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise TimeoutError(f"the trainer ran past {timeout:.0f} s")
            time.sleep(0.002)
        os.set_blocking(self.proc.stdout.fileno(), True)
        self.output += self.proc.stdout.read() or b""
        return self.proc.returncode, self.output.decode("utf-8", "replace")


def run_to_end(config, workdir, env, timeout: float, extra=()) -> Tuple[int, str, Watch, float]:
    """One uninterrupted run of the trainer: (return code, output, its watch, wall seconds)."""
    begin = time.monotonic()
    watch = Watch(start(config, workdir, env, *extra), workdir)
    code, out = watch.finish(timeout)
    return code, out, watch, time.monotonic() - begin


def reference_name(pipeline: str = "device") -> str:
    """The reference run's folder in ROOT: 'reference' (the device pipeline) or 'reference_stream'."""
    return "reference" if pipeline == "device" else f"reference_{pipeline}"


def save_reference_stats(root, seconds: float, watch: Watch, pipeline: str = "device") -> Dict[str, float]:
    """DIR/<reference>_stats.json of a finished reference run: its wall time and its shortest checkpoint write."""
    stats = {"seconds": seconds, "write_s": min(watch.lifetimes) if watch.lifetimes else 0.05}
    (pathlib.Path(root) / f"{reference_name(pipeline)}_stats.json").write_text(json.dumps(stats))
    return stats


def reference(root, config, env, timeout: float, pipeline: str = "device") -> Dict[str, float]:
    """DIR/reference (or reference_stream), trained once (reused when complete): {'seconds': wall time, 'write_s': its
    shortest write}."""
    name = reference_name(pipeline)
    workdir, stats_file = pathlib.Path(root) / name, pathlib.Path(root) / f"{name}_stats.json"
    if (workdir / "summary.json").is_file() and stats_file.is_file():
        return json.loads(stats_file.read_text())
    shutil.rmtree(workdir, ignore_errors=True)
    code, out, watch, seconds = run_to_end(config, workdir, env, timeout, PIPELINE_FLAGS[pipeline])
    if code != 0:
        raise SystemExit(f"fault_injection: the reference run failed (status {code}):\n{out[-3000:]}")
    return save_reference_stats(root, seconds, watch, pipeline)


# ---------------------------------------------------------------- final states


def final_state(workdir) -> Dict[str, object]:
    """{'latest': (step, leaves), 'best': (step, leaves), 'swa_best': (step, leaves) (the SWA student's best; None
    and [] without one), 'final': accuracies} of a finished workdir."""
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    workdir = pathlib.Path(workdir)
    out = {}
    with ocp.StandardCheckpointer() as checkpointer:
        for name, sub, item in (("latest", "checkpoints/latest", "state"), ("best", "checkpoints/best", "variables"),
                                ("swa_best", "swa/checkpoints/best", "variables")):
            steps = committed(workdir, sub)
            out[name] = (steps[-1], jax.tree.leaves(checkpointer.restore(workdir / sub / str(steps[-1]) / item))
                         ) if steps else (None, [])
    summary = workdir / "summary.json"
    out["final"] = json.loads(summary.read_text())["final"] if summary.is_file() else None
    return out


def differences(a: Dict[str, object], b: Dict[str, object]) -> List[str]:
    """What differs between two final states ([] when bitwise equal)."""
    import numpy as np  # noqa: PLC0415

    found = []
    for name in ("latest", "best", "swa_best"):
        (step_a, leaves_a), (step_b, leaves_b) = a[name], b[name]
        if step_a != step_b:
            found.append(f"{name} step {step_a} != {step_b}")
        elif len(leaves_a) != len(leaves_b):
            found.append(f"{name}: {len(leaves_a)} != {len(leaves_b)} arrays")
        else:
            unequal = sum(not np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))
            if unequal:
                found.append(f"{name}: {unequal} of {len(leaves_a)} arrays differ")
    if a["final"] != b["final"]:
        found.append(f"final accuracies {a['final']} != {b['final']}")
    return found


# ---------------------------------------------------------------- trials


@dataclasses.dataclass
class Plan:
    """When to kill: kind 'save' (the `index`-th write, `fraction` of a typical write in), 'step' or 'time'."""

    kind: str
    index: int = 0
    fraction: float = 0.0
    seconds: float = 0.0

    def describe(self) -> str:
        if self.kind == "save":
            return f"write #{self.index}, {self.fraction:.0%} in"
        if self.kind == "step":
            return f"step {self.index}"
        return f"{self.seconds:.1f} s"


def plans(trials: int, seed: int, seconds: float) -> List[Plan]:
    """The seeded kill moments, kinds in turn: during a checkpoint write, after a step, after a time."""
    rng = random.Random(seed)
    out = []
    for i in range(trials):
        kind = ("save", "step", "time")[i % 3]
        if kind == "save":
            out.append(Plan("save", index=rng.randint(1, 8), fraction=rng.random()))
        elif kind == "step":
            out.append(Plan("step", index=rng.randint(1, STEPS - 1)))
        else:
            out.append(Plan("time", seconds=rng.uniform(0.0, seconds)))
    return out


def kill_when_due(watch: Watch, plan: Plan, write_s: float, timeout: float) -> str:
    """Polls the trainer until the plan's moment, kills it with SIGKILL; what the moment turned out to be."""
    begin = time.monotonic()
    while watch.poll():
        now = time.monotonic()
        if now - begin > timeout:
            break
        if plan.kind == "save" and len(watch.writes) >= plan.index:
            name, born = watch.writes[plan.index - 1]
            if now >= born + plan.fraction * write_s:
                watch.proc.kill()
                watch.proc.wait()
                mid = name in temporaries(watch.workdir)
                return f"{'during' if mid else 'just after'} the write of {name.split('/', 1)[1].replace(TMP_MARK, '')}"
        elif plan.kind == "step" and watch.step >= plan.index:
            watch.proc.kill()
            watch.proc.wait()
            return f"after step {watch.step}"
        elif plan.kind == "time" and now - begin >= plan.seconds:
            step = watch.step
            watch.proc.kill()
            watch.proc.wait()
            return f"{now - begin:.1f} s in (progress: step {step})"
        time.sleep(0.002)
    watch.finish(timeout)
    return f"not killed: the run ended first (status {watch.proc.returncode})"


def trial(i: int, plan: Plan, root: pathlib.Path, config, env, stats, timeout: float, expected,
          extra=()) -> Dict[str, str]:
    """One trial: start, kill at the plan's moment, rerun the same command to the end, compare with the reference."""
    workdir = root / "trials" / f"trial_{i:02d}"
    shutil.rmtree(workdir, ignore_errors=True)
    watch = Watch(start(config, workdir, env, *extra), workdir)
    moment = kill_when_due(watch, plan, stats["write_s"], timeout)
    on_disk = committed(workdir)
    row = {"trial": str(i), "plan": plan.describe(), "killed": moment,
           "on disk": ", ".join(map(str, on_disk)) or "-", "lock": "-", "resumed from": "-", "equal": "no"}
    code, out, _, _ = run_to_end(config, workdir, env, timeout, extra)
    (workdir / "rerun.log").write_text(out)
    if "taking over the stale lock" in out:
        row["lock"] = "taken over"
    found = re.search(r"resumed from step (\d+)", out)
    if found:
        row["resumed from"] = found.group(1) + (" (fallback)" if "previous good checkpoint" in out else "")
    if code != 0:
        last = out.strip().splitlines()[-1][:200] if out.strip() else ""
        row["equal"] = f"FAILED: the rerun exited with status {code}: {last}"
        return row
    diffs = differences(final_state(workdir), expected)
    row["equal"] = "yes" if not diffs else "FAILED: " + "; ".join(diffs)
    return row


def table(rows: List[Dict[str, str]]) -> str:
    heads = ["trial", "plan", "killed", "on disk", "lock", "resumed from", "equal"]
    titles = ["trial", "kill plan", "killed", "latest steps on disk", "dead run's lock", "rerun resumed from step",
              "bitwise equal"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(r[h] for h in heads) + " |" for r in rows]
    return "\n".join(lines)


def run(trials: int, seed: int, root, keep: bool = False, timeout: float = 900, say=print,
        pipeline: str = "device") -> List[Dict[str, str]]:
    """The reference run (reused when complete), then `trials` kills and resumes in ROOT/trials; the rows of `table`.

    Passing trials' workdirs are deleted unless `keep`; `say` reports progress one line at a time; `pipeline`: the
    trainer's input pipeline (PIPELINES)."""
    if trials <= 0:
        raise ValueError(f"trials={trials} must be a positive integer")
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline={pipeline!r}: expected one of {', '.join(PIPELINES)}")
    root = pathlib.Path(root).absolute()
    config = prepare(root)
    env = environment(root)
    stats = reference(root, config, env, timeout, pipeline)
    expected = final_state(root / reference_name(pipeline))
    say(f"reference: {root / reference_name(pipeline)} ({stats['seconds']:.0f} s, its shortest checkpoint write "
        f"{1000 * stats['write_s']:.0f} ms)")
    rows = []
    for i, plan in enumerate(plans(trials, seed, stats["seconds"])):
        row = trial(i, plan, root, config, env, stats, timeout, expected, PIPELINE_FLAGS[pipeline])
        rows.append(row)
        say(f"trial {i}: {plan.describe()}: killed {row['killed']}; bitwise equal: {row['equal']}")
        if row["equal"] == "yes" and not keep:
            shutil.rmtree(root / "trials" / f"trial_{i:02d}", ignore_errors=True)
    return rows


def passed(rows: List[Dict[str, str]]) -> int:
    """How many trials ended bitwise equal to the reference."""
    return sum(r["equal"] == "yes" for r in rows)
