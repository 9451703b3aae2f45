"""Device memory of a train step from the compiled program's buffer assignment, with the training split resident.

    python scripts/step_memory.py --cases=adaad_prn18saad_dmwrn28_10_64px_f32 --n_images=100000

Compiles each case of `scripts/benchmark.py --list` on abstract inputs (no weights, no data, nothing allocated) and
prints a Markdown table (BENCHMARKS.md, "Device memory"): the resident split, the trained state, the teachers, XLA's
temporaries and the peak. On the CPU it is the CPU compiler's plan, an estimate of a GPU's. The work is
`mmard_jax.tools.bench_memory`.
"""

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from mmard_jax.tools import bench_cases, bench_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="adaad_prn18saad_dmwrn28_10_64px_f32",
                        help="Comma-separated case names or groups of scripts/benchmark.py.")
    parser.add_argument("--n_images", type=int, default=100_000,
                        help="Images resident (Tiny-ImageNet's train split: 100,000).")
    parser.add_argument("--unroll", default="1", help="The PGD loop's unrolling (1: rolled, the GPU default).")
    args = parser.parse_args()
    try:
        names = bench_cases.case_names(args.cases)
    except ValueError as e:
        parser.error(str(e))
    rows = []
    for name in names:
        start = time.perf_counter()
        memory = bench_memory.step_memory(bench_cases.CASES[name], args.n_images, args.unroll)
        print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        rows.append({"case": name, "n_images": args.n_images, "memory": memory})
    print(bench_memory.table(rows))


if __name__ == "__main__":
    main()
