"""The SWA student (mmard_jax/swa.py, config.swa) on one tiny real run (the fault-injection run: WRN-10-1 on digits,
2 epochs of 8 steps, SWA from the first epoch, 2 devices): its parameters are the running mean of the epoch-end
students, its BatchNorm statistics PyTorch's `update_bn` and PeerAiD's `bn_update` on the same weights and
augmented batches, its model directory loads, evaluates and exports; and per-class accuracy, worst class and NSD in
metrics.jsonl, summary.json/md and the evaluate CLI's report.json/md equal NumPy's from the masks; stopped mid-epoch
and resumed, it ends bitwise equal (the resident pipeline's mid-epoch resume; tests/test_reliability.py resumes the
same run streamed, without the BatchNorm recompute)."""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from jax.sharding import PartitionSpec as P

from epoch_runs import fault_config, train_resumed_at_the_boundary
from mmard_jax import checkpoints, config_lib, data, evaluate, parallel, robustness, swa, train, train_step
from mmard_jax.errors import ConfigError
from mmard_jax.interop import export
from mmard_jax.models import store
from mmard_jax.tools import fault_injection as fault
from peers import swa as peer_swa
from test_convert import rb
from tolerances import assert_trees_close

N_TEST = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, config, summary) of the tiny run with only end-of-epoch checkpoints (both kept)."""
    root = tmp_path_factory.mktemp("swa")
    config = fault_config(root)
    config.checkpoint_every_steps = 0
    config.eval.final_attacks = ("clean", "pgd_t")
    summary = train.train_and_evaluate(config, root / "run", progress=False)
    return root / "run", config, summary


def saved(workdir, step):
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(pathlib.Path(workdir) / checkpoints.LATEST / str(step) / "state")


def test_swa_parameters_are_the_running_mean_of_the_epoch_end_students(run):
    workdir, _, summary = run
    one, two = saved(workdir, 8), saved(workdir, 16)
    assert int(one["swa"]["count"]) == 1 and int(two["swa"]["count"]) == 2 and summary["swa"]["snapshots"] == 2
    s1, s2 = one["nets"]["student"]["params"], two["nets"]["student"]["params"]
    # The first snapshot is the student itself; then the mean of both (float64 NumPy, float32 rounding).
    jax.tree.map(np.testing.assert_array_equal, one["swa"]["params"], s1)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)))
    assert moved > 1e-3
    jax.tree.map(lambda ours, a, b: np.testing.assert_allclose(
        ours, (np.float64(a) + np.float64(b)) / 2, rtol=1e-6, atol=1e-7), two["swa"]["params"], s1, s2)


def test_mid_epoch_resume_on_the_resident_split_ends_bitwise(run, tmp_path, monkeypatch, capsys):
    """Stopped (and saved) after step 3 of epoch 1 and rerun: the resident split's batches go on from there, and
    every leaf of the final and best states (student, SWA student with its recomputed BatchNorm statistics, optimizer)
    and the final accuracies equal the uninterrupted run's."""
    workdir, config, _ = run
    train_resumed_at_the_boundary(config, tmp_path / "run", monkeypatch, stop=3)
    assert "resumed from step 3" in capsys.readouterr().out and fault.committed(tmp_path / "run") == [8, 16]
    assert fault.differences(fault.final_state(tmp_path / "run"), fault.final_state(workdir)) == []


def bn_pass_batches(config, epoch: int):
    """The augmented batches of the BN pass after `epoch` (0-based), drawn as docs/design.md says: index batches
    `swa.bn_batches(seed, epoch)`, batch k augmented by `train_step.augment_batch` with key
    fold_in(fold_in(fold_in(key(seed), BN_STREAM), epoch), k) over the 2-device mesh."""
    train_split = data.load_dataset("digits", "train")
    images, labels = train_split.images[: config.dataset.n_train], train_split.labels[: config.dataset.n_train]
    idx = swa.bn_batches(config.seed, epoch, len(images), config.batch_size)
    mesh = parallel.data_mesh()
    settings = train.step_settings(config)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), swa.BN_STREAM), epoch)

    def per_device(images, labels, idx, k):
        return train_step.augment_batch(images, labels, idx, jax.random.fold_in(key, k), settings)[0]

    aug = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(parallel.AXIS), P()),
                                out_specs=P(parallel.AXIS)))
    return [np.asarray(aug(images, labels, parallel.put_batch(row, mesh), np.int32(k))) for k, row in enumerate(idx)]


def features(peer):
    """RobustBench WideResNet's forward up to its last BN-ReLU (its fixed 8x8 pool assumes 32x32 inputs; every
    BatchNorm runs before it)."""
    return lambda x: peer.relu(peer.bn1(peer.block3(peer.block2(peer.block1(peer.conv1(x))))))


def torch_twin(variables):
    """RobustBench's WideResNet-10-1 holding `variables` (export's state_dict, strict), run up to its features."""
    peer = rb("wide_resnet").WideResNet(depth=10, widen_factor=1, num_classes=10)
    peer.load_state_dict(export.to_torch_state_dict(variables, "wide_resnet"), strict=True)
    peer.forward = features(peer)
    return peer


