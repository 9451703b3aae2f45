"""Models at any input size (issue 23, point 2): every architecture at 64x64 and 32x32, the 64x64 students and
teachers of the 2024-2026 ARD repositories against PyTorch transcriptions of their published files
(`peers/published_models.py`, randomly initialised, random BatchNorm statistics), the published Tiny-ImageNet and
SVHN teachers converted by their file names, and model directories that remember their input shape.
"""

import json
import os
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmard_jax import checkpoints, config_lib, models, train
from mmard_jax.errors import CheckpointError
from mmard_jax.interop import convert, export, naming, published
from mmard_jax.models import store
from peers import published_models as pm
from test_convert import REPO, flax_logits, randomize, state_of, torch_logits

TINY, SVHN = "tiny_linf_wrn28-10", "svhn_linf_wrn28-10"


def images(shape, batch=2, seed=0):
    """Uniform [0, 1] NHWC float32 images of `shape` (H, W, C)."""
    return np.random.default_rng(seed).uniform(size=(batch, *shape)).astype(np.float32)


def assert_same_logits(module, variables, peer, shape):
    """Logits of both sides on random images of `shape` agree to 1e-4 and are not trivially small."""
    x = images(shape)
    theirs, ours = torch_logits(peer, x), flax_logits(module, variables, x)
    assert np.abs(theirs).max() > 1e-1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def abstract_logits(module, shape, batch=2):
    """(logits shape/dtype, abstract variables) of `module` on `shape` images, traced only."""
    variables = store.abstract_variables(module, shape)
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    return jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x), variables


def random_variables(module, shape, seed=0):
    """Random float32 variables of `module` at `shape` (no init program to compile)."""
    rng = np.random.default_rng(seed)
    abstract = store.abstract_variables(module, shape)
    return jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), abstract)


# ---------------------------------------------------------------- every architecture, both sizes


@pytest.mark.parametrize("arch", sorted(models.MODELS))
def test_every_arch_builds_at_64_and_32(arch):
    """Logits of the right classes at both sizes; the variables do not depend on the size (global mean pooling),
    except DGAD's, whose classifier reads the 2x2 map of avg_pool2d(out, 4) at 64x64 (2048 features)."""
    module = models.create(arch, num_classes=200)
    shapes = {}
    for size in (64, 32):
        logits, variables = abstract_logits(module, (size, size, 3))
        assert logits.shape == (2, 200) and logits.dtype == jnp.float32, (arch, size)
        shapes[size] = jax.tree.map(lambda a: a.shape, variables)
    if arch == "preact_resnet18_dgad":
        assert [shapes[s]["params"]["linear"]["kernel"] for s in (64, 32)] == [(2048, 200), (512, 200)]
    else:
        assert shapes[64] == shapes[32]


def test_dgad_pool_window_larger_than_the_map_is_a_clear_error():
    with pytest.raises(ValueError, match=r"pool window 4 does not fit the final 2x2 feature map"):
        store.abstract_variables(models.create("preact_resnet18_dgad", num_classes=200), (16, 16, 3))


def published_peer(name, depth=28, width=10):
    """The PyTorch module of a published teacher (its file's class, its data set's statistics)."""
    if name == TINY:
        return pm.TinyWideResNet(200, depth, width)
    return pm.CifarWideResNet(10, depth, width, mean=pm.SVHN_MEAN, std=pm.SVHN_STD)


@pytest.mark.parametrize("name", [TINY, SVHN])
def test_full_size_published_teachers_match_their_files_abstractly(name):
    """WRN-28-10 as published (meta device) against ours at its input size: the same names, shapes and classes."""
    entry = published.PUBLISHED[name]
    with torch.device("meta"):
        peer = published_peer(name)
    theirs = {k: tuple(v.shape) for k, v in peer.state_dict().items() if not k.endswith("num_batches_tracked")}
    module = models.create(entry.arch, num_classes=entry.num_classes, **entry.kwargs)
    logits, variables = abstract_logits(module, entry.input_shape)
    assert logits.shape == (2, entry.num_classes)
    assert theirs == {k: s for k, (_, s) in convert.expected_torch_shapes(entry.arch, variables).items()}
    assert models.count_params(variables) == sum(p.numel() for p in peer.parameters())
    assert entry.input_shape == ((64, 64, 3) if name == TINY else (32, 32, 3))


