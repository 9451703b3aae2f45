"""Robustness report for any checkpoint: clean accuracy, FGSM, PGD_S, PGD_T, CW_inf and AutoAttack.

    python -m mmard_jax.evaluate --checkpoint=DIR --dataset=cifar10 \\
        [--attacks=clean,fgsm,pgd_s,pgd_t,cw,aa] [--n_examples=N] [--batch_size=500] [--eps=8/255] \\
        [--seed=0] [--output=DIR] [--data_dir=DIR] [--source=auto]

    python -m mmard_jax.evaluate --checkpoint=DIR --dataset=imagenet --data_dir=IMAGENET/val \\
        [--image_list=robustbench] [--chunk_size=1000] [--eval_workers=8]

DIR is a model directory (`mmard_jax.convert`) or a training workdir (its best checkpoint). The whole
test split is evaluated by default; every example counts once (the last partial batch is padded and
masked). ImageNet streams (`run_streamed_evaluation`): RobustBench's protocol, its 5000 listed validation images
of an image folder (or the first --n_examples of a source), resized to 256 and centre-cropped to 224, at eps 4/255,
read --chunk_size images at a time. Writes into --output (default DIR/robustness_<dataset>):
  report.json   accuracies, counts, settings, AutoAttack's per-component breakdown, trust flags, timings
  report.md     the same as a Markdown table in the paper's column order, then the flags
  masks.npz     one bool array [N] per attack: True = example correctly classified under that attack
Exits with status 0 even when trust flags are raised; they are printed and stored in the report.
"""

import dataclasses
import pathlib
import time
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np
from absl import app, flags

from mmard_jax import (
    checkpoints,
    cli,
    data,
    distributed,
    files,
    parallel,
    reporting,
    robustness,
    runtime,
    stopping,
    xla_env,
)
from mmard_jax.attacks import autoattack, suite
from mmard_jax.data import eval_stream, eval_transforms
from mmard_jax.models import store

FLAGS = flags.FLAGS
DEFAULT_ATTACKS = ("clean", "fgsm", "pgd_s", "pgd_t", "cw", "aa")
# Data sets evaluated from a source in chunks (robustness.evaluate_source), never resident: name -> (RobustBench's
# preprocessing, its default L-inf radius, its number of test images). robustbench/data.py:146-153, :20-26;
# model_info/imagenet/Linf/*.json "eps": "4/255".
STREAMED = {"imagenet": ("Res256Crop224", 4 / 255, eval_stream.ROBUSTBENCH_IMAGENET_EXAMPLES)}
IMAGE_LISTS = ("robustbench", "first")


def aa_config_from(n_iter: int = 100, n_targets: int = 9, square_queries: int = 5000,
                   restarts: int = 1, norm: str = "Linf") -> autoattack.AutoAttackConfig:
    """AutoAttack settings from the CLI's budget flags (the defaults give the standard version of the norm)."""
    return dataclasses.replace(robustness.standard_config("standard", norm), n_iter=n_iter,
                               n_target_classes=n_targets, square_queries=square_queries, apgd_restarts=restarts)


def evaluate_model(
    module,
    variables,
    images: np.ndarray,
    labels: np.ndarray,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    *,
    eps: float = 8 / 255,
    norm: str = "Linf",
    batch_size: int = 500,
    seed: int = 0,
    mesh=None,
    unroll=1,
    aa_config: Optional[autoattack.AutoAttackConfig] = None,
    matmul_precision: Optional[str] = "highest",
    compute_dtype: str = "float32",
    progress: bool = True,
) -> Dict[str, Any]:
    """The CLI's evaluation through `robustness` (a Flax module or any apply_fn), as the report's dict:
    {'masks' (with AutoAttack's 'aa_fooled_by'), 'accuracy', 'counts', 'per_class', 'seconds', 'autoattack'
    (when 'aa' ran), 'gradients', 'flags', 'norm', 'eps'}. No files written."""
    ev = robustness.make_evaluator(module, images, labels, norm=norm, eps=eps, batch_size=batch_size, mesh=mesh,
                                   progress=progress, unroll=unroll, aa_config=aa_config,
                                   matmul_precision=matmul_precision)
    say = (lambda name, acc, s: print(f"{name}: {acc:.2%} ({s:.1f} s)", flush=True)) if ev.progress else None
    report = robustness.run(ev, variables, attacks, seed=seed, compute_dtype=compute_dtype, on_result=say)
    body = report.as_dict()
    body["masks"] = dict(report.masks)
    if report.autoattack is not None:
        body["masks"]["aa_fooled_by"] = report.autoattack["fooled_by_example"]
    return body


