"""Times the Tiny-ImageNet loader on a synthetic copy in the official layout: the first load (JPEG decode + cache
write) and a cached load, from the zip and from the extracted folder, extrapolated to the real 110,000 images.

    python scripts/bench_data_loading.py [--per_class=50]     # 200 classes x 50 train + 1,000 val JPEGs

Prints a Markdown table (BENCHMARKS.md, "Data loading"). The work is `mmard_jax.tools.bench_data`.
"""

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from mmard_jax.tools import bench_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per_class", type=int, default=50, help="Train JPEGs per class (val: 20x this).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_data.run(pathlib.Path(tmp), args.per_class)
    print(bench_data.table(rows))


if __name__ == "__main__":
    main()
