"""config_guard: what may change when a run resumes, what is refused, and the history record."""

import json

import ml_collections
import pytest

from mmard_jax import cli, config_guard, config_lib
from mmard_jax.config_guard import ABSENT, Change, ConfigChangedError, check_resume, diff_configs


def _saved(config):
    """The dict train.py writes to config.json."""
    return json.loads(config.to_json_best_effort())


@pytest.fixture(scope="module")
def base():
    return config_lib.base_config("mmard", "resnet18", "cifar10")


def _new(base, **changes):
    config = ml_collections.ConfigDict(base.to_dict())
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def test_same_config_has_no_changes(base):
    assert diff_configs(_saved(base), base) == []
    assert check_resume(_saved(base), base) == []


def test_refused_optimizer_change_lists_key_old_and_new(base, tmp_path):
    new = _new(base, optim__lr=0.2, optim__momentum=0.8)
    with pytest.raises(ConfigChangedError) as info:
        check_resume(_saved(base), new, workdir=tmp_path)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"the run in {tmp_path} was started with other settings ({tmp_path / 'config.json'})")
    assert "start a new --workdir" in lines[0] and "--extend_epochs" not in lines[0]
    assert lines[1:] == ["  optim.lr: 0.1 -> 0.2", "  optim.momentum: 0.9 -> 0.8"]
    assert [c.key for c in info.value.refused] == ["optim.lr", "optim.momentum"]
    assert isinstance(info.value, cli.UserError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("key,value", [
    ("student__arch", "mobilenet_v2"), ("method__name", "rslad"), ("dataset__name", "cifar100"),
    ("seed", 1), ("attack__eps", 4 / 255), ("teacher__checkpoint", "other"), ("optim__schedule", "piecewise"),
    ("batch_size", 256), ("eval__every_epochs", 2),
])
def test_what_is_trained_is_refused(base, key, value):
    with pytest.raises(ConfigChangedError, match=key.replace("__", ".")):
        check_resume(_saved(base), _new(base, **{key: value}))


def test_allowed_cadence_and_location_changes_pass_and_are_returned(base):
    new = _new(base, log_every_steps=10, checkpoint_every_steps=0, eval__batch_size=250,
               eval__unroll="4", dataset__data_dir="/data", dataset__source="tfds")
    allowed = check_resume(_saved(base), new)
    assert {c.key for c in allowed} == {"log_every_steps", "checkpoint_every_steps", "eval.batch_size",
                                        "eval.unroll", "dataset.data_dir", "dataset.source"}
    # Training's loop unrolling may change float32 rounding: a resume could no longer be bitwise, so it is refused.
    with pytest.raises(ConfigChangedError, match="attack.unroll"):
        check_resume(_saved(base), _new(base, attack__unroll="full"))
    assert Change("log_every_steps", 50, 10) in allowed
    assert set(config_guard.RESUMABLE) >= {c.key for c in allowed}


def test_num_epochs_growth_needs_allow_extend(base):
    new = _new(base, num_epochs=400)
    with pytest.raises(ConfigChangedError) as info:
        check_resume(_saved(base), new)
    assert "to train longer, add --extend_epochs" in str(info.value).splitlines()[0]
    assert "  num_epochs: 300 -> 400 (growing it needs --extend_epochs)" in str(info.value).splitlines()
    assert check_resume(_saved(base), new, allow_extend=True) == [Change("num_epochs", 300, 400)]


def test_num_epochs_shrink_is_always_refused(base):
    for allow in (False, True):
        with pytest.raises(ConfigChangedError, match=r"num_epochs: 300 -> 200 \(can only grow\)"):
            check_resume(_saved(base), _new(base, num_epochs=200), allow_extend=allow)


def test_extend_with_another_refused_change_lists_only_the_refused_one(base):
    with pytest.raises(ConfigChangedError) as info:
        check_resume(_saved(base), _new(base, num_epochs=400, seed=3), allow_extend=True)
    assert [c.key for c in info.value.refused] == ["seed"]


def test_added_and_removed_keys_are_changes(base):
    old = _saved(base)
    new = _saved(base)
    del new["best_metric"]
    new["student"]["kwargs"] = {"base_width": 8}
    changes = diff_configs(old, new)
    assert Change("best_metric", "pgd_t", ABSENT) in changes
    assert Change("student.kwargs.base_width", ABSENT, 8) in changes
    assert {c.kind for c in changes} == {"added", "removed"}
    with pytest.raises(ConfigChangedError) as info:
        check_resume(old, new)
    assert "  best_metric: \"pgd_t\" -> (absent)" in str(info.value).splitlines()
    assert "  student.kwargs.base_width: (absent) -> 8" in str(info.value).splitlines()


def test_tuples_and_lists_and_configdicts_compare_equal_after_json(base):
    saved = json.loads(json.dumps(_saved(base)))  # what reading config.json back gives: lists, dicts
    assert isinstance(saved["eval"]["attacks"], list) and isinstance(base.eval.attacks, tuple)
    assert diff_configs(saved, base) == []
    assert diff_configs({"a": {"b": (1, 2)}}, {"a": {"b": [1, 2]}}) == []
    assert diff_configs({"x": 1}, {"x": 1.0}) == [] and diff_configs({"x": float("nan")}, {"x": float("nan")}) == []
    assert diff_configs({"x": True}, {"x": 1}) == [Change("x", True, 1)]


def test_history_record_is_json_with_kind():
    changes = [Change("log_every_steps", 50, 10), Change("progress", ABSENT, False)]
    record = config_guard.history_record(changes, time="2026-01-01T00:00:00+00:00", host="h")
    assert record == {"time": "2026-01-01T00:00:00+00:00", "host": "h", "kind": "resume", "changes": [
        {"key": "log_every_steps", "old": 50, "new": 10, "kind": "changed"},
        {"key": "progress", "old": None, "new": False, "kind": "added"}]}
    assert config_guard.history_record([Change("num_epochs", 300, 400)])["kind"] == "extend"
    json.dumps(record)


def test_append_history_and_load_saved_config(tmp_path):
    assert config_guard.load_saved_config(tmp_path) is None
    (tmp_path / "config.json").write_text('{"seed": 0}')
    assert config_guard.load_saved_config(tmp_path) == {"seed": 0}
    (tmp_path / "config.json").write_text('{"seed": ')
    with pytest.raises(cli.UserError, match=r"config.json: not valid JSON"):
        config_guard.load_saved_config(tmp_path)
    for i in range(2):
        config_guard.append_history(tmp_path, {"kind": "resume", "i": i})
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["i"] for line in lines] == [0, 1]


