"""The cost of the process boundary: the fused train step's images/s in several process layouts, side by side.

    python scripts/benchmark_multiprocess.py --cases=cpu_mmard_wrn16_2_wrn10_1_16px --layouts=1x2,2x1 \
        [--repeat=2] [--append=BENCHMARKS.md]
    python scripts/benchmark.py --multiprocess --cases=...          # the same, through benchmark.py

A layout PxD is P processes with D CPU devices each: P = 1 is one process (XLA_FLAGS
--xla_force_host_platform_device_count=D), P > 1 is scripts/launch_local.sh P --devices=D, i.e. a real
jax.distributed run on loopback with gloo collectives. Every layout computes the same global batch (the
case's), so the images/s are directly comparable; the first layout is the reference of the ratio column.
Rounds are interleaved (--repeat) so that a change of load hits every layout alike; the median round is kept.
The case, its step and its data come from mmard_jax.tools.bench_cases and bench_step (random weights and data,
resident on the devices); the timing loop here feeds every process only its share (mmard_jax.parallel).
"""

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Dict, List

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmard_jax.tools import bench_cases, bench_step  # noqa: E402 - neither starts JAX
from mmard_jax.tools.bench_layouts import merge_rounds, parse_layout, table  # noqa: E402

RESULT = "BENCH_RESULT "


# ----------------------------------------------------------------------------- one process of a layout


def worker(case_name: str, warmup: int, steps: int, unroll: str, seed: int = 0) -> Dict[str, Any]:
    """Compiles and times the case's train step on the global mesh (every process; the result is process 0's)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mmard_jax import parallel, train_step

    case = bench_cases.CASES[case_name]
    build, nets, method, txs, mesh = bench_step.jax_step_builder(case, seed)
    shape = (case.size, case.size, 3)
    init = lambda m: jax.jit(lambda k: m.init(k, jnp.zeros((1,) + shape), train=False))(  # noqa: E731
        jax.random.key(seed + 1, impl="rbg"))
    frozen = parallel.put_replicated(bench_step.frozen_variables(case, nets, init), mesh)
    state = parallel.put_replicated(train_step.init_state(nets, method, txs, jax.random.key(seed, impl="rbg"), shape),
                                    mesh)
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


def worker_main(args) -> None:
    from mmard_jax import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id, init_timeout=300)
    result = worker(args.cases, args.warmup, args.steps, args.unroll)
    import jax

    if jax.process_index() == 0:
        print(RESULT + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver


def run_layout(layout: str, args) -> Dict[str, Any]:
    """One measurement of a layout in fresh processes; its result row, or {'error': ...}."""
    processes, devices = parse_layout(layout)
    worker_cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "--cases", args.cases,
                  "--warmup", str(args.warmup), "--steps", str(args.steps), "--unroll", args.unroll]
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
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"layout": layout, "error": f"timed out after {args.timeout} s"}
    found = [line.split(RESULT, 1)[1] for line in proc.stdout.splitlines() if RESULT in line]
    if proc.returncode or not found:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"layout": layout, "error": f"exit {proc.returncode}: {tail[:300]}"}
    return dict(json.loads(found[-1]), layout=layout, load_avg_before=load_before)


def section(rows: List[Dict[str, Any]], args) -> str:
    case = bench_cases.CASES[args.cases]
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    good = next((r for r in rows if "error" not in r), {})
    return (f"\n## Process boundary: {args.cases} ({when})\n\n"
            f"`python scripts/benchmark_multiprocess.py --cases={args.cases} --layouts={args.layouts} "
            f"--warmup={args.warmup} --steps={args.steps} --repeat={args.repeat}`: {bench_cases.describe(case)}; "
            f"{good.get('versions', '')}, {good.get('backend', '?')}, {good.get('cpus', '?')} CPU(s); gloo "
            f"collectives between processes. Rounds interleave the layouts; the ratio is taken within each round. Load "
            f"average: the 1-minute value before the median round's layout started / at its end.\n\n"
            f"{table(rows)}\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="cpu_mmard_wrn16_2_wrn10_1_16px", help="one case of scripts/benchmark.py")
    p.add_argument("--layouts", default="1x2,2x1", help="comma-separated PxD: P processes x D CPU devices each")
    p.add_argument("--unroll", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds over the layouts; the median is kept")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per layout")
    p.add_argument("--append", default=None, help="append a section with the table to this Markdown file")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--coordinator_address", help=argparse.SUPPRESS)
    p.add_argument("--num_processes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--process_id", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    if args.cases not in bench_cases.CASES:
        raise SystemExit(f"unknown case {args.cases!r}; known: {', '.join(bench_cases.CASES)}")
    if args.worker:
        worker_main(args)
        return []
    layouts = [x for x in args.layouts.split(",") if x]
    for layout in layouts:
        processes, devices = parse_layout(layout)
        if bench_cases.CASES[args.cases].batch % (processes * devices):
            raise SystemExit(f"layout {layout}: the case's batch does not divide by {processes * devices} devices")
    rounds = {layout: [] for layout in layouts}
    for r in range(args.repeat):
        for layout in layouts:
            row = run_layout(layout, args)
            rounds[layout].append(row)
            shown = row.get("error") or f"{row['step_s']:.3f} s/step, {row['images_per_s']:.1f} img/s"
            print(f"[round {r + 1}/{args.repeat}] {layout}: {shown}", flush=True)
    rows = [merge_rounds(rounds[layout]) for layout in layouts]
    print("\n" + table(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.append:
        with pathlib.Path(args.append).open("a") as f:
            f.write(section(rows, args))
    return rows


if __name__ == "__main__":
    main()
