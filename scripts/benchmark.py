"""Times mmard_jax's fused train step against a PyTorch implementation of the same step, on the same device.

    python scripts/benchmark.py --cases=cpu_mmard_wrn16_2_wrn10_1_16px --append=BENCHMARKS.md
    python scripts/benchmark.py --cases=mmard_rn18_wrn34_10,mmard_mnv2_wrn34_10,rslad_rn18_wrn34_10 \
        --torch_forms=eager,cl+compile+bf16 --append=BENCHMARKS.md          # on a GPU
    python scripts/benchmark.py --list                                      # the cases

For each case (method, student, teacher, batch, image size, compute dtype) it measures the whole step in
steady state: images/s, compile time, peak memory (the device's peak where `memory_stats()` has one, the
process's peak RSS on the CPU), FLOPs per step from XLA's cost analysis, achieved TFLOP/s and the fraction
of the device's dense peak. Every (case, implementation) runs in its own process, so peak memory and
thread pools are its own; the PyTorch rows reuse the JAX row's FLOP count (the same computation).

Same work on both sides: the JAX worker writes its initial variables (student, teacher, peer) and its first step's
random draws (crop offsets, flips, attack start) to a file that the PyTorch worker loads, both draw the same batches,
and each row reports its first step's loss; a PyTorch row whose loss differs from the JAX row's by more than the
rounding of the two compute dtypes (`bench_report.LOSS_RTOL`) is marked 'not comparable' in the table.

The cases are `mmard_jax.tools.bench_cases`, our row `bench_step`, the driver `bench_driver`, the table
`bench_report`; the PyTorch row is tests/peers/torch_bench.py.
"""

import json
import pathlib
import sys

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # mmard_jax, and the PyTorch peers (`peers`)

from mmard_jax.tools import bench_cases, bench_defaults, bench_driver, bench_report  # noqa: E402 - no JAX yet: a worker sets XLA's flags first

flags.DEFINE_string("cases", "cpu_mmard_wrn16_2_wrn10_1_16px",
                    f"Comma-separated names from --list, or groups: {', '.join(bench_cases.GROUPS)}.")
flags.DEFINE_bool("list", False, "Print the cases and exit.")
flags.DEFINE_string("unroll", "auto", "Comma-separated PGD unroll settings for the JAX rows.")
flags.DEFINE_string("conv_grad", "", "Comma-separated MMARD_JAX_CONV_GRAD settings for the JAX rows (auto, custom, "
                    "lax: layers.conv2d's input gradient; default: the environment's).")
flags.DEFINE_string("torch_forms", None, "Comma-separated: eager, or options joined by + from cl, bf16, compile, "
                    "f64 ('' for none; default: eager and the fastest form for the device).")
flags.DEFINE_bool("match_dtype", False, "Each case runs only the PyTorch forms of its compute dtype: bfloat16 cases "
                  "the forms with bf16, float64 cases (*_f64) those with f64, float32 cases the others (the paper "
                  "group and its _f32 twins in one table without running the same PyTorch row twice).")
flags.DEFINE_multi_string("xla_flags", None, "Exact XLA_FLAGS for a JAX row, without mmard_jax's CPU defaults "
                          "(repeat for several rows; '' = none); default: $XLA_FLAGS plus the defaults of "
                          "mmard_jax/xla_env.py.")
flags.DEFINE_string("cpus", "", "Pin every worker to these CPUs, e.g. '1' (both frameworks then use that many "
                    "threads; on a shared machine a one-core comparison is the reproducible one).")
flags.DEFINE_integer("warmup", 2, "Untimed steps (at least 1: the first step's loss is compared across "
                     "implementations).", lower_bound=1)
flags.DEFINE_integer("steps", 5, "Timed steps.")
flags.DEFINE_integer("repeat", 1, "Rounds over all rows, interleaved; the median round is kept.")
flags.DEFINE_integer("timeout", 3600, "Seconds per row.")
flags.DEFINE_float("deadline_s", 0, "Seconds for the whole run (0: none): rows that would start later are recorded "
                   "as skipped, and a row's timeout never runs past it.")
flags.DEFINE_string("append", None, "Append a section with the table to this Markdown file.")
flags.DEFINE_string("json", None, "Write all rows as JSON here (rewritten after every row).")
flags.DEFINE_string("title", "", "Section title (default: the device).")
flags.DEFINE_string("impls", "jax,torch", "Which implementations to time (the FLOP count is always made).")
flags.DEFINE_bool("check_defaults", False, "Measure each CPU default (XLA flag, unroll, conv2d gradient, depthwise "
                  "form) against its alternative on this processor, for the --cases, and say whether it holds.")
flags.DEFINE_bool("pipeline", False, "Measure the streamed input pipeline: grain's images/s per worker count "
                  "(ImageNet-shaped JPEGs, 32x32 PNGs), the resident and streamed trainers on one case, and the CPU "
                  "cores per GPU an ImageNet step needs (mmard_jax/tools/bench_pipeline.py).")
flags.DEFINE_string("pipeline_workers", "0,1,2", "--pipeline: the grain worker-process counts measured.")
flags.DEFINE_integer("pipeline_images", 256, "--pipeline: ImageNet-shaped JPEGs written and read.")
flags.DEFINE_integer("pipeline_batches", 48, "--pipeline: batches timed per loader row (after the first).")
flags.DEFINE_bool("multiprocess", False, "Compare process layouts (1x2 vs 2x1, ...) with "
                  "scripts/benchmark_multiprocess.py; the other arguments are that script's.")
