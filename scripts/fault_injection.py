"""Fault injection: SIGKILL a tiny training run at seeded random moments, resume it, compare with an uninterrupted run.

    python scripts/fault_injection.py --trials=10 [--seed=0] [--workdir=DIR] [--keep] [--pipeline=stream]

The run, the kill moments and the comparison are `mmard_jax.tools.fault_injection` (its docstring). Prints a
Markdown table; exits with status 1 if any trial fails.
"""

import pathlib
import sys
import tempfile
import time

from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from mmard_jax import cli  # noqa: E402
from mmard_jax.tools import fault_injection  # noqa: E402

flags.DEFINE_integer("trials", 10, "Number of kills (one per trial).", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
flags.DEFINE_string("workdir", None, "Root directory (default: a new temporary directory).")
flags.DEFINE_bool("keep", False, "Keep the trial workdirs (default: delete passing ones).")
flags.DEFINE_float("timeout", 900, "Seconds one trainer process may take.")
flags.DEFINE_enum("pipeline", "device", list(fault_injection.PIPELINES), "The trainer's input pipeline "
                  "(config.dataset.pipeline): the resident split or the grain stream.")
FLAGS = flags.FLAGS


def main(argv) -> int:
    root = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="mmard_fault_")).absolute()
    begin = time.monotonic()
    rows = fault_injection.run(FLAGS.trials, FLAGS.seed, root, FLAGS.keep, FLAGS.timeout,
                               say=lambda line: print(line, flush=True), pipeline=FLAGS.pipeline)
    ok = fault_injection.passed(rows)
    print(f"\n{fault_injection.table(rows)}\n\n{ok} of {len(rows)} trials ended bitwise equal to the uninterrupted "
          f"run (seed {FLAGS.seed}, {time.monotonic() - begin:.0f} s, in {root})")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    cli.run(main)