def markdown_report(title: str, setup: Dict[str, Any], report: Dict[str, Any]) -> str:
    """The report as Markdown: settings, the accuracy table (paper column order), AutoAttack's breakdown, flags."""
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items()]
    lines += ["", "Accuracy (%):", ""]
    table_cols = [c for c in reporting.PAPER_COLUMNS if c in report["accuracy"]]
    extra = [c for c in report["accuracy"] if c not in table_cols]
    lines.append(reporting.accuracy_table({setup.get("model", "model"): report["accuracy"]},
                                          columns=tuple(table_cols) + tuple(extra)))
    if "autoattack" in report:
        aa = report["autoattack"]
        lines += ["", f"AutoAttack ({aa['version']}), robust accuracy after each component:", ""]
        lines.append("| " + " | ".join(autoattack.TITLES[c] for c in aa["accuracy_after"] if c != "aa") + " |")
        lines.append("|" + "---:|" * (len(aa["accuracy_after"]) - 1))
        lines.append("| " + " | ".join(f"{100 * v:.2f}" for c, v in aa["accuracy_after"].items() if c != "aa") + " |")
    if report.get("per_class"):
        columns = tuple(table_cols) + tuple(extra)
        lines += ["", "Per class: the worst class's accuracy (%, class in brackets) and the normalised standard "
                  "deviation across classes (NSD: std / mean):", "",
                  reporting.fairness_table({setup.get("model", "model"): report["per_class"]}, columns=columns),
                  "", "Accuracy of each class (%):", "", reporting.per_class_table(report["per_class"], columns)]
    lines += ["", "Trust checks (gradient masking signs, as recommended by AutoAttack's authors):", ""]
    grads = report["gradients"]
    lines.append(f"- input gradients all zero: {grads['zero']:.2%} of examples; NaN/inf: {grads['nonfinite']:.2%}")
    if report["flags"]:
        lines += [f"- **FLAG** {f['check']}: {f['message']}" for f in report["flags"]]
    else:
        lines.append("- no flag raised")
    return "\n".join(lines) + "\n"


def write_report(output: pathlib.Path, title: str, setup: Dict[str, Any], report: Dict[str, Any]) -> pathlib.Path:
    """report.json, report.md and masks.npz in `output` (created)."""
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in report.items() if k != "masks"}
    body.update({"title": title, "setup": setup})
    files.write_json_atomic(output / "report.json", body)
    files.write_text_atomic(output / "report.md", markdown_report(title, setup, report))
    np.savez_compressed(output / "masks.npz", **report["masks"])
    return output