# ---------------------------------------------------------------- published teachers, exact


@pytest.mark.parametrize("name", [TINY, SVHN])
def test_published_teacher_twin_converts_exactly_at_its_input_size(name, tmp_path):
    """The published class at depth 16, width 2 (both its block kinds; its depth and width are arguments), saved
    as published, converted with the published entry's settings: PyTorch's logits at 64x64 (Tiny-ImageNet) or
    32x32 (SVHN), from a directory that needs no input shape to load."""
    entry = published.PUBLISHED[name]
    torch.manual_seed(3)
    peer = randomize(published_peer(name, depth=16, width=2))
    src = pm.published_checkpoint(peer, tmp_path / f"{name}.pt")
    kwargs = {**entry.kwargs, "depth": 16, "width": 2}
    dst = convert.convert_file(src, tmp_path / "teacher", arch=entry.arch, num_classes=entry.num_classes,
                               kwargs=kwargs, input_shape=entry.input_shape)
    assert json.loads((dst / "model.json").read_text())["input_shape"] == list(entry.input_shape)
    module, variables = models.load_pretrained(dst)
    assert_same_logits(module, variables, peer, entry.input_shape)
    assert_exports_back(dst, peer, lambda: published_peer(name, depth=16, width=2), tmp_path)


def assert_exports_back(directory, peer, constructor, tmp_path):
    """`export` of the directory loads strictly into a fresh published module and equals `peer`'s state_dict."""
    out = export.export_model(directory, tmp_path / "back.pt")
    fresh = constructor()
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for key, value in peer.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("arch, kwargs, namespace, expected", [
    ("dm_wide_resnet", {**published.PUBLISHED[TINY].kwargs, "depth": 10, "width": 1},
     {"WideResNet": pm.TinyWideResNet},
     f"WideResNet(num_classes=200, depth=10, width=1, activation_fn=nn.SiLU, mean={pm.TINY_MEAN}, "
     f"std={pm.TINY_STD})  # wzekai99/DM-Improves-AT core/models/ti_wideresnetwithswish.py (adaptive pooling)"),
    ("preact_resnet18_saad", {}, {"pResNet18": pm.SaadPreActResNet18},
     "pResNet18(num_classes=200)  # HongsinLee/saad cifar100_models/preresnet.py"),
], ids=["tiny_wrn", "saad"])
def test_printed_constructor_builds_the_published_module(arch, kwargs, namespace, expected):
    """The constructor `export` prints for the 64x64 models builds their published class with the export's keys."""
    text = export.torch_constructor({"arch": arch, "num_classes": 200, "kwargs": kwargs})
    assert text == expected
    with torch.device("meta"):
        peer = eval(text, {**namespace, "nn": torch.nn})  # noqa: S307 - our own output, against the peer classes
    theirs = {k: tuple(v.shape) for k, v in peer.state_dict().items() if not k.endswith("num_batches_tracked")}
    variables = store.abstract_variables(models.create(arch, num_classes=200, **kwargs), (64, 64, 3))
    assert theirs == {k: s for k, (_, s) in convert.expected_torch_shapes(arch, variables).items()}


