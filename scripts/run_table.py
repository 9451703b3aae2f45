"""Runs one table (or figure) of the paper in sequence and collects the results into one Markdown table.

    python scripts/run_table.py --table=configs/table3.py --workroot=runs/table3 [--only=method=mmard]
    python scripts/run_table.py --table=configs/table3.py --workroot=runs/table3 --collect_only

Each run of the config file's RUNS goes to WORKROOT/<run>, resumes if interrupted, and is skipped when its
summary.json exists (`mmard_jax.tools.run_table`). The table is written to WORKROOT/table.md and printed.
Overrides after `--` apply to every run, e.g. `-- --config.num_epochs=1 --config.dataset.n_train=512`.
"""

import pathlib
import sys

from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from mmard_jax import cli, runtime, xla_env  # noqa: E402
from mmard_jax.tools import run_table  # noqa: E402

FLAGS = flags.FLAGS


def main(argv):
    runtime.quiet_logging()
    runtime.enable_compilation_cache()
    print(run_table.run_table(FLAGS.table, FLAGS.workroot, FLAGS.only, argv[1:], FLAGS.collect_only))


if __name__ == "__main__":
    flags.DEFINE_string("table", None, "A table config file, e.g. configs/table3.py.", required=True)
    flags.DEFINE_string("workroot", None, "Directory holding one workdir per run.", required=True)
    flags.DEFINE_multi_string("only", [], "Keep runs whose argument contains this key=value (repeatable).")
    flags.DEFINE_bool("collect_only", False, "Do not train; only collect finished runs into the table.")
    xla_env.apply_cpu_defaults()
    cli.run(main)
