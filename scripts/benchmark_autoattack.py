"""Times our JAX AutoAttack against the original (Croce & Hein's code, PyPI `pyautoattack` 0.2.0) on the same
weights of an adversarially trained model, standard budget, in one run, as a user would run each.

    python scripts/benchmark_autoattack.py --output=aa.jsonl          # the realistic case (a few minutes to train)
    python scripts/benchmark_autoattack.py --n_examples=8 --batch_size=8 --n_iter=5 --targets=2 --queries=50
                                                                      # a smoke test of the script
    python scripts/benchmark_autoattack.py --worst_case --n_examples=16 --batch_size=16 --n_iter=10 \
        --targets=3 --queries=100                                     # the contrived worst case (below)
    python scripts/benchmark_autoattack.py --batch_curve              # time per example by batch size (below)

Model: RobustBench's WideResNet-10-1 architecture (`peers.robustbench`) and its Flax twin (mmard_jax
`wide_resnet`, depth 10, width 1), trained here by the library's trainer with PGD adversarial training (method
'sat' at eps 4/255, PGD-5, step 1/255, 3 epochs, SGD lr 0.3, seeded: `mmard_jax.tools.aa_bench.TRAIN` says why),
then copied into the PyTorch module (`peers.interop.copy_into_torch`; the logits are checked to agree). The
training workdir (`--model_dir`) is kept, so a rerun skips training (a workdir of another recipe is refused).

Data: scikit-learn's bundled digits upsampled to 32x32 at a quarter of the contrast (`aa_bench`'s docstring says
why). `--n_examples` test images are attacked.

Runs, in this order and on the same 200 images: ours in this process with an empty persistent compile cache
(first run, compilation included), ours again in this process (steady state), ours in a fresh process with
the persistent cache written by the first run (`runtime.enable_compilation_cache`; `--cache_dir`, default a
new temporary directory), then the original `AutoAttack(version='standard').run_standard_evaluation` with
torch on all the machine's cores (`--torch_threads`). Each run records the time of each component (ours:
the cascade's own timing, XLA compilation included, and the compilation time from JAX's monitoring events;
the original: the time in each attack's `perturb`), the robust accuracy after each component, and the
per-example masks, which are compared (the randomised components draw their randomness differently, so a
few examples may differ). A Markdown table is printed; `--output` appends the result as one JSON line.

`--batch_curve`: only the time per example and iteration of our APGD-T and FAB-T programs in one exact batch of
each of the evaluator's shapes from 4 up (20 iterations, one target): the measurement behind the CPU plans
(`batch_plan.BATCH_OVERHEAD_EXAMPLES`, `batch_plan.cache_cap`: on a CPU a batch costs about its size until its
activations outgrow the last-level cache, so the points still robust go in several cache-sized batches).

`--worst_case`: the old contrived case, kept as a labelled worst case: RobustBench's ResNet-18 with random
weights (non-trivial BatchNorm statistics), uniform random images labelled by the model (clean accuracy
100%), eps = 1e-5, so that no component fools any point and both sides spend every component's whole budget
on every example; at the standard budget this is out of reach on a CPU (pass a reduced one, which the
result labels as custom).
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # mmard_jax, and the PyTorch peers (`peers`)

flags.DEFINE_integer("n_examples", 200, "Test images attacked.")
flags.DEFINE_integer("batch_size", 200, "Evaluation batch size.")
flags.DEFINE_enum("norm", "Linf", ["Linf", "L2"], "Threat model of both AutoAttacks (ours and the original).")
flags.DEFINE_string("eps", None, "Radius (default 8/255 under Linf, 0.5 under L2; --worst_case: 1e-5).")
flags.DEFINE_integer("n_iter", 100, "APGD-CE / APGD-T / FAB-T iterations (standard 100).")
flags.DEFINE_integer("targets", 9, "APGD-T / FAB-T target classes (standard 9).")
flags.DEFINE_integer("queries", 5000, "Square queries (standard 5000).")
flags.DEFINE_integer("seed", 0, "Seed of the attacks (and of the worst case's model and images).")
flags.DEFINE_string("output", None, "Append the result as one JSON line to this file.")
flags.DEFINE_string("cache_dir", None, "Persistent XLA compile cache (default: a new temporary directory, so the "
                    "first run compiles from scratch).")
flags.DEFINE_string("model_dir", str(pathlib.Path.home() / ".cache/mmard_jax/benchmark_aa_wrn10_1_sat_eps4"),
                    "The model's training workdir (trained when it holds no finished run).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: the machine's cores).")
flags.DEFINE_bool("worst_case", False, "The contrived worst case (random ResNet-18).")
flags.DEFINE_bool("skip_original", False, "Do not run the original AutoAttack.")
flags.DEFINE_bool("skip_fresh_process", False, "Do not run ours in a fresh process.")
flags.DEFINE_bool("batch_curve", False, "Only time our APGD-T and FAB-T per example and iteration at the "
                  "evaluator's batch shapes (the CPU plans of batch_plan.plan_batches).")
flags.DEFINE_bool("child", False, "(internal) The fresh-process run: ours only, its summary as JSON.")
FLAGS = flags.FLAGS


def fresh_process(cache_dir: str):
    """Ours once more in a new Python process with the persistent compile cache of this run."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"--cache_dir={cache_dir}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def append_json(record) -> None:
    if FLAGS.output:
        with open(FLAGS.output, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv):
    from mmard_jax import xla_env

    xla_env.apply_cpu_defaults()  # before JAX starts
    import dataclasses

    import torch

    from mmard_jax import cli, evaluator, parallel, runtime
    from mmard_jax.attacks import autoattack
    from mmard_jax.tools import aa_bench, machine
    from peers import original_aa

    cache_dir = FLAGS.cache_dir or tempfile.mkdtemp(prefix="mmard_aa_benchmark_xla_")
    cache_was_empty = not any(pathlib.Path(cache_dir).glob("*")) if pathlib.Path(cache_dir).exists() else True
    runtime.enable_compilation_cache(cache_dir)
    default_eps = "1e-5" if FLAGS.worst_case else ("8/255" if FLAGS.norm == "Linf" else "0.5")
    eps = cli.parse_eps(FLAGS.eps or default_eps, norm=FLAGS.norm)
    config = dataclasses.replace(autoattack.STANDARD, n_iter=FLAGS.n_iter, n_target_classes=FLAGS.targets,
                                 square_queries=FLAGS.queries, norm=FLAGS.norm)
    torch.set_num_threads(FLAGS.torch_threads or os.cpu_count())
    if FLAGS.worst_case:
        case = original_aa.worst_case(FLAGS.n_examples, FLAGS.seed)
    else:
        module, variables = aa_bench.trained_wrn(FLAGS.model_dir, progress=not FLAGS.child)
        images, labels = aa_bench.digits32("test")
        case = (module, variables, original_aa.robustbench_wrn10_1(variables), images[:FLAGS.n_examples],
                labels[:FLAGS.n_examples], f"RobustBench WRN-10-1, PGD-trained here (digits 32x32, contrast "
                f"{aa_bench.CONTRAST})")
    module, variables, _, images, labels, description = case
    mesh = parallel.data_mesh()
    batch = FLAGS.batch_size - FLAGS.batch_size % mesh.devices.size
    ev = evaluator.Evaluator(module, images, labels, mesh=mesh, batch_size=batch, eps=eps, aa_config=config,
                             progress=not FLAGS.child)
    variables = parallel.put_replicated(variables, mesh)
    if FLAGS.batch_curve:
        sizes = [s for s in ev.shapes if s >= 4 * mesh.devices.size]
        rows = aa_bench.batch_curve(module, variables, images, labels, sizes, eps)
        append_json({"date": time.strftime("%Y-%m-%d"), "host_cpus": os.cpu_count(), "model": description,
                     "batch_curve": rows})
        return
    if FLAGS.child:
        print(json.dumps(aa_bench.summary(aa_bench.run_ours(ev, variables, config, FLAGS.seed))))
        return
    result = original_aa.compare(
        case, ev, variables, config, eps, FLAGS.seed, skip_original=FLAGS.skip_original,
        fresh_process=None if FLAGS.skip_fresh_process else (lambda: fresh_process(cache_dir)),
        header=lambda r: print(json.dumps(dict(r, cache_was_empty=cache_was_empty)), flush=True),
        say=lambda line: print(line, flush=True))
    result["cache_was_empty"] = cache_was_empty
    result["processor"] = machine.describe()  # CPU timings hold on one processor kind: every record names it
    print(json.dumps(result), flush=True)
    print(f"Processor: {result['processor']}\n" + aa_bench.markdown(result))
    append_json(result)


if __name__ == "__main__":
    app.run(main)
