"""The demo: the whole ARD pipeline on the embedded digits set, in a few minutes on a laptop CPU.

    python -m mmard_jax.demo [--workdir=DIR] [--dtype=bfloat16]

1. trains a robust teacher with TRADES (WRN-10-1),
2. distills a student from it with MMARD (ResNet-18 at base width 8),
3. trains the same student naturally, for comparison,
4. evaluates all three (clean, FGSM, PGD_S, PGD_T, CW) on the test split and prints the table.

The radius is eps = 32/255: digits are easy, and at 8/255 even the natural student stays robust.
The demo exits with an error if the MMARD student is not clearly more robust than the natural one.
"""

import pathlib
import sys
import tempfile
import time

from absl import flags

from mmard_jax import cli, files, reporting, runtime, train, xla_env

FLAGS = flags.FLAGS

DEMO_EPS = 32 / 255


def demo_config(role: str, teacher: str = "", dtype: str = "float32"):
    """configs/demo.py's config for one role, at the demo's radius and compute dtype (params stay float32)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "configs"))
    try:
        import demo as demo_configs  # configs/demo.py
    finally:
        sys.path.pop(0)
    config = demo_configs.get_config(f"role={role},teacher={teacher}")
    config.attack.eps = DEMO_EPS
    config.attack.step_size = DEMO_EPS / 4
    config.eval.eps = DEMO_EPS
    config.student.dtype = dtype
    config.teacher.dtype = dtype
    return config


def run_demo(workdir: pathlib.Path, progress: bool = True, dtype: str = "float32"):
    """Runs the three trainings and returns {row name: accuracies} and the wall time."""
    start = time.perf_counter()
    runs = [
        ("teacher: WRN-10-1, TRADES", "teacher", ""),
        ("student: ResNet-18/8, MMARD", "student", str(workdir / "teacher")),
        ("student: ResNet-18/8, natural", "natural", ""),
    ]
    rows = {}
    for title, role, teacher in runs:
        print(f"\n== {title}", flush=True)
        summary = train.train_and_evaluate(demo_config(role, teacher, dtype), workdir / role, progress=progress)
        rows[title] = summary["final"]
    return rows, time.perf_counter() - start


def main(argv):
    del argv
    xla_env.apply_cpu_defaults(FLAGS.xla_cpu_defaults)  # first: before anything may start a JAX backend
    runtime.quiet_logging()
    runtime.enable_compilation_cache(FLAGS.compilation_cache)
    if FLAGS.workdir and pathlib.Path(FLAGS.workdir).exists() and not pathlib.Path(FLAGS.workdir).is_dir():
        raise cli.UserError(f"--workdir={FLAGS.workdir!r} is a file, expected a directory (it is created if missing)")
    if not 0 <= FLAGS.margin < 1:
        raise cli.UserError(f"--margin={FLAGS.margin} must be in [0, 1): an accuracy difference")
    workdir = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="mmard_demo_"))
    rows, seconds = run_demo(workdir, dtype=FLAGS.dtype)
    table = reporting.accuracy_table(rows)
    text = (f"Digits test split (355 images), eps = 32/255, compute dtype {FLAGS.dtype}, accuracy in %:\n\n{table}\n\n"
            f"Total time: {seconds:.0f} s (training, evaluation and compilation).\n")
    files.write_text_atomic(workdir / "demo.md", text)
    print("\n" + text + f"Runs, plots and summaries: {workdir}")
    mmard, natural = rows["student: ResNet-18/8, MMARD"], rows["student: ResNet-18/8, natural"]
    if mmard["pgd_s"] < natural["pgd_s"] + FLAGS.margin:
        print(f"FAILED: the MMARD student's PGD_S accuracy ({mmard['pgd_s']:.2%}) is not {FLAGS.margin:.0%} above "
              f"the natural student's ({natural['pgd_s']:.2%})", file=sys.stderr)
        sys.exit(1)
    if not FLAGS.workdir:
        print("(temporary directory; pass --workdir to keep the runs somewhere else)")


def run():
    flags.DEFINE_string("workdir", None, "Where the three runs go (default: a fresh temporary directory).")
    flags.DEFINE_float("margin", 0.10, "Required PGD_S advantage of the MMARD student over the natural one.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                      "Compute dtype of teacher and students (parameters and BatchNorm statistics stay float32).")
    xla_env.define_flags()
    runtime.define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