def define_flags():
    """The CLI's flags, defined only when run as a program (the module is also a library)."""
    flags.DEFINE_string("checkpoint", None,
                        "Model directory (mmard_jax.convert) or training workdir (its best checkpoint).")
    flags.DEFINE_enum("dataset", "cifar10", list(data.DATASETS) + list(STREAMED),
                      "Data set whose test split is evaluated (imagenet: streamed from --data_dir).")
    flags.DEFINE_list("attacks", list(DEFAULT_ATTACKS), f"Attacks, from: {', '.join(suite.ATTACKS)}.")
    flags.DEFINE_integer("n_examples", None, "Evaluate the first N test examples (default: the whole split).")
    flags.DEFINE_integer("batch_size", 500, "Global batch size (a multiple of the device count).")
    flags.DEFINE_enum("norm", "Linf", list(robustness.NORMS), "Threat model of every attack.")
    flags.DEFINE_string("eps", None, "Radius, e.g. 8/255 or 0.0314 (default: 8/255 for Linf, 0.5 for L2).")
    flags.DEFINE_integer("seed", 0, "Seed of every random start (per-example keys).")
    flags.DEFINE_string("output", None, "Output directory (default: CHECKPOINT/robustness_<dataset>).")
    flags.DEFINE_string("data_dir", None, "Data directory (default: $MMARD_DATA_DIR or ~/.cache/mmard_jax/data).")
    flags.DEFINE_enum("source", "auto", list(data.SOURCES), "Where the data set is read from (see data.load_dataset).")
    flags.DEFINE_enum("class_order", None, list(data.CLASS_ORDERS),
                      "tiny_imagenet: labels by sorted wnids (default) or wnids.txt's order (see data.load_dataset).")
    flags.DEFINE_enum("image_list", "robustbench", list(IMAGE_LISTS),
                      "imagenet: RobustBench's 5000 listed images of the val folder --data_dir, or the first "
                      "--n_examples images of the source.")
    flags.DEFINE_integer("chunk_size", 1000, "imagenet: images read and attacked at a time (host memory bound).")
    flags.DEFINE_integer("eval_workers", 0, "imagenet: grain worker processes decoding images (0: reader threads).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the model.")
    flags.DEFINE_string("unroll", "auto", "Unrolling of the white-box PGD loops: auto | full | N.")
    flags.DEFINE_integer("aa_iters", 100, "AutoAttack: APGD/APGD-T/FAB-T iterations (standard: 100).")
    flags.DEFINE_integer("aa_targets", 9, "AutoAttack: target classes of APGD-T and FAB-T (standard: 9).")
    flags.DEFINE_integer("aa_queries", 5000, "AutoAttack: Square queries (standard: 5000).")
    flags.DEFINE_integer("aa_restarts", 1, "AutoAttack: APGD-CE restarts (standard: 1).")
    flags.DEFINE_bool("tf32", False, "Allow TF32 matmuls/convolutions for float32 models on GPUs (faster; the report "
                      "then says 'custom', not 'standard'). Default: full float32 precision.")
    distributed.define_flags()
    xla_env.define_flags()
    runtime.define_flags()
    flags.mark_flags_as_required(["checkpoint"])


def check_flags() -> None:
    """User errors in the flags, each one line (cli.run), before anything is loaded."""
    unknown = [a for a in FLAGS.attacks if a not in suite.ATTACKS]
    if unknown:
        raise cli.UserError(f"--attacks: unknown attack(s) {unknown}; known: {', '.join(suite.ATTACKS)}")
    cli.existing_path("checkpoint", FLAGS.checkpoint, kind="dir")
    for name in ("batch_size", "aa_iters", "aa_targets", "aa_queries", "aa_restarts"):
        cli.positive_int(name, FLAGS[name].value)
    if FLAGS.n_examples is not None:
        cli.positive_int("n_examples", FLAGS.n_examples)
    for name in ("chunk_size",):
        cli.positive_int(name, FLAGS[name].value)
    if FLAGS.dataset in STREAMED:
        if not FLAGS.data_dir:
            raise cli.UserError(f"--dataset={FLAGS.dataset} reads --data_dir (an image folder: <root>/<class>/<image>)")
        return
    cli.choice("source", FLAGS.source, data.DATASET_SOURCES[FLAGS.dataset])
    if FLAGS.class_order is not None and FLAGS.dataset != "tiny_imagenet":
        raise cli.UserError(f"--class_order applies to --dataset=tiny_imagenet only, not {FLAGS.dataset}")


def main(argv):
    xla_env.apply_cpu_defaults(FLAGS.xla_cpu_defaults)  # first: before anything may start a JAX backend
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    check_flags()
    eps = robustness.DEFAULT_EPS[FLAGS.norm] if FLAGS.eps is None else cli.parse_eps(FLAGS.eps, norm=FLAGS.norm)
    if FLAGS.dataset in STREAMED and FLAGS.eps is None and FLAGS.norm == "Linf":
        eps = STREAMED[FLAGS.dataset][1]
    runtime.quiet_logging()  # before joining: jax.distributed logs at INFO level
    distributed.initialize_from_flags()
    with stopping.exit_on_lost_process(FLAGS.heartbeat_timeout, then="Rerun the same commands."):
        runtime.enable_compilation_cache(FLAGS.compilation_cache)
        if FLAGS.dataset in STREAMED:
            run_streamed_evaluation(
                FLAGS.checkpoint, streamed_source(FLAGS.dataset, FLAGS.data_dir, FLAGS.image_list), FLAGS.dataset,
                FLAGS.attacks, n_examples=FLAGS.n_examples or -1, chunk_size=FLAGS.chunk_size,
                workers=FLAGS.eval_workers, batch_size=FLAGS.batch_size, eps=eps, norm=FLAGS.norm, seed=FLAGS.seed,
                output=FLAGS.output, dtype=FLAGS.dtype, unroll=FLAGS.unroll,
                matmul_precision=None if FLAGS.tf32 else "highest",
                aa_config=aa_config_from(FLAGS.aa_iters, FLAGS.aa_targets, FLAGS.aa_queries, FLAGS.aa_restarts,
                                         FLAGS.norm))
            return
        run_evaluation(
            FLAGS.checkpoint, FLAGS.dataset, FLAGS.attacks, n_examples=FLAGS.n_examples or -1,
            batch_size=FLAGS.batch_size, eps=eps, norm=FLAGS.norm, seed=FLAGS.seed, output=FLAGS.output,
            data_dir=FLAGS.data_dir, source=FLAGS.source, class_order=FLAGS.class_order, dtype=FLAGS.dtype,
            unroll=FLAGS.unroll,
            matmul_precision=None if FLAGS.tf32 else "highest",
            aa_config=aa_config_from(FLAGS.aa_iters, FLAGS.aa_targets, FLAGS.aa_queries, FLAGS.aa_restarts,
                                     FLAGS.norm),
        )