flags.DEFINE_string("compilation_cache", "off", "The JAX rows' persistent XLA compilation cache directory ('off': "
                    "none, so that compile_s is a real compilation; scripts/gpu_check.sh --dry shares one between its "
                    "parts (b) and (c), which then compile their common row once).")
flags.DEFINE_enum("worker", None, ["jax", "torch", "flops"], "(internal) Measure one row in this process.")
flags.DEFINE_string("option", "", "(internal) The worker's unroll setting or PyTorch form.")
flags.DEFINE_string("start_file", None, "(internal) The JAX row's weights and first draws for the PyTorch row.")
FLAGS = flags.FLAGS


def measure_row(case: bench_cases.Case) -> dict:
    """One row in this process: JAX's CPU XLA defaults first (an entry point sets them before JAX starts)."""
    if FLAGS.worker == "torch":
        from peers import torch_bench  # noqa: PLC0415 - torch only in the PyTorch worker

        return torch_bench.torch_worker(case, FLAGS.warmup, FLAGS.steps, FLAGS.option, start_file=FLAGS.start_file)
    from mmard_jax import xla_env  # noqa: PLC0415

    xla_env.apply_cpu_defaults()
    from mmard_jax import runtime  # noqa: PLC0415
    from mmard_jax.tools import bench_step  # noqa: PLC0415

    runtime.enable_compilation_cache(FLAGS.compilation_cache)

    if FLAGS.worker == "flops":
        return bench_step.flops_worker(case, FLAGS.start_file)
    return bench_step.jax_worker(case, FLAGS.warmup, FLAGS.steps, FLAGS.option, start_file=FLAGS.start_file)


def torch_forms() -> str:
    """--torch_forms, or eager and the device's fastest form (none where torch is missing)."""
    if FLAGS.torch_forms is not None:
        return FLAGS.torch_forms
    try:
        from peers import torch_bench  # noqa: PLC0415
    except ImportError:
        return ""
    return torch_bench.default_torch_forms()


def pipeline_main() -> None:
    """--pipeline: the three parts of tools/bench_pipeline.py in this process (JAX's CPU defaults first)."""
    from mmard_jax import xla_env  # noqa: PLC0415

    xla_env.apply_cpu_defaults()
    from mmard_jax import runtime  # noqa: PLC0415
    from mmard_jax.tools import bench_pipeline, machine  # noqa: PLC0415

    runtime.quiet_logging()  # orbax's INFO lines (the trainer's checkpoints), unless --verbosity asks for them

    workers = [int(w) for w in FLAGS.pipeline_workers.split(",") if w]
    cases = bench_cases.case_names(FLAGS.cases if FLAGS["cases"].present else "imagenet_gpu")
    result = bench_pipeline.run(workers, FLAGS.pipeline_images, FLAGS.pipeline_batches, cases,
                                say=lambda line: print(line, flush=True))
    text = bench_pipeline.markdown(result, machine.describe(), "python scripts/benchmark.py " + " ".join(sys.argv[1:]))
    print(text)
    if FLAGS.json:
        pathlib.Path(FLAGS.json).write_text(json.dumps(result, indent=2))
    if FLAGS.append:
        with open(FLAGS.append, "a") as f:
            f.write(text)


def main(argv):
    if FLAGS.pipeline:
        return pipeline_main()
    if FLAGS.list:
        for name, case in bench_cases.CASES.items():
            print(f"{name}: {bench_cases.describe(case)}")
        for name, members in bench_cases.GROUPS.items():
            print(f"group {name}: {members}")
        return
    try:
        names = bench_cases.case_names(FLAGS.cases)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.worker:
        print(json.dumps(measure_row(bench_cases.CASES[names[0]])), flush=True)
        return
    options = bench_driver.Options(
        torch_forms=torch_forms() if "torch" in FLAGS.impls.split(",") else "", match_dtype=FLAGS.match_dtype,
        unroll=FLAGS.unroll, conv_grad=FLAGS.conv_grad, xla_flags=FLAGS.xla_flags, impls=FLAGS.impls,
        cpus=FLAGS.cpus, warmup=FLAGS.warmup, steps=FLAGS.steps, repeat=FLAGS.repeat, timeout=FLAGS.timeout,
        deadline_s=FLAGS.deadline_s, json=FLAGS.json)
    worker = [sys.executable, str(pathlib.Path(__file__).resolve()), f"--compilation_cache={FLAGS.compilation_cache}"]
    if FLAGS.check_defaults:
        say = lambda line: print(line, flush=True)  # noqa: E731
        checks = bench_defaults.verdicts(bench_defaults.run(names, options, worker, say=say))
        print("\n" + bench_defaults.table(checks))
        if FLAGS.json:
            pathlib.Path(FLAGS.json).write_text(json.dumps(checks, indent=2))
        if FLAGS.append:
            command = "python scripts/benchmark.py " + " ".join(sys.argv[1:])
            with open(FLAGS.append, "a") as f:
                f.write(bench_defaults.section(checks, options, command))
        return
    results = bench_driver.run(names, options, worker=worker,
                               say=lambda line: print(line, flush=True))
    print("\n" + bench_report.table(results))
    if FLAGS.append:
        command = "python scripts/benchmark.py " + " ".join(sys.argv[1:])
        bench_driver.append_section(FLAGS.append, results, options, FLAGS.title, command)


if __name__ == "__main__":
    if "--multiprocess" in sys.argv[1:]:  # process layouts side by side: scripts/benchmark_multiprocess.py
        import benchmark_multiprocess

        benchmark_multiprocess.main([a for a in sys.argv[1:] if a != "--multiprocess"])  # errors exit non-zero
        sys.exit(0)
    app.run(main)
