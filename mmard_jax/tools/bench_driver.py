"""The driver of scripts/benchmark.py: every (case, implementation) row in its own worker process (so peak memory
and thread pools are its own), rounds interleaved, rows merged and completed as they land.

Same work on both sides: the case's first JAX (or flops) row writes its initial variables and first draws to a start
file that the PyTorch row loads (`bench_step.write_start`); the worker command is the caller's (the script itself).
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from mmard_jax.tools import bench_report, machine
from mmard_jax.tools.bench_cases import CASES


@dataclasses.dataclass
class Options:
    """What scripts/benchmark.py's flags choose for a run (see their help there)."""

    torch_forms: str = ""  # comma-separated PyTorch forms ('' for none)
    match_dtype: bool = False
    unroll: str = "auto"
    conv_grad: str = ""
    xla_flags: Optional[Sequence[str]] = None  # None: $XLA_FLAGS plus mmard_jax's CPU defaults
    impls: str = "jax,torch"
    cpus: str = ""
    warmup: int = 2
    steps: int = 5
    repeat: int = 1
    timeout: float = 3600
    deadline_s: float = 0
    json: Optional[str] = None


def plan_rows(names: Sequence[str], options: Options) -> List[tuple]:
    """(case, kind, option, env, writes the start file) in the order the rows run."""
    forms = options.torch_forms
    base_flags = os.environ.get("XLA_FLAGS", "")
    flag_sets = options.xla_flags if options.xla_flags is not None else [base_flags]
    # Explicit --xla_flags rows run with exactly those flags (mmard_jax's own CPU defaults switched off).
    exact = {"MMARD_JAX_XLA_DEFAULTS": "0"} if options.xla_flags is not None else {}
    convs = [c for c in options.conv_grad.split(",") if c] or [None]
    impls = set(options.impls.split(","))
    plan = []
    for name in names:
        if "jax" in impls:
            rows = [(name, "jax", u, {"XLA_FLAGS": f, **exact, **({"MMARD_JAX_CONV_GRAD": c} if c else {})})
                    for u in options.unroll.split(",") for f in flag_sets for c in convs]
            plan += [row + (i == 0,) for i, row in enumerate(rows)]
        else:
            plan += [(name, "flops", "", None, True)]
        if "torch" in impls:
            plan += [(name, "torch", f, None, False) for f in forms.split(",")
                     if f and (not options.match_dtype or bench_report.form_dtype(f) == CASES[name].dtype)]
    return plan


def run_worker(worker: Sequence[str], kind: str, case_name: str, option: str, warmup: int, steps: int, timeout: float,
               env: Optional[Dict[str, str]] = None, cpus: Optional[List[int]] = None,
               start_file: Optional[str] = None) -> Dict[str, Any]:
    """Runs one measurement in a fresh process (pinned to `cpus` if given); its JSON, or {'error': ...}."""
    cmd = [*worker, f"--worker={kind}", f"--cases={case_name}", f"--option={option}", f"--warmup={warmup}",
           f"--steps={steps}"]
    if start_file:
        cmd.append(f"--start_file={start_file}")
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                              preexec_fn=pin)
    except subprocess.TimeoutExpired:
        return {"impl": kind, "form": option, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"impl": kind, "form": option, "error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def run(names: Sequence[str], options: Options, worker: Sequence[str],
        say: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Measures every row of `names` (each in a fresh `worker` process, e.g. [python, scripts/benchmark.py]);
    the merged and completed rows, also written to `options.json` after every row when set."""
    plan = plan_rows(names, options)
    processor = machine.describe()  # every row names the processor it ran on (the JSON's rows travel alone)
    rounds = [[] for _ in plan]
    cpus = [int(c) for c in options.cpus.split(",") if c] or None
    deadline = time.monotonic() + options.deadline_s if options.deadline_s else None
    with tempfile.TemporaryDirectory(prefix="mmard_bench_") as tmp:
        starts = {name: os.path.join(tmp, f"{name}.npz") for name in names}
        for r in range(options.repeat):  # interleaved: a load change on a shared machine hits every row alike
            for i, (name, kind, option, env, writes) in enumerate(plan):
                left = deadline - time.monotonic() if deadline else float(options.timeout)
                if left < 1:
                    row = {"impl": kind, "form": option, "error": "skipped: --deadline_s reached"}
                else:
                    row = run_worker(worker, kind, name, option, options.warmup, options.steps,
                                     min(options.timeout, left), env, cpus,
                                     starts[name] if (writes or kind == "torch") else None)
                rounds[i].append(dict(row, case=name, processor=processor))
                say(f"[round {r + 1}/{options.repeat}] " + _progress(rounds[i][-1]))
                if options.json:
                    _write_json(options.json, _results(plan, rounds))
    results = _results(plan, rounds)
    if options.json:
        _write_json(options.json, results)
    return results


def append_section(path, results: List[Dict[str, Any]], options: Options, title: str, command: str) -> None:
    """Appends the run's section (bench_report.section) to the Markdown file `path`, created if missing."""
    path = pathlib.Path(path)
    if not path.exists():
        path.write_text("# Benchmarks\n\nWritten by `scripts/benchmark.py`; one section per run.\n")
    with path.open("a") as f:
        f.write(bench_report.section(results, options, title, command))


def _results(plan, rounds) -> List[Dict[str, Any]]:
    """The merged rows measured so far, completed (FLOPs from the case's JAX or flops row; same-work checks)."""
    results, flops, first_jax = [], {}, {}
    for (name, kind, _, _, _), rows in zip(plan, rounds):
        if not rows:
            continue
        row = bench_report.merge_rounds(rows)
        if kind in ("jax", "flops") and "error" not in row:
            flops.setdefault(name, row["flops_per_step"])
            if kind == "jax":
                first_jax.setdefault(name, row)
        if kind != "flops":
            results.append(bench_report.complete(row, flops.get(name), CASES[name].dtype, first_jax.get(name)))
    return results


def _write_json(path: str, results) -> None:
    tmp = f"{path}.tmp"
    pathlib.Path(tmp).write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


def _progress(row: Dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['case']} {row['impl']} {row['form']}: FAILED {row['error']}"
    if row["impl"] == "flops":
        return f"{row['case']}: {row['flops_per_step'] / 1e9:.4g} GFLOP per step"
    return (f"{row['case']} {row['impl']} {row['form']}: {row['step_s']:.3f} s/step, {row['images_per_s']:.1f} img/s, "
            f"compile {row['compile_s']:.1f} s, first-step loss {row['first_loss']:.6g}")