def run_evaluation(
    checkpoint,
    dataset: str,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    *,
    n_examples: int = -1,
    batch_size: int = 500,
    eps: float = 8 / 255,
    seed: int = 0,
    output: Optional[str] = None,
    data_dir: Optional[str] = None,
    source: str = "auto",
    class_order: Optional[str] = None,
    dtype: str = "float32",
    unroll="auto",
    aa_config: Optional[autoattack.AutoAttackConfig] = None,
    matmul_precision: Optional[str] = "highest",
    norm: str = "Linf",
    progress: bool = True,
) -> Dict[str, Any]:
    """The CLI's work: load the checkpoint and the test split, evaluate, write and print the report."""
    checkpoint = pathlib.Path(checkpoint).absolute()
    mesh = parallel.data_mesh()
    parallel.check_divisible(batch_size, mesh, "--batch_size")  # the run's one check, before anything loads
    test = data.load_dataset(dataset, "test", data_dir=data_dir, source=source, class_order=class_order)
    images, labels = test.images, test.labels
    if n_examples > 0:
        images, labels = images[:n_examples], labels[:n_examples]
    module, variables = checkpoints.load_model(checkpoint, dtype=dtype, input_shape=images.shape[1:])
    if module.num_classes != test.num_classes:
        raise cli.UserError(f"{checkpoint} has {module.num_classes} classes, {dataset} has {test.num_classes}")
    start = time.perf_counter()
    report = evaluate_model(module, variables, images, labels, attacks, eps=eps, norm=norm, batch_size=batch_size,
                            seed=seed,
                            mesh=mesh, unroll=runtime.resolve_unroll(unroll), aa_config=aa_config,
                            matmul_precision=matmul_precision, compute_dtype=dtype, progress=progress)
    report["seconds"]["total"] = time.perf_counter() - start
    setup = report_setup(checkpoint, f"{dataset} test ({len(labels)} of {len(test)} examples)", norm, eps, seed,
                         batch_size, mesh, dtype, matmul_precision)
    return publish(checkpoint, dataset, output, setup, report)


def report_setup(checkpoint: pathlib.Path, dataset_line: str, norm: str, eps: float, seed: int, batch_size: int, mesh,
                 dtype: str, matmul_precision: Optional[str]) -> Dict[str, Any]:
    """The report's setup block (what was evaluated, how), shared by the resident and the streamed evaluation."""
    return {
        "model": checkpoint.name,
        "checkpoint": str(checkpoint),
        "arch": store.read_spec(checkpoint)["arch"],
        "dataset": dataset_line,
        "norm": norm,
        "eps": f"{eps:.6g} ({eps * 255:.4g}/255)" if norm == "Linf" else f"{eps:.6g}",
        "seed": seed,
        "batch size": batch_size,
        "devices": f"{mesh.devices.size} x {jax.devices()[0].platform}",
        "dtype": dtype,
        "matmul precision": matmul_precision or "default (TF32 on GPUs)",
    }