@pytest.mark.slow
def test_published_name_converts_the_full_size_file_through_the_cli(tmp_path):
    """`tiny_linf_wrn28-10.pt` at full size (WRN-28-10 Swish, 200 classes), written as DM-Improves-AT saves it,
    converted by `python -m mmard_jax.convert --published=tiny_linf_wrn28-10`; `--list` (run beside it) names both
    published teachers. The directory loads at 64x64x3 unasked and holds exactly the file's `model_state_dict`
    (not the unaveraged weights beside it). The SVHN entry differs only in its table row (checked above)."""
    with torch.device("meta"):  # no forward here: uniform weights, without the init's 36M normal draws
        peer = published_peer(TINY)
    peer = peer.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for tensor in peer.state_dict().values():
            tensor.uniform_(-0.1, 0.1, generator=gen) if tensor.is_floating_point() else tensor.zero_()
    peer = randomize(peer)
    pm.published_checkpoint(peer, tmp_path / f"{TINY}.pt")
    state = state_of(peer)
    del peer
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MMARD_XLA_CACHE": "off"}
    run = [sys.executable, "-m", "mmard_jax.convert", f"--published={TINY}", f"--src={tmp_path / TINY}.pt",
           f"--dst={tmp_path / TINY}"]
    listing = [sys.executable, "-m", "mmard_jax.convert", "--list"]
    script = f"{shlex.join(listing)} & {shlex.join(run)}; status=$?; wait $! || exit 1; exit $status"
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"--published={TINY}" in done.stdout and f"--published={SVHN}" in done.stdout
    entry = published.PUBLISHED[TINY]
    spec = json.loads((tmp_path / TINY / "model.json").read_text())
    assert spec["input_shape"] == [64, 64, 3] and spec["source"]["published"]["name"] == TINY
    module, variables = models.load_pretrained(tmp_path / TINY)
    assert (module.num_classes, module.depth, module.width, module.activation) == (200, 28, 10, "silu")
    assert module.adaptive_pool and module.mean == entry.kwargs["mean"] == pm.TINY_MEAN
    flat = naming.flatten_variables(variables)
    expected = convert.expected_torch_shapes(entry.arch, variables)
    assert len(expected) == sum(not k.endswith("num_batches_tracked") for k in state)
    for key, (path, _) in expected.items():
        np.testing.assert_array_equal(flat[path], naming.to_flax_layout(state[key].numpy()), err_msg=key)


def test_published_name_errors_are_clear(tmp_path):
    src = tmp_path / "x.pt"
    torch.save({}, src)
    with pytest.raises(convert.ConversionError, match="Did you mean tiny_linf_wrn28-10"):
        convert.convert_file(src, tmp_path / "o", published_name="tiny_linf_wrn28-1")
    with pytest.raises(convert.ConversionError, match="give one of --published, --robustbench or --arch"):
        convert.convert_file(src, tmp_path / "o", published_name=TINY, arch="dm_wide_resnet", num_classes=200)
    with pytest.raises(convert.ConversionError, match=r"--input_shape=32x32x3 contradicts the model's own 64x64x3"):
        convert.convert_file(src, tmp_path / "o", published_name=TINY, input_shape=(32, 32, 3))
    with pytest.raises(convert.ConversionError, match="--input_shape must be three positive integers"):
        convert.convert_file(src, tmp_path / "o", arch="resnet18", num_classes=200, input_shape=(64, 64))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 64x64 students, exact


def _peeraid_wrn():
    return pm.PeerAiDWideResNet("tinyimagenet", depth=16, num_classes=200, widen_factor=2)


# case -> (published module, our arch and kwargs, how its file holds the state_dict)
STUDENTS = {
    # SAAD's Tiny-ImageNet student, a DataParallel state_dict (utils.py:182-187).
    "saad_preact_resnet18": (lambda: pm.SaadPreActResNet18(200), "preact_resnet18_saad", {}, "module"),
    # DGAD's PreAct-ResNet-18 as its Tiny-ImageNet teacher file holds it: {'net': state_dict} (main_tiny.py:230).
    "dgad_preact_resnet18": (lambda: pm.DgadPreActResNet18(200), "preact_resnet18_dgad", {}, "net"),
    # PeerAiD's students on 'tinyimagenet' (adaptive pooling): ResNet-18 full size; the WRN at depth 16, width 2
    # (WRN-34-10's class, its depth and width are arguments; models/model_builder.py:26-27).
    "peeraid_resnet18": (lambda: pm.PeerAiDResNet18(200, "tinyimagenet"), "resnet18", {}, "plain"),
    "peeraid_wrn_16_2": (_peeraid_wrn, "wide_resnet", {"depth": 16, "width": 2}, "plain"),
}


def _save(state, path, style):
    """The state_dict as its repository's file holds it."""
    if style == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save({"net": state} if style == "net" else state, path)
    return path


@pytest.mark.parametrize("case", sorted(STUDENTS))
def test_64x64_students_equal_their_published_modules(case, tmp_path):
    """Converted at 64x64, the students give their published modules' logits; exported back, the state_dict loads
    strictly into a fresh published module and equals the original."""
    constructor, arch, kwargs, style = STUDENTS[case]
    torch.manual_seed(4)
    peer = randomize(constructor())
    src = _save(state_of(peer), tmp_path / "student.pth", style)
    dst = convert.convert_file(src, tmp_path / "model", arch=arch, num_classes=200, kwargs=kwargs,
                               input_shape=(64, 64, 3))
    module, variables = models.load_pretrained(dst)
    assert_same_logits(module, variables, peer, (64, 64, 3))
    assert_exports_back(dst, peer, constructor, tmp_path)