def running_stats(peer):
    return {k: v.detach().double().numpy() for k, v in peer.state_dict().items()
            if k.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("reference", ["torch_update_bn", "peeraid_bn_update"])
def test_bn_recompute_equals_the_published_passes(run, reference):
    workdir, config, _ = run
    state = saved(workdir, 16)
    ours = {"params": state["swa"]["params"], "batch_stats": state["swa"]["batch_stats"]}
    peer = torch_twin(ours)
    mine = running_stats(peer)
    batches = [torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous() for x in bn_pass_batches(config, 1)]
    assert len(batches) == 256 // 32
    getattr(peer_swa, reference)(batches, peer)  # from reset statistics, as published
    theirs = running_stats(peer)
    trained = running_stats(torch_twin({"params": ours["params"],
                                        "batch_stats": state["nets"]["student"]["batch_stats"]}))
    assert max(float(np.abs(theirs[k] - trained[k]).max()) for k in theirs) > 1e-2  # a pass that did nothing fails
    for k in theirs:
        np.testing.assert_allclose(mine[k], theirs[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_bn_recompute_is_the_same_on_one_and_two_devices(run):
    """The BN pass's statistics are the global batch's on any device count: the pass on a 1-device mesh equals the
    2-device one (the trainer's) to the reordered-sum tolerance, with the same index batches and augmentation."""
    workdir, config, _ = run
    state = jax.tree.map(np.asarray, saved(workdir, 16))
    split = data.load_dataset("digits", "train")
    images, labels = split.images[: config.dataset.n_train], split.labels[: config.dataset.n_train]
    idx = swa.bn_batches(config.seed, 1, len(images), config.batch_size)
    spec = store.model_spec(config.student.arch, 10, dict(config.student.kwargs), input_shape=images.shape[1:])
    module = store.build_module(spec, "float32", bn_axis_name=parallel.AXIS)
    stats = {}
    for n in (1, 2):
        mesh = parallel.data_mesh(jax.devices()[:n])
        bn_pass = swa.make_bn_pass(module, train.step_settings(config), mesh, config.seed)
        stats[n] = bn_pass(state["swa"]["params"], state["swa"]["batch_stats"], images, labels,
                           parallel.put_batch(idx, mesh, axis=1), np.asarray(1, np.int32))
    # The running variance is E[x^2] - E[x]^2 over the global batch: its rounding is the means' amplified by
    # E[x^2] / Var (measured 1.2e-5 relative here), so 1e-4 relative, far below what the statistics of each
    # device's half batch (16 examples instead of the global 32) would change.
    assert_trees_close(stats[1], stats[2], rtol=1e-4, atol=1e-6)
    assert_trees_close(stats[2], state["swa"]["batch_stats"], rtol=0, atol=0)  # the trainer's own pass, bitwise


def test_bn_recompute_is_not_the_trained_statistics(run):
    """The SWA student's statistics come from its own pass, not from the student's training (which a recompute
    that silently did nothing would leave): after the first epoch the parameters are equal, the statistics not."""
    one = saved(run[0], 8)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one["swa"]["batch_stats"]),
                                                         jax.tree.leaves(one["nets"]["student"]["batch_stats"]))]
    assert max(diffs) > 1e-3


def test_swa_model_directory_loads_evaluates_and_exports(run, tmp_path):
    workdir, config, summary = run
    swa_dir = workdir / checkpoints.SWA_DIR
    module, variables = checkpoints.load_model(swa_dir, input_shape=(16, 16, 3))
    best_epoch = summary["swa"]["best_epoch"]
    step = checkpoints.best_step(swa_dir / checkpoints.BEST)
    assert step == 8 * best_epoch
    state = saved(workdir, step)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], state["swa"]["params"])
    test = data.load_dataset("digits", "test")
    report = robustness.evaluate(module.apply, variables, test.images[:N_TEST], test.labels[:N_TEST],
                                 attacks=("clean",), batch_size=32, seed=train.eval_seed(config, best_epoch),
                                 progress=False)
    record = next(json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x)["epoch"] == best_epoch)
    assert report.accuracy["clean"] == record["swa_test_clean"] == summary["swa"]["best"]["clean"]
    dst = export.export_model(swa_dir, tmp_path / "swa.pt")
    peer = rb("wide_resnet").WideResNet(depth=10, widen_factor=1, num_classes=10)
    peer.load_state_dict(torch.load(dst, weights_only=True), strict=True)
    x = test.images[:8].astype(np.float32) / 255
    feats = features(peer.eval())(torch.from_numpy(x).permute(0, 3, 1, 2))
    theirs = peer.fc(feats.mean((2, 3))).detach().numpy()  # the global average pool of our model at 16x16
    np.testing.assert_allclose(np.asarray(module.apply(variables, x, train=False)), theirs, rtol=0, atol=1e-4)