def publish(checkpoint: pathlib.Path, dataset: str, output, setup: Dict[str, Any],
            body: Dict[str, Any]) -> Dict[str, Any]:
    """Writes the report files (default: CHECKPOINT/robustness_DATASET) and prints the report, by process 0 only;
    returns `body`."""
    output = pathlib.Path(output) if output else checkpoint / f"robustness_{dataset}"
    title = f"Robustness of {checkpoint.name} on {dataset}"
    if parallel.is_primary():
        write_report(output, title, setup, body)
        print(markdown_report(title, setup, body))
        print(f"wrote {output / 'report.json'}, report.md, masks.npz", flush=True)
    return body


def streamed_source(dataset: str, data_dir: str, image_list: str = "robustbench"):
    """The test source of a streamed data set: RobustBench's listed images of the val folder `data_dir`, or (image_list
    'first') the whole folder, or the validation split of a prepared tfds `imagenet2012` copy in `data_dir`, as
    mmard_jax.data.sources reads them, evaluated from its start."""
    if dataset not in STREAMED:
        raise cli.UserError(f"{dataset} is not evaluated streamed; streamed: {', '.join(STREAMED)}")
    if image_list == "robustbench":
        return eval_stream.robustbench_imagenet(data_dir)
    from mmard_jax.data import sources  # the streamed pipeline's sources (issue 26)

    root = pathlib.Path(data_dir)  # a prepared tfds copy keeps its data set's folder (tfds data_dir layout)
    if (root / "imagenet2012").is_dir():
        return sources.tfds("imagenet2012", "validation", data_dir)
    return sources.image_folder(root)


def run_streamed_evaluation(
    checkpoint,
    source,
    dataset: str = "imagenet",
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    *,
    n_examples: int = -1,
    chunk_size: int = 1000,
    workers: int = 0,
    batch_size: int = 500,
    eps: Optional[float] = None,
    norm: str = "Linf",
    seed: int = 0,
    output: Optional[str] = None,
    dtype: str = "float32",
    unroll="auto",
    aa_config: Optional[autoattack.AutoAttackConfig] = None,
    matmul_precision: Optional[str] = "highest",
    preprocessing: Optional[str] = "default",
    progress: bool = True,
) -> Dict[str, Any]:
    """`run_evaluation` for a split read from `source` in chunks (robustness.evaluate_source): the data set's
    RobustBench preprocessing (STREAMED; or `preprocessing`, an eval_transforms.PREPROCESSINGS name), its number
    of test images unless `n_examples`, the model at the preprocessed size. Writes and prints the same report."""
    checkpoint = pathlib.Path(checkpoint).absolute()
    mesh = parallel.data_mesh()
    parallel.check_divisible(batch_size, mesh, "--batch_size")
    default_prep, default_eps, default_n = STREAMED.get(dataset, (None, None, -1))
    prep = default_prep if preprocessing == "default" else preprocessing
    transform = eval_transforms.PREPROCESSINGS[prep]
    n = min(len(source), n_examples if n_examples > 0 else (default_n if default_n > 0 else len(source)))
    first = transform(np.asarray(source[0]["image"], np.uint8))
    module, variables = checkpoints.load_model(checkpoint, dtype=dtype, input_shape=first.shape)
    num_classes = getattr(source, "num_classes", None)
    if num_classes is not None and module.num_classes != num_classes:
        raise cli.UserError(f"{checkpoint} has {module.num_classes} classes, the source has {num_classes}")
    eps = default_eps if eps is None and norm == "Linf" else eps  # None otherwise: the norm's default radius
    start = time.perf_counter()
    report = robustness.evaluate_source(
        module, variables, source, transform=transform, attacks=attacks, norm=norm, eps=eps,
        chunk_size=chunk_size, n_examples=n, workers=workers, batch_size=batch_size, seed=seed, mesh=mesh,
        progress=progress, compute_dtype=dtype, unroll=runtime.resolve_unroll(unroll), aa_config=aa_config,
        matmul_precision=matmul_precision)
    body = report.as_dict()
    body["masks"] = dict(report.masks)
    if report.autoattack is not None:
        body["masks"]["aa_fooled_by"] = report.autoattack["fooled_by_example"]
    body["seconds"]["total"] = time.perf_counter() - start
    setup = report_setup(checkpoint, f"{dataset} ({n} of {len(source)} images, {prep or 'as stored'}, streamed in "
                         f"chunks of {chunk_size})", norm, report.eps, seed, batch_size, mesh, dtype, matmul_precision)
    return publish(checkpoint, dataset, output, setup, body)


def run():
    """Console-script entry point (`mmard-evaluate`)."""
    define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
