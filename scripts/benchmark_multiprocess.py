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
resident on the devices); the worker, the layouts' processes and the table are mmard_jax.tools.bench_layouts (the
timing loop feeds every process only its share: mmard_jax.parallel).
"""

import argparse
import json
import pathlib
import sys
from typing import Any, Dict, List

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmard_jax.tools import bench_layouts  # noqa: E402 - no JAX yet: a worker starts it


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
    layouts = [x for x in args.layouts.split(",") if x]
    bench_layouts.check_layouts(args.cases, [] if args.worker else layouts)
    if args.worker:
        line = bench_layouts.run_worker(args.coordinator_address, args.num_processes, args.process_id, args.cases,
                                        args.warmup, args.steps, args.unroll)
        if line:
            print(line, flush=True)
        return []
    worker = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "--cases", args.cases,
              "--warmup", str(args.warmup), "--steps", str(args.steps), "--unroll", args.unroll]
    rows = bench_layouts.run(layouts, worker, args.repeat, args.timeout, say=lambda line: print(line, flush=True))
    print("\n" + bench_layouts.table(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.append:
        with pathlib.Path(args.append).open("a") as f:
            f.write(bench_layouts.section(rows, args.cases, args.layouts, args.warmup, args.steps, args.repeat))
    return rows


if __name__ == "__main__":
    main()
