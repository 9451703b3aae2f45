"""Exporter against its peers: exported files load into RobustBench's modules with strict=True, same logits."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.torch import load_file

from mmard_jax import checkpoints, files, models
from mmard_jax.interop import convert, export, naming, zoo
from mmard_jax.models import store
from peers import torchvision_resnet as tv
from peers.mobilenetv2 import MobileNetV2
from test_convert import REPO, assert_same_logits, normalize_model, randomize, rb, state_of, zoo_file_class

C100_MEAN, C100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET = {"mean": zoo.IMAGENET_MEAN, "std": zoo.IMAGENET_STD}  # the rows' settings: one compiled forward each

# case -> (arch, num_classes, kwargs, peer constructor, export with sub_block1)
CASES = {
    "resnet18": ("resnet18", 10, {}, lambda: rb("resnet").ResNet18(), False),
    "preact_resnet18_bn_out": (
        "preact_resnet18", 100, {"bn_before_fc": True, "out_shortcut": True},
        lambda: rb("resnet").PreActResNet(rb("resnet").PreActBlock, [2, 2, 2, 2], 100,
                                          bn_before_fc=True, out_shortcut=True),
        False,
    ),
    "wide_resnet_sub_block1": (
        "wide_resnet", 10, {"depth": 16, "width": 2},
        lambda: rb("wide_resnet").WideResNet(depth=16, widen_factor=2, sub_block1=True), True,
    ),
    "dm_wide_resnet_swish_c100": (
        "dm_wide_resnet", 100, {"depth": 16, "width": 2, "activation": "swish", "mean": C100_MEAN, "std": C100_STD},
        lambda: rb("dm_wide_resnet").DMWideResNet(100, 16, 2, activation_fn=rb("dm_wide_resnet").Swish,
                                                  mean=C100_MEAN, std=C100_STD),
        False,
    ),
    "dm_wide_resnet_silu": (
        "dm_wide_resnet", 10, {"depth": 10, "width": 2, "activation": "silu"},
        lambda: rb("dm_wide_resnet").DMWideResNet(10, 10, 2, activation_fn=torch.nn.SiLU), False,
    ),
    # Full size (RobustBench fixes its widths): the one slow case.
    "dm_preact_resnet18_c100": (
        "dm_preact_resnet", 100, {"depth": 18, "activation": "swish", "mean": C100_MEAN, "std": C100_STD},
        lambda: rb("dm_wide_resnet").DMPreActResNet(100, 18, 0, activation_fn=rb("dm_wide_resnet").Swish,
                                                    mean=C100_MEAN, std=C100_STD),
        False,
    ),
    "mobilenet_v2": ("mobilenet_v2", 10, {}, lambda: MobileNetV2(10), False),
}
SLOW_CASES = {"dm_preact_resnet18_c100"}


def random_variables(arch, num_classes, kwargs, seed=0, input_shape=(32, 32, 3)):
    """Random Flax variables of the right shapes (PyTorch's default weight spread, random BN statistics), no init."""
    rng = np.random.default_rng(seed)
    abstract = store.abstract_variables(models.create(arch, num_classes=num_classes, **kwargs), input_shape)
    flat = {}
    for path, leaf in naming.flatten_variables(abstract).items():
        shape, leaf_name = leaf.shape, path[-1]
        if leaf_name == "kernel":
            value = rng.normal(0, np.sqrt(1 / (3 * np.prod(shape[:-1]))), shape)
        elif leaf_name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = 0.1 * rng.normal(size=shape)
        flat[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def load_strict(constructor, path):
    """A fresh peer holding the exported file's tensors, loaded with strict=True, in eval mode."""
    peer = constructor()
    state = load_file(path) if str(path).endswith(".safetensors") else torch.load(path, weights_only=True)
    peer.load_state_dict(state, strict=True)
    return peer.eval(), state


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c
                                  for c in sorted(CASES)])
def test_export_loads_strictly_with_same_logits(case, tmp_path):
    arch, num_classes, kwargs, constructor, sub_block1 = CASES[case]
    variables = random_variables(arch, num_classes, kwargs)
    directory = store.save_model(tmp_path / "model", store.model_spec(arch, num_classes, kwargs), variables)
    suffix = ".safetensors" if case == "mobilenet_v2" else ".pt"
    out = export.export_model(directory, tmp_path / f"{case}{suffix}", sub_block1=sub_block1)
    peer, state = load_strict(constructor, out)
    tracked = [k for k in state if k.endswith("num_batches_tracked")]
    assert tracked and all(state[k].dtype == torch.int64 and int(state[k]) == 0 for k in tracked)
    assert all(v.dtype == torch.float32 for k, v in state.items() if k not in tracked)
    assert_same_logits(models.create(arch, num_classes=num_classes, **kwargs), variables, peer)


