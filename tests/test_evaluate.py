"""The evaluation CLI and its report: a model directory and a training workdir (best checkpoint) load through
`store.load_model`; the whole split is evaluated, the last partial batch counted exactly; the JSON,
Markdown and mask files hold the same numbers; AutoAttack's breakdown and the trust flags reach the report."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tolerances
from mmard_jax import checkpoints, data, evaluate, files, reporting
from mmard_jax.data import eval_stream
from mmard_jax.models import store
from test_attacks_peer import EPS, our_report

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = store.model_spec("wide_resnet", 10, {"depth": 10, "width": 1})


@pytest.fixture(scope="module")
def wrn():
    """A WRN-10-1 with random weights (robustness does not matter here) and its clean predictions on digits."""
    module = store.build_module(SPEC)
    shapes = store.abstract_variables(module, (16, 16, 3))  # no init program to compile
    rng = np.random.default_rng(1)  # seed 0's weights put one example's margin at 1.8e-4: within rounding
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape).astype(np.float32)), shapes)
    variables["batch_stats"] = jax.tree.map(lambda v: jnp.abs(v) + 0.5, variables["batch_stats"])
    test = data.load_dataset("digits", "test")
    logits = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, data.to_float(test.images))
    # The CLI evaluates in other batch shapes (rounding differs: tests/tolerances.py); 10 layers of sums, so 16x
    # the one-layer allowance, and still every decision is clear of it.
    tolerances.assert_decisions_clear(logits, test.labels, "WRN clean logits", ulps=16 * tolerances.REORDER_ULPS)
    return variables, np.asarray(jnp.argmax(logits, -1)) == test.labels


def read_outputs(directory: pathlib.Path):
    report = json.loads((directory / "report.json").read_text())
    masks = dict(np.load(directory / "masks.npz"))
    return report, masks, (directory / "report.md").read_text()


def test_cli_on_a_model_directory_covers_the_whole_split(tmp_path, wrn):
    variables, clean = wrn
    model_dir = store.save_model(tmp_path / "wrn", SPEC, variables)
    out = tmp_path / "report"
    env = dict(os.environ, MMARD_XLA_CACHE="off")
    cmd = [sys.executable, "-m", "mmard_jax.evaluate", f"--checkpoint={model_dir}", "--dataset=digits",
           "--attacks=clean,fgsm", "--batch_size=100", "--eps=32/255", f"--output={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, masks, markdown = read_outputs(out)
    assert masks["clean"].shape == masks["fgsm"].shape == (data.digits.TEST_SIZE,)  # 4 batches, last one of 55
    np.testing.assert_array_equal(masks["clean"], clean)
    for name in ("clean", "fgsm"):
        assert report["accuracy"][name] == pytest.approx(masks[name].mean())
        assert report["counts"][name] == int(masks[name].sum())
    assert report["accuracy"]["fgsm"] <= report["accuracy"]["clean"]
    assert "| model | Clean | FGSM |" in markdown and "| model | Clean | FGSM |" in proc.stdout
    assert report["setup"]["eps"].startswith(f"{32 / 255:.6g}")


def test_run_evaluation_on_a_training_workdir_uses_the_best_checkpoint(tmp_path, wrn):
    variables, clean = wrn
    workdir = tmp_path / "run"
    workdir.mkdir()
    files.write_json_atomic(workdir / store.SPEC_FILE, SPEC)
    saved = checkpoints.TrainCheckpoints(workdir, "pgd_t")
    saved.save_best(7, variables, 0.5)
    saved.close()
    report = evaluate.run_evaluation(workdir, "digits", ["clean"], n_examples=50, batch_size=20, eps=EPS,
                                     progress=False)
    masks = dict(np.load(workdir / "robustness_digits" / "masks.npz"))
    np.testing.assert_array_equal(masks["clean"], clean[:50])  # 3 batches of 20, the last with 10 examples
    assert report["accuracy"]["clean"] == pytest.approx(clean[:50].mean())


def test_report_files_hold_autoattack_breakdown_and_flags(tmp_path):
    report = our_report()  # the robust MLP of test_attacks_peer.py, standard AutoAttack
    setup = {"model": "robust-mlp", "eps": "32/255"}
    evaluate.write_report(tmp_path, "robust MLP", setup, report)
    saved, masks, markdown = read_outputs(tmp_path)
    for name, acc in report["accuracy"].items():
        assert saved["accuracy"][name] == pytest.approx(acc) == pytest.approx(masks[name].mean())
    assert saved["autoattack"]["version"] == "standard"
    assert saved["autoattack"]["accuracy_after"]["aa"] == pytest.approx(report["accuracy"]["aa"])
    assert sum(saved["autoattack"]["fooled_by"].values()) == int(masks["clean"].sum() - masks["aa"].sum())
    assert (masks["aa_fooled_by"] >= 0).sum() == masks["clean"].sum() - masks["aa"].sum()
    paper = [reporting.COLUMN_TITLES[c] for c in reporting.PAPER_COLUMNS if c in report["accuracy"]]
    assert "| model | " + " | ".join(paper) + " | " in markdown  # paper column order first
    assert "no flag raised" in markdown and saved["flags"] == []


def test_only_a_float32_full_precision_evaluation_is_standard():
    """AutoAttack's report says 'standard' only for the standard settings on a float32 model at full float32
    precision: bf16 compute or TF32 matmuls make it 'custom' (and say why)."""
    from mmard_jax.attacks import autoattack

    assert autoattack.describe(autoattack.STANDARD) == "standard"
    bf16 = autoattack.describe(autoattack.STANDARD, compute_dtype="bfloat16")
    tf32 = autoattack.describe(autoattack.STANDARD, matmul_precision=None)
    assert bf16 == "custom (bfloat16 compute)" and tf32.startswith("custom (matmul precision default")


def test_streamed_evaluation_of_an_image_folder(tmp_path, wrn):
    """`run_streamed_evaluation` (the `--dataset=imagenet` path) on a RobustBench-style val folder: 32 digits as PNGs
    in class folders, listed out of folder order, read in chunks of 8 through grain: the clean mask is the resident
    one's for the listed images, in the list's order, and the report files hold it."""
    variables, clean = wrn
    test = data.load_dataset("digits", "test")
    order = np.random.default_rng(0).permutation(32)
    ids = []
    for i in order:
        (tmp_path / "val" / str(test.labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i]).save(tmp_path / "val" / str(test.labels[i]) / f"{i:03d}.png")
        ids.append(f"{test.labels[i]}/{i:03d}.png")
    source = eval_stream.ListedImages(tmp_path / "val", ids)
    model_dir = store.save_model(tmp_path / "wrn", SPEC, variables)
    body = evaluate.run_streamed_evaluation(model_dir, source, "imagenet", ("clean",), chunk_size=8, batch_size=8,
                                            preprocessing=None, output=tmp_path / "report", progress=False)
    np.testing.assert_array_equal(body["masks"]["clean"], clean[order])
    report, masks, markdown = read_outputs(tmp_path / "report")
    np.testing.assert_array_equal(masks["clean"], clean[order])
    assert report["accuracy"]["clean"] == pytest.approx(clean[order].mean()) and report["eps"] == pytest.approx(4 / 255)
    assert "imagenet (32 of 32 images, as stored, streamed in chunks of 8)" in markdown
    # --image_list=first: the whole folder as data.sources reads it (sorted classes, then sorted files).
    folder = evaluate.streamed_source("imagenet", str(tmp_path / "val"), "first")
    assert len(folder) == 32 and folder.class_names == tuple(sorted(str(c) for c in set(test.labels[:32].tolist())))
    first = min(i for i in range(32) if test.labels[i] == int(folder.class_names[0]))
    np.testing.assert_array_equal(folder[0]["image"], test.images[first])