def test_a_run_saved_before_a_key_existed_resumes_with_its_old_behaviour(base):
    """A workdir whose config.json predates student/teacher.conv_grad, attack/eval.norm, dataset.class_order and the
    input pipeline's keys resumes when the new config holds the values those runs used (auto, Linf, '', device ...),
    and is refused with any other."""
    old = _saved(base)
    for block, key in (("student", "conv_grad"), ("teacher", "conv_grad"), ("attack", "norm"), ("eval", "norm"),
                       ("dataset", "class_order"), ("dataset", "pipeline"), ("dataset", "augment"),
                       ("dataset", "image_size"), ("dataset", "test_split"), ("dataset", "workers")):
        del old[block][key]
    del old["swa"]  # the SWA student's block (tests/test_swa.py checks that turning it on is refused)
    del old["rteacher"]  # CIARD's robust-teacher optimizer block
    allowed = check_resume(old, base)
    assert {c.key for c in allowed} == set(config_guard.ADDED_SINCE) and {c.kind for c in allowed} == {"added"}
    with pytest.raises(ConfigChangedError, match=r"attack.norm: \(absent\) -> \"L2\""):
        check_resume(old, _new(base, attack__norm="L2"))
    with pytest.raises(ConfigChangedError, match=r"student.conv_grad: \(absent\) -> \"lax\""):
        check_resume(old, _new(base, student__conv_grad="lax"))
    with pytest.raises(ConfigChangedError, match=r"dataset.class_order: \(absent\) -> \"wnids\""):
        check_resume(old, _new(base, dataset__class_order="wnids"))
    with pytest.raises(ConfigChangedError, match=r"dataset.pipeline: \(absent\) -> \"stream\""):
        check_resume(old, _new(base, dataset__pipeline="stream"))
    with pytest.raises(ConfigChangedError, match=r"rteacher.optim.lr: \(absent\) -> 0.01"):
        check_resume(old, _new(base, rteacher__optim__lr=0.01))