@pytest.mark.parametrize("arch, kwargs, expected", [
    ("dm_wide_resnet", {"depth": 10, "width": 2, "activation": "silu"},
     "DMWideResNet(num_classes=10, depth=10, width=2, activation_fn=nn.SiLU)"),
    ("dm_preact_resnet", {"depth": 18, "activation": "swish", "mean": list(C100_MEAN), "std": list(C100_STD)},
     f"DMPreActResNet(num_classes=10, depth=18, width=0, activation_fn=Swish, mean={C100_MEAN}, std={C100_STD})"),
    ("dm_preact_resnet", {"depth": 34, "activation": "relu", "padding": 2},
     "DMPreActResNet(num_classes=10, depth=34, width=0, activation_fn=nn.ReLU, padding=2)"),
], ids=["dm_wrn_silu", "dm_preact18_c100", "dm_preact34_relu_pad2"])
def test_printed_constructor_builds_the_peer(arch, kwargs, expected):
    """The constructor the exporter prints builds RobustBench's module, whose state_dict keys are the export's."""
    text = export.torch_constructor({"arch": arch, "num_classes": 10, "kwargs": kwargs})
    assert text == expected
    abstract = store.abstract_variables(models.create(arch, num_classes=10, **kwargs), (32, 32, 3))
    namespace = {**vars(rb("dm_wide_resnet")), "nn": torch.nn}
    with torch.device("meta"):
        peer = eval(text, namespace)  # noqa: S307 - our own output, evaluated against RobustBench's classes
    keys = {k for k in peer.state_dict() if not k.endswith("num_batches_tracked")}
    containers = models.MODELS[arch].torch_containers
    assert keys == {naming.flax_path_to_torch_key(p, containers) for p in naming.flatten_variables(abstract)}


@pytest.mark.parametrize("arch, kwargs, expected", [
    ("torchvision_resnet18", IMAGENET,
     f"normalize_model(resnet18(num_classes=10), {zoo.IMAGENET_MEAN}, {zoo.IMAGENET_STD})"),
    ("torchvision_resnet50", {"width_per_group": 16}, "resnet50(num_classes=10, width_per_group=16)"),
], ids=["tv_resnet18_normalized", "tv_resnet50_wpg16"])
def test_printed_torchvision_constructor_builds_the_peer(arch, kwargs, expected):
    """The torchvision constructor the exporter prints builds (with RobustBench's normalize_model) a module whose
    state_dict keys are exactly the export's."""
    text = export.torch_constructor({"arch": arch, "num_classes": 10, "kwargs": kwargs})
    assert text.split("  #")[0] == expected
    namespace = {**vars(tv), "normalize_model": normalize_model}
    with torch.device("meta"):
        peer = eval(text, namespace)  # noqa: S307 - our own output, evaluated against the peers
    abstract = store.abstract_variables(models.create(arch, num_classes=10, **kwargs), (32, 32, 3))
    zeros = {p: np.zeros(a.shape, np.float32) for p, a in naming.flatten_variables(abstract).items()}
    exported = export.to_torch_state_dict(traverse_util.unflatten_dict(zeros), arch, kwargs=kwargs)
    assert set(exported) == set(peer.state_dict())


def test_normalised_cifar_model_loads_strictly_into_its_robustbench_class(tmp_path):
    """A normalised CIFAR model exports the `mu`/`sigma` buffers of RobustBench's subclass (`Wong2020FastNet`), which
    loads the file with strict=True and then holds the model's statistics (the logits follow from the names:
    test_export_loads_strictly_with_same_logits, and the subclass's forward: test_convert's exact cases)."""
    entry = zoo.lookup("Wong2020Fast", "cifar10")
    variables = random_variables(entry.arch, entry.num_classes, entry.kwargs)
    directory = store.save_model(tmp_path / "model", store.model_spec(entry.arch, 10, entry.kwargs), variables)
    out = export.export_model(directory, tmp_path / "wong.pt")
    peer, state = load_strict(lambda: zoo_file_class("cifar10.py", "Wong2020FastNet")(), out)
    np.testing.assert_array_equal(peer.mu.flatten().numpy(), np.float32(entry.kwargs["mean"]))
    np.testing.assert_array_equal(peer.sigma.flatten().numpy(), np.float32(entry.kwargs["std"]))
    assert state["mu"].shape == (1, 3, 1, 1)