def numpy_per_class(mask, labels, num_classes=10):
    """Per-class accuracy, worst class and NSD from a mask (NSD: population std / mean over the present classes)."""
    acc = np.array([mask[labels == c].mean() if np.any(labels == c) else np.nan for c in range(num_classes)])
    seen = acc[~np.isnan(acc)]
    worst = int(np.nanargmin(acc))
    nsd = np.sqrt(np.mean((seen - seen.mean()) ** 2)) / seen.mean() if seen.mean() > 0 else None
    return acc, worst, nsd


def assert_per_class(entry, mask, labels):
    acc, worst, nsd = numpy_per_class(mask, labels)
    np.testing.assert_allclose([np.nan if a is None else a for a in entry["accuracy"]], acc)
    assert entry["worst_class"] == worst and entry["worst"] == pytest.approx(acc[worst])
    assert (entry["nsd"] is None) if nsd is None else entry["nsd"] == pytest.approx(nsd)


@pytest.mark.parametrize("who", ["student", "swa"])
def test_training_per_class_numbers_in_every_file_match_the_masks(run, who):
    workdir, config, summary = run
    directory, part, prefix = ((workdir, summary, "test") if who == "student"
                               else (workdir / checkpoints.SWA_DIR, summary["swa"], "swa_test"))
    module, variables = checkpoints.load_model(directory, input_shape=(16, 16, 3))
    test = data.load_dataset("digits", "test")
    labels = test.labels[:N_TEST]
    report = robustness.evaluate(module.apply, variables, test.images[:N_TEST], labels, attacks=("clean", "pgd_t"),
                                 batch_size=32, seed=train.eval_seed(config, part["best_epoch"]), progress=False)
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    record = next(r for r in records if r["epoch"] == part["best_epoch"])
    table = (workdir / "summary.md").read_text()
    for attack in ("clean", "pgd_t"):
        mask = report.masks[attack]
        assert_per_class(record[f"per_class_{prefix}"][attack], mask, labels)
        assert_per_class(part["per_class"]["best"][attack], mask, labels)
        assert_per_class(part["per_class"]["final"][attack], mask, labels)
        acc, worst, _ = numpy_per_class(mask, labels)
        assert f"{100 * acc[worst]:.2f} ({worst})" in table
    assert json.loads((workdir / "summary.json").read_text())["per_class"] == json.loads(json.dumps(
        summary["per_class"]))


def test_evaluate_report_per_class_matches_its_masks(run, tmp_path):
    workdir, _, _ = run
    evaluate.run_evaluation(workdir / checkpoints.SWA_DIR, "digits", ("clean", "fgsm"), n_examples=N_TEST,
                            batch_size=32, eps=8 / 255, output=str(tmp_path), progress=False)
    body = json.loads((tmp_path / "report.json").read_text())
    masks = np.load(tmp_path / "masks.npz")
    labels = data.load_dataset("digits", "test").labels[:N_TEST]
    md = (tmp_path / "report.md").read_text()
    for attack in ("clean", "fgsm"):
        assert_per_class(body["per_class"][attack], masks[attack], labels)
        acc, worst, nsd = numpy_per_class(masks[attack], labels)
        assert f"{100 * acc[worst]:.2f} ({worst})" in md
        assert nsd is None or f"{nsd:.4f}" in md
    assert "| class |" in md and md.count("\n| 9 |") == 1


def test_published_recipes_turn_swa_on_where_the_papers_do():
    import configs.sota as sota  # noqa: PLC0415

    peeraid = sota.get_config("method=peeraid,setting=resnet18_cifar10")
    assert peeraid.swa.enabled and swa.resolve_start(peeraid) == 214  # PeerAiD main.py:110-111, the first decay
    assert not sota.get_config("method=adaad,setting=resnet18_cifar10").swa.enabled
    assert not config_lib.base_config("peeraid").swa.enabled  # the unified recipe has no decay to start from
    assert config_lib.RECIPES["saad"]["swa"] == {"enabled": True, "start_epoch": 94}  # saad args.py:17, 1-based 95
    c = config_lib.base_config("mmard")
    c.swa.enabled = True
    with pytest.raises(ConfigError, match="start_epoch=-1 .* needs config.optim.schedule='piecewise'"):
        swa.check(c)
    c.swa.start_epoch = 300
    with pytest.raises(ConfigError, match="resolves to epoch 300 .* 300 epochs"):
        swa.check(c)
    c.swa.start_epoch, c.num_epochs = 2, 5
    assert [swa.due(c, e) for e in range(1, 6)] == [False, False, True, True, True]
    assert swa.expected_count(c, 5) == 3


def test_a_workdir_from_before_config_swa_resumes_while_swa_stays_off():
    from mmard_jax import config_guard  # noqa: PLC0415
    from mmard_jax.errors import ConfigChangedError  # noqa: PLC0415

    new = config_lib.base_config("mmard")
    old = config_guard.as_json(new)
    del old["swa"]
    added = config_guard.check_resume(old, new)
    assert sorted(c.key for c in added) == ["swa.bn_recompute", "swa.enabled", "swa.every_epochs", "swa.start_epoch"]
    new.swa.enabled = True
    with pytest.raises(ConfigChangedError, match="swa.enabled"):
        config_guard.check_resume(old, new)
