"""Process layouts side by side (scripts/benchmark_multiprocess.py): one process of a layout (the timed step on the
global mesh), a layout measured in fresh processes, rounds interleaved and merged, the ratios within each round, the
Markdown table and section.

A layout PxD is P processes with D CPU devices each: P = 1 is one process (XLA_FLAGS
--xla_force_host_platform_device_count=D), P > 1 is scripts/launch_local.sh P --devices=D, i.e. a real
jax.distributed run on loopback with gloo collectives. The worker command is the caller's (the script itself, with
--worker); JAX is imported inside the worker only.
"""

import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from mmard_jax.tools import bench_cases, bench_step

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository: scripts/launch_local.sh, PYTHONPATH
RESULT = "BENCH_RESULT "  # the worker's line with its JSON row (process 0's)


def parse_layout(text: str) -> tuple:
    """'2x1' -> (2 processes, 1 device each)."""
    try:
        processes, devices = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--layouts: {text!r} is not PxD (processes x devices per process), e.g. 2x1") from None
    if processes < 1 or devices < 1:
        raise SystemExit(f"--layouts: {text!r} needs at least one process and one device")
    return processes, devices


def merge_rounds(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The round with the median step time (the lower one of an even count, as benchmark.py), and every round's
    images/s."""
    good = sorted((r for r in rows if "error" not in r), key=lambda r: r["step_s"])
    if not good:
        return rows[-1]
    row = dict(good[(len(good) - 1) // 2])
    row["rounds"] = len(good)
    row["images_per_s_rounds"] = [r.get("images_per_s") for r in rows]  # in round order (None: failed)
    return row


def round_ratios(rows: List[Dict[str, Any]]) -> List[List[float]]:
    """Per layout, its images/s over the first layout's in each round: measured side by side, under the same load."""
    ref = rows[0].get("images_per_s_rounds", [])
    return [[a / b if a and b else float("nan") for a, b in zip(r.get("images_per_s_rounds", []), ref)]
            for r in rows]


def table(rows: List[Dict[str, Any]]) -> str:
    """Markdown: one line per layout; ratios against the first layout, round by round."""
    lines = ["| layout | processes x devices | step (s, median) | images/s (median) | images/s per round | "
             "vs first, per round | compile (s) | load avg |", "|---|---|---:|---:|---|---|---:|---:|"]
    for r, ratios in zip(rows, round_ratios(rows)):
        if "error" in r:
            lines.append(f"| {r['layout']} | - | - | FAILED: {r['error']} | - | - | - | - |")
            continue
        per_round = ", ".join("-" if v is None else f"{v:.1f}" for v in r["images_per_s_rounds"])
        lines.append(f"| {r['layout']} | {r['processes']} x {r['devices_per_process']} | {r['step_s']:.3f} | "
                     f"{r['images_per_s']:.1f} | {per_round} | {', '.join(f'{x:.2f}x' for x in ratios)} | "
                     f"{r['compile_s']:.1f} | {r['load_avg_before']:.1f} / {r['load_avg_1min']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one process of a layout


def worker(case_name: str, warmup: int, steps: int, unroll: str, seed: int = 0) -> Dict[str, Any]:
    """Compiles and times the case's train step on the global mesh (every process; the result is process 0's)."""
    import jax
    import numpy as np

    from mmard_jax import parallel, train_step

    case = bench_cases.CASES[case_name]
    build, nets, method, txs, mesh = bench_step.jax_step_builder(case, seed)
    shape = (case.size, case.size, 3)
    frozen, initial = bench_step.split_start(bench_step.sharpen_teacher(
        case, bench_step.frozen_variables(case, nets, bench_step.teacher_init(seed, shape))))
    frozen = parallel.put_replicated(frozen, mesh)
    state = parallel.put_replicated(train_step.init_state(nets, method, txs, jax.random.key(seed, impl="rbg"), shape,
                                                          initial=initial), mesh)
    rng = np.random.default_rng(seed)  # the same draws in every process
    n_images = max(4 * case.batch, 512)
    images, labels = parallel.put_replicated((rng.integers(0, 256, (n_images,) + shape, dtype=np.uint8),
                                              rng.integers(0, 10, n_images).astype(np.int32)), mesh)
    total = warmup + steps
    idx = np.stack([rng.permutation(n_images)[: case.batch] for _ in range(total)]).astype(np.int32)
    batches = [parallel.put_batch(row, mesh) for row in idx]  # each process transfers its share only
    epoch = np.asarray(0, np.int32)

    t0 = time.perf_counter()
    compiled = build(case.pgd_steps, unroll).lower(state, frozen, images, labels, batches[0], epoch).compile()
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        state, metrics = compiled(state, frozen, images, labels, batches[i], epoch)
    jax.block_until_ready(state)
    times = []
    start = time.perf_counter()
    for i in range(warmup, total):
        t = time.perf_counter()
        state, metrics = compiled(state, frozen, images, labels, batches[i], epoch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    jax.block_until_ready(state)
    total_s = time.perf_counter() - start
    out = {
        "processes": jax.process_count(), "devices_per_process": jax.local_device_count(),
        "n_devices": mesh.devices.size, "backend": jax.default_backend(), "compile_s": compile_s,
        "loss": float(metrics["loss"]), "versions": f"jax {jax.__version__}, jaxlib {jax.lib.__version__}",
        "peak_rss_bytes": bench_step.peak_rss_bytes(),
    }
    out.update(bench_step.summarize(times, case.batch, total_s, steps))
    return out


def run_worker(coordinator_address: Optional[str], num_processes: Optional[int], process_id: Optional[int],
               case_name: str, warmup: int, steps: int, unroll: str) -> Optional[str]:
    """One process of a layout: joins the run (`distributed.initialize`), times the step; process 0's result line
    (RESULT + JSON) for its caller to print, None in the other processes."""
    from mmard_jax import distributed

    distributed.initialize(coordinator_address, num_processes, process_id, init_timeout=300)
    result = worker(case_name, warmup, steps, unroll)
    import jax

    return RESULT + json.dumps(result) if jax.process_index() == 0 else None


# ----------------------------------------------------------------------------- driver


def run_layout(layout: str, worker_cmd: Sequence[str], timeout: float) -> Dict[str, Any]:
    """One measurement of a layout in fresh processes running `worker_cmd` (the script with --worker and the case's
    arguments); its result row, or {'error': ...}."""
    processes, devices = parse_layout(layout)
    worker_cmd = list(worker_cmd)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), PYTHON=sys.executable)
    if processes == 1:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
        cmd = worker_cmd
    else:
        cmd = [str(ROOT / "scripts" / "launch_local.sh"), str(processes), f"--devices={devices}", "--", *worker_cmd]
    load_before = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"layout": layout, "error": f"timed out after {timeout} s"}
    found = [line.split(RESULT, 1)[1] for line in proc.stdout.splitlines() if RESULT in line]
    if proc.returncode or not found:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"layout": layout, "error": f"exit {proc.returncode}: {tail[:300]}"}
    return dict(json.loads(found[-1]), layout=layout, load_avg_before=load_before)