def test_convert_then_export_keeps_the_normalisation(tmp_path):
    """RobustBench's wrapper state_dict (normalize.mean/std beside model.*) -> Flax -> the same state_dict."""
    torch.manual_seed(6)
    peer = randomize(normalize_model(tv.resnet18(num_classes=10), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)))
    original = state_of(peer)
    src = tmp_path / "wrapped.pt"
    torch.save(original, src)
    directory = convert.convert_file(src, tmp_path / "model", arch="torchvision_resnet18", num_classes=10)
    spec = store.read_spec(directory)
    assert spec["kwargs"]["mean"] == [np.float32(v) for v in (0.4, 0.5, 0.6)]  # taken from the file
    back = export.to_torch_state_dict(models.load_pretrained(directory)[1], spec["arch"], kwargs=spec["kwargs"])
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(back[key], value, rtol=0, atol=0, msg=key)


def test_training_workdir_exports_best_checkpoint_via_cli(tmp_path):
    """A workdir as the trainer writes it (model.json + checkpoints/best), exported by the CLI."""
    arch, kwargs = "wide_resnet", {"depth": 10, "width": 1}
    workdir = tmp_path / "run"
    workdir.mkdir()
    files.write_json_atomic(workdir / store.SPEC_FILE, store.model_spec(arch, 10, kwargs))
    saved = checkpoints.TrainCheckpoints(workdir, "pgd_t")
    for step, (seed, metric) in enumerate([(1, 0.3), (2, 0.5)], start=1):  # the trainer saves improvements only
        variables = random_variables(arch, 10, kwargs, seed=seed)
        saved.save_best(step, variables, metric)
    saved.close()
    dst = tmp_path / "student.pt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MMARD_XLA_CACHE": "off"}
    done = subprocess.run([sys.executable, "-m", "mmard_jax.export", f"--src={workdir}", f"--dst={dst}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WideResNet(depth=10, widen_factor=1, num_classes=10)" in done.stdout
    peer, _ = load_strict(lambda: rb("wide_resnet").WideResNet(depth=10, widen_factor=1), dst)
    module, best = checkpoints.load_model(workdir)
    kernel = naming.flatten_variables(best)[("params", "conv1", "kernel")]
    np.testing.assert_array_equal(kernel, random_variables(arch, 10, kwargs, seed=2)["params"]["conv1"]["kernel"])
    assert_same_logits(module, best, peer)


def test_convert_then_export_gives_back_the_same_state_dict(tmp_path):
    """PyTorch -> Flax -> PyTorch is the identity on every tensor a RobustBench WideResNet holds (sub_block1 too)."""
    torch.manual_seed(5)
    peer = randomize(rb("wide_resnet").WideResNet(depth=10, widen_factor=2, sub_block1=True))
    original = state_of(peer)
    src = tmp_path / "wrn.pt"
    torch.save(original, src)
    directory = convert.convert_file(src, tmp_path / "model", arch="wide_resnet", num_classes=10,
                                     kwargs={"depth": 10, "width": 2})
    back = export.to_torch_state_dict(models.load_pretrained(directory)[1], "wide_resnet", sub_block1=True)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        if key.endswith("num_batches_tracked"):
            continue  # not kept by Flax; exported as 0
        if key.startswith("sub_block1."):  # never used: exported as a copy of block1, only its shape matters
            assert back[key].shape == value.shape, key
            continue
        torch.testing.assert_close(back[key], value, rtol=0, atol=0, msg=key)


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(store.CheckpointError, match="neither a model directory nor a training workdir"):
        export.export_model(tmp_path, tmp_path / "x.pt")
    with pytest.raises(export.ExportError, match="only in the TRADES WideResNet"):
        export.to_torch_state_dict(random_variables("mobilenet_v2", 10, {}), "mobilenet_v2", sub_block1=True)
    assert not (tmp_path / "x.pt").exists()


def test_a_workdir_given_to_the_model_directory_loader_says_where_to_load_it(tmp_path):
    """models.load_pretrained reads model directories; a training workdir gets a one-line pointer to
    checkpoints.load_model (the loader of workdirs since the store/checkpoints split)."""
    from mmard_jax import files, models
    from mmard_jax.models import store

    files.write_json_atomic(tmp_path / store.SPEC_FILE, store.model_spec("wide_resnet", 10, {"depth": 10, "width": 1}))
    with pytest.raises(store.CheckpointError, match="a training workdir\\? mmard_jax.checkpoints.load_model"):
        models.load_pretrained(tmp_path)
