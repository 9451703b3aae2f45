"""mmard_jax.tools.run_table (scripts/run_table.py): runs a (tiny) table in sequence, skips finished runs, and lays
results out like the paper."""

import json
import pathlib

import pytest

from mmard_jax.tools import run_table as runner

TINY_TABLE = '''
from mmard_jax import config_lib

RUNS = ("method=nature,student=wrn", "method=sat,student=wrn")
LAYOUT = {"rows": "method", "groups": "student", "columns": ("clean", "pgd_t")}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, method="sat", student="wrn")
    c = config_lib.base_config(a["method"], a["student"], "digits")
    c.student.arch, c.student.kwargs = "wide_resnet", {"depth": 10, "width": 1}
    c.attack.unroll = c.eval.unroll = "1"  # tests are compile-bound: rolled loops compile fastest
    c.dataset.n_train = 64
    c.batch_size = 32
    c.num_epochs = 1
    c.optim.schedule, c.optim.boundaries = "cosine", ()
    c.attack.steps = 1
    c.eval.n_examples = 32
    c.eval.batch_size = 32
    c.eval.attacks = ("clean", "pgd_t")
    c.eval.final_attacks = ("clean", "pgd_t")
    return c
'''


def test_runs_a_table_and_resumes(tmp_path):
    table = tmp_path / "tiny_table.py"
    table.write_text(TINY_TABLE)
    text = runner.run_table(table, tmp_path / "runs", overrides=["--config.seed=3"], progress=False)
    summaries = sorted((tmp_path / "runs").glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["method=nature__student=wrn", "method=sat__student=wrn"]
    assert json.loads((tmp_path / "runs" / "method=sat__student=wrn" / "config.json").read_text())["seed"] == 3
    lines = text.splitlines()
    assert lines[2] == "| method | Clean (wrn) | PGD_T (wrn) |"
    for method, path in zip(("nature", "sat"), summaries):
        final = json.loads(path.read_text())["final"]
        assert f"| {method} | {100 * final['clean']:.2f} | {100 * final['pgd_t']:.2f} |" in lines
    assert (tmp_path / "runs" / "table.md").read_text() == text
    # A second call finds every summary and trains nothing (collect_only would raise nothing either).
    before = {p: p.stat().st_mtime for p in summaries}
    assert runner.run_table(table, tmp_path / "runs", progress=False) == text
    assert {p: p.stat().st_mtime for p in summaries} == before


def test_layout_metric_major_with_average():
    runs = [f"method={m},teacher={t}" for m in ("ard", "mmard") for t in ("rn18", "wrn70_16")]
    results = {r: {"clean": 0.1 * (i + 1), "aa": 0.05 * (i + 1)} for i, r in enumerate(runs)}
    results.pop(runs[1])  # an unfinished run shows as '-' and leaves its row's average blank
    layout = {"rows": "method", "groups": "teacher", "columns": ("clean", "aa"), "metric_major": True, "average": True}
    lines = runner.table_markdown(results, runs, layout).splitlines()
    assert lines[0] == ("| method | Clean (rn18) | Clean (wrn70_16) | Clean (average) | AA (rn18) | AA (wrn70_16) "
                        "| AA (average) |")
    assert lines[2] == "| ard | 10.00 | - | - | 5.00 | - | - |"
    assert lines[3] == "| mmard | 30.00 | 40.00 | 35.00 | 15.00 | 20.00 | 17.50 |"


def test_bad_inputs(tmp_path):
    (tmp_path / "not_a_table.py").write_text("def get_config(arg=None):\n    return None\n")
    with pytest.raises(ValueError, match="defines no RUNS"):
        runner.load_table(tmp_path / "not_a_table.py")
    with pytest.raises(ValueError, match="--config.path=value"):
        runner.apply_overrides({}, ["num_epochs=3"])


def test_sota_table_renders_the_tiny_imagenet_and_svhn_groups(tmp_path):
    """configs/sota.py's rows beyond CIFAR render as their own column groups (collect_only: nothing trains), and
    `--only=setting=...` picks one setting's rows, as the README runs them."""
    sota = pathlib.Path(__file__).resolve().parent.parent / "configs" / "sota.py"
    text = runner.run_table(sota, tmp_path, collect_only=True, progress=False)
    header = text.splitlines()[2]
    for setting in ("preact_resnet18_tiny_imagenet", "resnet18_tiny_imagenet", "wrn34_10_tiny_imagenet",
                    "resnet18_svhn"):
        assert f"| Clean ({setting}) | PGD_S ({setting}) | AA ({setting}) |" in header
    only = runner.run_table(sota, tmp_path, only=["setting=preact_resnet18_tiny_imagenet"], collect_only=True,
                            progress=False).splitlines()
    assert only[2] == ("| method | Clean (preact_resnet18_tiny_imagenet) | PGD_S (preact_resnet18_tiny_imagenet) "
                       "| AA (preact_resnet18_tiny_imagenet) |")
    assert only[4:] == ["| adaad | - | - | - |", "| igdm | - | - | - |", "| saad | - | - | - |"]
    # A finished run's summary fills its cells.
    run = tmp_path / runner.run_name("method=igdm,setting=preact_resnet18_tiny_imagenet")
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"final": {"clean": 0.5, "pgd_s": 0.25, "aa": 0.2}}))
    only = runner.run_table(sota, tmp_path, only=["setting=preact_resnet18_tiny_imagenet"], collect_only=True,
                            progress=False).splitlines()
    assert only[5] == "| igdm | 50.00 | 25.00 | 20.00 |"