def check_layouts(case_name: str, layouts: Sequence[str]) -> None:
    """SystemExit unless the case exists and its batch divides by every layout's device count."""
    if case_name not in bench_cases.CASES:
        raise SystemExit(f"unknown case {case_name!r}; known: {', '.join(bench_cases.CASES)}")
    for layout in layouts:
        processes, devices = parse_layout(layout)
        if bench_cases.CASES[case_name].batch % (processes * devices):
            raise SystemExit(f"layout {layout}: the case's batch does not divide by {processes * devices} devices")


def run(layouts: Sequence[str], worker_cmd: Sequence[str], repeat: int, timeout: float,
        say: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Every layout `repeat` times, rounds interleaved (a change of load hits every layout alike); the merged row
    of each layout (`merge_rounds`), in the order of `layouts`."""
    rounds = {layout: [] for layout in layouts}
    for r in range(repeat):
        for layout in layouts:
            row = run_layout(layout, worker_cmd, timeout)
            rounds[layout].append(row)
            shown = row.get("error") or f"{row['step_s']:.3f} s/step, {row['images_per_s']:.1f} img/s"
            say(f"[round {r + 1}/{repeat}] {layout}: {shown}")
    return [merge_rounds(rounds[layout]) for layout in layouts]


def section(rows: List[Dict[str, Any]], case_name: str, layouts: str, warmup: int, steps: int, repeat: int) -> str:
    """The Markdown section of a run: its command, the case, the versions and the table."""
    case = bench_cases.CASES[case_name]
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    good = next((r for r in rows if "error" not in r), {})
    return (f"\n## Process boundary: {case_name} ({when})\n\n"
            f"`python scripts/benchmark_multiprocess.py --cases={case_name} --layouts={layouts} "
            f"--warmup={warmup} --steps={steps} --repeat={repeat}`: {bench_cases.describe(case)}; "
            f"{good.get('versions', '')}, {good.get('backend', '?')}, {good.get('cpus', '?')} CPU(s); gloo "
            f"collectives between processes. Rounds interleave the layouts; the ratio is taken within each round. Load "
            f"average: the 1-minute value before the median round's layout started / at its end.\n\n"
            f"{table(rows)}\n")