def test_dgad_checkpoint_without_its_input_shape_says_so(tmp_path):
    """DGAD's classifier reads 2048 features at 64x64: converted at the default 32x32 it does not fit, and the
    error says which input shape to pass."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in pm.DgadPreActResNet18(200).state_dict().items()}
    src = _save({k: torch.zeros(s) for k, s in shapes.items()}, tmp_path / "dgad.pth", "net")
    with pytest.raises(convert.ConversionError, match=r"(?s)linear.weight: file \(200, 2048\) vs expected "
                                                      r"\(200, 512\).*--input_shape=H,W,C"):
        convert.convert_file(src, tmp_path / "o", arch="preact_resnet18_dgad", num_classes=200)


# ---------------------------------------------------------------- model directories remember their input shape


def test_model_dir_saved_at_64_reloads_without_the_shape(tmp_path):
    module = models.create("preact_resnet18_dgad", num_classes=200)
    variables = random_variables(module, (64, 64, 3))
    spec = store.model_spec("preact_resnet18_dgad", 200, {}, input_shape=(64, 64, 3))
    directory = store.save_model(tmp_path / "model", spec, variables)
    for load in (models.load_pretrained, checkpoints.load_model):
        _, loaded = load(directory)
        assert loaded["params"]["linear"]["kernel"].shape == (2048, 200)
        np.testing.assert_array_equal(loaded["params"]["linear"]["kernel"], variables["params"]["linear"]["kernel"])
    assert checkpoints.load_model(directory, input_shape=(64, 64, 3))[1]["params"]["linear"]["kernel"].shape == (
        2048, 200)
    with pytest.raises(CheckpointError, match=r"model.json: the model \(preact_resnet18_dgad, 200 classes\) was built "
                                              r"for 64x64x3 inputs .* the images here are 32x32x3"):
        models.load_pretrained(directory, input_shape=(32, 32, 3))


def test_model_dir_without_input_shape_reads_as_cifar_and_takes_any_size(tmp_path):
    """Directories written before model.json recorded `input_shape`: built at 32x32x3, any caller shape accepted."""
    module = models.create("wide_resnet", num_classes=10, depth=10, width=1)
    spec = store.model_spec("wide_resnet", 10, {"depth": 10, "width": 1})
    assert "input_shape" not in spec and store.spec_input_shape(spec) == store.LEGACY_INPUT_SHAPE == (32, 32, 3)
    directory = store.save_model(tmp_path / "old", spec, random_variables(module, (32, 32, 3)))
    for shape in (None, (16, 16, 3), (64, 64, 3)):
        _, loaded = models.load_pretrained(directory, input_shape=shape)
        assert loaded["params"]["fc"]["kernel"].shape == (64, 10)
    (directory / "model.json").write_text(json.dumps({**spec, "input_shape": [64, 64]}))
    with pytest.raises(CheckpointError, match="input_shape must be three positive integers"):
        models.load_pretrained(directory)


def test_training_records_the_data_shape_and_loads_teachers_at_it(tmp_path):
    """`train.build_networks` (the trainer's set-up) writes the data's shape into the student's spec and loads a
    64x64 teacher at it; a 32x32 data set with that teacher is refused in one line."""
    teacher = models.create("preact_resnet18_dgad", num_classes=200)
    spec = store.model_spec("preact_resnet18_dgad", 200, {}, input_shape=(64, 64, 3))
    store.save_model(tmp_path / "teacher", spec, random_variables(teacher, (64, 64, 3)))
    config = config_lib.base_config(method="mmard", student="preact_resnet18_saad")
    config.teacher.checkpoint = str(tmp_path / "teacher")
    method = config_lib.resolve_method(config.method)
    nets, frozen, student_spec = train.build_networks(config, method, 200, (64, 64, 3))
    assert student_spec["input_shape"] == [64, 64, 3] and student_spec["arch"] == "preact_resnet18_saad"
    assert frozen["teacher"]["params"]["linear"]["kernel"].shape == (2048, 200)
    with pytest.raises(CheckpointError, match="built for 64x64x3 inputs"):
        train.build_networks(config, method, 200, (32, 32, 3))
