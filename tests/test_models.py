"""Model zoo against its PyTorch peers: parameter counts, names and shapes, logits, BatchNorm modes, dtypes.

The peers are RobustBench's own architecture files (loaded by `peers.robustbench.load_arch`),
`peers/mobilenetv2.py` and `peers/torchvision_resnet.py` (torchvision's ImageNet ResNets). Big models are only
traced (`jax.eval_shape`, torch on the meta device); numerical comparisons use small configurations, so the file
runs in seconds on a CPU.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmard_jax import models
from mmard_jax.interop import naming
from mmard_jax.models import blocks, dm_preact_resnet, dm_wide_resnet, layers
from peers import torchvision_resnet as tv
from peers.interop import randomize_batch_norm
from peers.mobilenetv2 import MobileNetV2
from peers.robustbench import load_arch

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def rb(module):
    """RobustBench architecture module."""
    return load_arch(module)


def dm_activation(name):
    """RobustBench's activation class for a DeepMind model's `activation` string."""
    return {"swish": rb("dm_wide_resnet").Swish, "silu": torch.nn.SiLU, "relu": torch.nn.ReLU}[name]


# name -> (Flax model name, Flax kwargs, peer constructor taking num_classes).
PEERS = {
    "resnet18": (
        "resnet18", {},
        lambda nc: rb("resnet").ResNet(rb("resnet").BasicBlock, [2, 2, 2, 2], num_classes=nc),
    ),
    "preact_resnet18": (
        "preact_resnet18", {},
        lambda nc: rb("resnet").PreActResNet(rb("resnet").PreActBlock, [2, 2, 2, 2], num_classes=nc),
    ),
    "preact_resnet18_bn_out": (
        "preact_resnet18", {"bn_before_fc": True, "out_shortcut": True},
        lambda nc: rb("resnet").PreActResNet(
            rb("resnet").PreActBlock, [2, 2, 2, 2], num_classes=nc, bn_before_fc=True, out_shortcut=True
        ),
    ),
    "mobilenet_v2": ("mobilenet_v2", {}, lambda nc: MobileNetV2(num_classes=nc)),
    "resnet50": (
        "resnet50", {},
        lambda nc: rb("resnet").ResNet(rb("resnet").Bottleneck, [3, 4, 6, 3], num_classes=nc),
    ),
    "torchvision_resnet18": ("torchvision_resnet18", {}, lambda nc: tv.resnet18(num_classes=nc)),
    "torchvision_resnet50_wpg32": (
        "torchvision_resnet50", {"width_per_group": 32}, lambda nc: tv.resnet50(num_classes=nc, width_per_group=32),
    ),
    "wrn_34_10": (
        "wide_resnet", {"depth": 34, "width": 10},
        lambda nc: rb("wide_resnet").WideResNet(depth=34, widen_factor=10, num_classes=nc),
    ),
    "wrn_16_1_nobias": (
        "wide_resnet", {"depth": 16, "width": 1, "bias_last": False},
        lambda nc: rb("wide_resnet").WideResNet(depth=16, widen_factor=1, num_classes=nc, bias_last=False),
    ),
    "dm_wrn_70_16": (
        "dm_wide_resnet", {"depth": 70, "width": 16},
        lambda nc: rb("dm_wide_resnet").DMWideResNet(
            num_classes=nc, depth=70, width=16, activation_fn=dm_activation("swish")
        ),
    ),
    "dm_wrn_28_10": (
        "dm_wide_resnet", {},
        lambda nc: rb("dm_wide_resnet").DMWideResNet(
            num_classes=nc, depth=28, width=10, activation_fn=dm_activation("swish")
        ),
    ),
    "dm_wrn_10_2_relu": (
        "dm_wide_resnet", {"depth": 10, "width": 2, "activation": "relu"},
        lambda nc: rb("dm_wide_resnet").DMWideResNet(num_classes=nc, depth=10, width=2),
    ),
    # Wang2023Better_WRN-28-10: DMWideResNet with nn.SiLU.
    "dm_wrn_28_10_silu": (
        "dm_wide_resnet", {"activation": "silu"},
        lambda nc: rb("dm_wide_resnet").DMWideResNet(nc, 28, 10, activation_fn=dm_activation("silu")),
    ),
    "dm_preact_resnet18": (
        "dm_preact_resnet", {},
        lambda nc: rb("dm_wide_resnet").DMPreActResNet(nc, 18, 0, activation_fn=dm_activation("swish")),
    ),
    "dm_preact_resnet34_relu": (
        "dm_preact_resnet", {"depth": 34, "activation": "relu"},
        lambda nc: rb("dm_wide_resnet").DMPreActResNet(nc, 34),
    ),
}

# Configurations small enough to run on the CPU, compared numerically (same layout as PEERS). ResNet-18
# and PreAct-ResNet-18 run full size: RobustBench's classes hardcode width 64.
NUMERIC_PEERS = {
    "resnet18": PEERS["resnet18"],
    "preact_resnet18": PEERS["preact_resnet18"],
    "preact_resnet18_bn_out": PEERS["preact_resnet18_bn_out"],
    "mobilenet_v2": PEERS["mobilenet_v2"],
    # depth 16: two blocks per stage, so both branches of TRADES's `equalInOut` run.
    "wrn_16_1": (
        "wide_resnet", {"depth": 16, "width": 1},
        lambda nc: rb("wide_resnet").WideResNet(depth=16, widen_factor=1, num_classes=nc),
    ),
    "wrn_10_2_nobias": (
        "wide_resnet", {"depth": 10, "width": 2, "bias_last": False},
        lambda nc: rb("wide_resnet").WideResNet(depth=10, widen_factor=2, num_classes=nc, bias_last=False),
    ),
    "dm_wrn_16_1_swish": (
        "dm_wide_resnet", {"depth": 16, "width": 1, "activation": "swish"},
        lambda nc: rb("dm_wide_resnet").DMWideResNet(nc, 16, 1, activation_fn=dm_activation("swish")),
    ),
    "dm_wrn_10_2_relu_c100": (
        "dm_wide_resnet",
        {
            "depth": 10, "width": 2, "activation": "relu",
            "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762),
        },
        lambda nc: rb("dm_wide_resnet").DMWideResNet(
            nc, 10, 2, activation_fn=torch.nn.ReLU,
            mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        ),
    ),
    "dm_wrn_10_2_pad2": (
        "dm_wide_resnet", {"depth": 10, "width": 2, "padding": 2},
        lambda nc: rb("dm_wide_resnet").DMWideResNet(nc, 10, 2, activation_fn=dm_activation("swish"), padding=2),
    ),
    "dm_wrn_10_2_silu": (
        "dm_wide_resnet", {"depth": 10, "width": 2, "activation": "silu"},
        lambda nc: rb("dm_wide_resnet").DMWideResNet(nc, 10, 2, activation_fn=dm_activation("silu")),
    ),
}


def init_key(seed=0):
    """PRNG key for `model.init`: XLA:CPU compiles a threefry-keyed ResNet-18 init in 10-20 s, rbg-keyed in 2 s."""
    return jax.random.key(seed, impl="rbg")


def torch_numel(module):
    """PyTorch's parameter count."""
    return sum(p.numel() for p in module.parameters())


def flax_shapes(model, size=32):
    """Variables of `model` as shapes only (no memory, no compilation)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


def on_meta(constructor, num_classes):
    """A peer module built on the meta device: shapes without memory."""
    with torch.device("meta"):
        return constructor(num_classes)


def flax_layout_shape(shape):
    """The Flax shape of a torch tensor of `shape` (see `naming.to_flax_layout`)."""
    if len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def torch_to_flax(torch_model, flax_variables):
    """Flax variables holding `torch_model`'s weights, copied by the naming rule (the converter in small)."""
    state = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
    mapping = naming.match_variables(flax_variables, state)
    flat_target = naming.flatten_variables(flax_variables)
    flat = {}
    for path, key in mapping.items():
        value = naming.to_flax_layout(state[key])
        assert value.shape == tuple(flat_target[path].shape), (path, key)
        flat[path] = jnp.asarray(value)
    return traverse_util.unflatten_dict(flat)


@functools.cache
def paired(case, num_classes=10):
    """(Flax model, its variables copied from a random peer, the peer in eval mode) for a NUMERIC_PEERS case."""
    name, kwargs, constructor = NUMERIC_PEERS[case]
    torch.manual_seed(0)
    peer = randomize_batch_norm(constructor(num_classes)).eval()
    model = models.create(name, num_classes=num_classes, **kwargs)
    variables = torch_to_flax(peer, flax_shapes(model))
    return model, variables, peer


def random_images(batch, size=32, seed=0):
    """Uniform [0, 1] NHWC images (numpy, float32)."""
    return np.random.default_rng(seed).uniform(size=(batch, size, size, 3)).astype(np.float32)


def torch_logits(peer, x_nhwc):
    """Peer logits on NHWC numpy images."""
    with torch.no_grad():
        return peer(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("resnet18", {}, 11_173_962),
        # torchvision's documented sizes (`num_params` of the IMAGENET1K_V1 weights, pytorch/vision
        # torchvision/models/resnet.py): 1000 classes.
        ("torchvision_resnet18", {"num_classes": 1000}, 11_689_512),
        ("torchvision_resnet50", {"num_classes": 1000}, 25_557_032),
        ("torchvision_wide_resnet50_2", {"num_classes": 1000}, 68_883_240),
        ("wide_resnet", {"depth": 34, "width": 10}, 46_160_474),
        ("dm_wide_resnet", {"activation": "silu"}, 36_479_194),  # WRN-28-10, as RobustBench's module counts
        ("dm_preact_resnet", {}, 12_548_426),
        ("dm_preact_resnet", {"num_classes": 100}, 12_594_596),
    ],
)
def test_published_parameter_counts(name, kwargs, expected):
    assert models.count_params(flax_shapes(models.create(name, **kwargs))) == expected


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("case", sorted(PEERS))
def test_parameter_count_equals_peer(case, num_classes):
    name, kwargs, constructor = PEERS[case]
    variables = flax_shapes(models.create(name, num_classes=num_classes, **kwargs))
    assert models.count_params(variables) == torch_numel(on_meta(constructor, num_classes))
    # A params tree counts the same as the full variables.
    assert models.count_params(variables["params"]) == models.count_params(variables)


# ---------------------------------------------------------------- names and shapes


@pytest.mark.parametrize("case", sorted(PEERS))
def test_names_and_shapes_correspond_to_peer(case):
    name, kwargs, constructor = PEERS[case]
    variables = flax_shapes(models.create(name, **kwargs))
    state = on_meta(constructor, 10).state_dict()
    mapping = naming.match_variables(variables, state)  # raises on leftovers either way
    flat = naming.flatten_variables(variables)
    kept = {k for k in state if not k.endswith("num_batches_tracked")}
    assert set(mapping.values()) == kept and len(mapping) == len(flat)
    containers = models.MODELS[name].torch_containers
    assert naming.torch_containers(kept) == containers
    for path, key in mapping.items():
        assert tuple(flat[path].shape) == flax_layout_shape(state[key].shape), (path, key)
        assert naming.torch_key_to_flax_path(key, state[key].ndim) == path
        assert naming.flax_path_to_torch_key(path, containers) == key


def test_split_torch_key_examples():
    assert naming.split_torch_key("layer1.0.conv1.weight") == (("layer1_0", "conv1"), "weight")
    assert naming.split_torch_key("block1.layer.0.bn1.running_mean") == (("block1", "layer_0", "bn1"), "running_mean")
    assert naming.split_torch_key("layer.0.block.0.conv_0.weight") == (("layer_0", "block_0", "conv_0"), "weight")
    assert naming.split_torch_key("layers.0.shortcut.0.weight") == (("layers_0", "shortcut_0"), "weight")
    assert naming.split_torch_key("fc.bias") == (("fc",), "bias")
    assert naming.split_torch_key("a.0.1.weight") == (("a_0_1",), "weight")  # nested Sequentials
    for bad in ["weight", "0.weight", "layer.0", "a..weight"]:
        with pytest.raises(ValueError):
            naming.split_torch_key(bad)


def test_join_torch_key_is_the_inverse_and_unambiguous():
    assert naming.join_torch_key(("layer_0", "block_0", "conv_0"), "weight", {"layer", "block"}) == (
        "layer.0.block.0.conv_0.weight"
    )
    assert naming.join_torch_key(("layer1_0", "shortcut_1"), "bias", {"layer1", "shortcut"}) == (
        "layer1.0.shortcut.1.bias"
    )
    assert naming.join_torch_key(("a_0_1",), "weight", {"a"}) == "a.0.1.weight"
    # DeepMind's PreAct net has containers that themselves end in an index-like suffix.
    assert naming.join_torch_key(("layer_0_1", "conv_2d_1"), "weight", {"layer_0"}) == "layer_0.1.conv_2d_1.weight"
    with pytest.raises(ValueError, match="Ambiguous"):
        naming.join_torch_key(("layer_0_1",), "weight", {"layer", "layer_0"})


def test_layouts_round_trip():
    conv = np.arange(2 * 3 * 5 * 7).reshape(2, 3, 5, 7)
    assert naming.to_flax_layout(conv).shape == (5, 7, 3, 2)
    np.testing.assert_array_equal(naming.to_torch_layout(naming.to_flax_layout(conv)), conv)
    depthwise = np.zeros((8, 1, 3, 3))
    assert naming.to_flax_layout(depthwise).shape == (3, 3, 1, 8)
    linear = np.zeros((10, 64))
    assert naming.to_flax_layout(linear).shape == (64, 10)
    assert naming.torch_leaf_to_flax("weight", 1) == ("params", "scale")
    assert naming.torch_leaf_to_flax("weight", 4) == ("params", "kernel")
    assert naming.torch_leaf_to_flax("running_var", 1) == ("batch_stats", "var")


# ---------------------------------------------------------------- output shapes


@pytest.mark.parametrize("size", [32, 16])
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("case", sorted(NUMERIC_PEERS))
def test_output_shape_and_dtype(case, num_classes, size):
    name, kwargs, _ = NUMERIC_PEERS[case]
    model = models.create(name, num_classes=num_classes, **kwargs)
    variables = flax_shapes(model, size)
    x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    assert logits.shape == (3, num_classes) and logits.dtype == jnp.float32


def test_big_models_output_shape():
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    for case in ["wrn_34_10", "dm_wrn_70_16", "dm_preact_resnet18"]:
        name, kwargs, _ = PEERS[case]
        model = models.create(name, num_classes=100, **kwargs)
        logits = jax.eval_shape(model.apply, flax_shapes(model), x)
        assert logits.shape == (2, 100) and logits.dtype == jnp.float32


@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize("in_planes, out_planes, stride, activation", [
    (16, 16, 1, "swish"),  # identity shortcut
    (8, 16, 1, "silu"),  # width change: 3x3 shortcut at stride 1
    (8, 16, 2, "relu"),  # stride 2: (0, 1) hand padding of the conv and the shortcut
])
def test_dm_preact_block_equals_peer(in_planes, out_planes, stride, activation, size):
    """One DeepMind PreAct block against RobustBench's `_PreActBlock`, small: the whole net is fixed at width 64."""
    torch.manual_seed(0)
    peer_block = rb("dm_wide_resnet")._PreActBlock(in_planes, out_planes, stride, dm_activation(activation))
    peer = randomize_batch_norm(peer_block)
    block = dm_preact_resnet.DMPreActBlock(
        out_planes, stride, dm_wide_resnet.activation_fn(activation),
        conv=layers.conv_factory(jnp.float32), norm=layers.batch_norm_factory(False, jnp.float32, None),
    )
    x = np.random.default_rng(1).normal(size=(2, size, size, in_planes)).astype(np.float32)
    variables = torch_to_flax(peer, jax.eval_shape(block.init, jax.random.key(0), x))
    with jax.default_matmul_precision("float32"):
        ours = np.asarray(block.apply(variables, x))
    with torch.no_grad():
        theirs = peer(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("in_planes, planes, stride", [
    (16, 4, 1),  # identity shortcut
    (8, 4, 1),  # width change: conv1x1+BN shortcut at stride 1
    (8, 4, 2),  # stride 2 on the 3x3 conv and the shortcut
])
def test_cifar_bottleneck_equals_peer(in_planes, planes, stride):
    """One CIFAR ResNet-50 block against RobustBench's `Bottleneck`, small (the whole net is fixed at width 64)."""
    torch.manual_seed(0)
    peer = randomize_batch_norm(rb("resnet").Bottleneck(in_planes, planes, stride))
    block = blocks.Bottleneck(planes, stride, conv=layers.conv_factory(jnp.float32),
                              norm=layers.batch_norm_factory(False, jnp.float32, None))
    x = np.random.default_rng(1).normal(size=(2, 9, 9, in_planes)).astype(np.float32)
    variables = torch_to_flax(peer, jax.eval_shape(block.init, jax.random.key(0), x))
    with jax.default_matmul_precision("float32"):
        ours = np.asarray(block.apply(variables, x))
    with torch.no_grad():
        theirs = peer(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape and np.abs(theirs).max() > 0.1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_small_models_run_on_16x16():
    model = models.create("resnet18", base_width=8)
    x = random_images(2, size=16)
    variables = jax.jit(model.init)(init_key(), x)
    assert jax.jit(model.apply)(variables, x).shape == (2, 10)


# ---------------------------------------------------------------- numerical equality with the peer


@pytest.mark.parametrize("case", sorted(NUMERIC_PEERS))
def test_logits_equal_peer(case):
    model, variables, peer = paired(case)
    x = random_images(2)
    with jax.default_matmul_precision("float32"):
        ours = np.asarray(jax.jit(model.apply)(variables, x))
    theirs = torch_logits(peer, x)
    assert np.abs(theirs).max() > 1e-2  # not a vacuous comparison
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_train_mode_equals_peer():
    """Batch statistics and the running-average update follow PyTorch (momentum 0.1, eps 1e-5)."""
    model, variables, peer = paired("wrn_16_1")
    x = random_images(8, seed=1)
    with jax.default_matmul_precision("float32"):
        ours, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, x)
    peer_train = randomize_batch_norm(rb("wide_resnet").WideResNet(depth=16, widen_factor=1))
    peer_train.load_state_dict(peer.state_dict())
    peer_train.train()
    theirs = peer_train(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).detach().numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-4)
    state = {k: v for k, v in peer_train.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    flat = naming.flatten_variables(updates)
    for path, key in naming.match_variables(updates, state).items():
        if path[-1] == "mean":
            np.testing.assert_allclose(np.asarray(flat[path]), state[key].numpy(), rtol=0, atol=1e-5)
        else:
            # PyTorch's running_var takes the unbiased batch variance (n / (n - 1)); Flax the biased one.
            np.testing.assert_allclose(np.asarray(flat[path]), state[key].numpy(), rtol=2e-3)


# ---------------------------------------------------------------- BatchNorm modes and data parallelism


def test_train_mode_updates_batch_stats():
    model, variables, _ = paired("dm_wrn_16_1_swish")  # random running statistics: every one of them must move
    x = random_images(4)
    eval_logits = jax.jit(model.apply)(variables, x)
    train_logits, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    assert train_logits.dtype == jnp.float32
    assert not np.allclose(np.asarray(train_logits), np.asarray(eval_logits), atol=1e-3)
    before = jax.tree_util.tree_leaves(variables["batch_stats"])
    after = jax.tree_util.tree_leaves(updates["batch_stats"])
    assert len(before) == len(after)
    assert all(not np.allclose(a, b) for a, b in zip(before, after))


def test_batch_stats_synced_across_devices():
    """2 devices under `jax.shard_map` with bn_axis_name give one device's result on the whole batch."""
    assert jax.device_count() >= 2, "conftest sets --xla_force_host_platform_device_count=2"
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    single = models.create("wide_resnet", depth=10, width=1)
    synced = models.create("wide_resnet", depth=10, width=1, bn_axis_name="data")
    x = random_images(8, seed=2)
    variables = jax.jit(single.init)(init_key(), x)

    def train_forward(model, v, batch):
        return model.apply(v, batch, train=True, mutable=["batch_stats"])

    with jax.default_matmul_precision("float32"):
        want_logits, want = jax.jit(functools.partial(train_forward, single))(variables, x)
        sharded = jax.shard_map(
            functools.partial(train_forward, synced),
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=(P("data"), P()),
        )
        # make_mesh's axes are Explicit: inputs must already carry the shardings the specs name.
        got_logits, got = jax.jit(sharded)(
            jax.device_put(variables, NamedSharding(mesh, P())), jax.device_put(x, NamedSharding(mesh, P("data")))
        )
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), rtol=0, atol=1e-4)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        got["batch_stats"], want["batch_stats"],
    )


# ---------------------------------------------------------------- bfloat16 compute


def test_bfloat16_compute_float32_state_and_logits():
    f32 = models.create("dm_wide_resnet", depth=10, width=2)
    bf16 = models.create("dm_wide_resnet", depth=10, width=2, dtype=jnp.bfloat16)
    x = random_images(4)
    variables = jax.jit(bf16.init)(init_key(), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    low = jax.jit(bf16.apply)(variables, x)
    high = jax.jit(f32.apply)(variables, x)
    assert low.dtype == jnp.float32
    scale = float(jnp.abs(high).max())
    assert float(jnp.abs(low - high).max()) < 0.05 * scale
    _, updates = jax.jit(functools.partial(bf16.apply, train=True, mutable=["batch_stats"]))(variables, x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(updates))


# ---------------------------------------------------------------- initialization matches PyTorch's


@pytest.mark.parametrize("case", ["resnet18", "wrn_16_1"])
def test_initialization_matches_peer_distribution(case):
    """Fresh Flax weights have the spread of fresh PyTorch weights, layer by layer (training from scratch)."""
    name, kwargs, constructor = NUMERIC_PEERS[case]
    model = models.create(name, **kwargs)
    variables = jax.jit(model.init)(init_key(), jnp.zeros((1, 32, 32, 3)))
    torch.manual_seed(0)
    state = constructor(10).state_dict()
    flat = naming.flatten_variables(variables)
    for path, key in naming.match_variables(variables, state).items():
        ours, theirs = np.asarray(flat[path]), state[key].numpy()
        if theirs.size < 1000 or path[0] != "params":
            np.testing.assert_allclose(ours.mean(), theirs.mean(), atol=0.2)
            continue
        assert math.isclose(ours.std(), theirs.std(), rel_tol=0.1), (path, ours.std(), theirs.std())


# ---------------------------------------------------------------- create()


def test_create_rejects_unknown_name():
    with pytest.raises(ValueError, match="resnet18"):
        models.create("resnet1000")


def test_create_rejects_unknown_argument():
    with pytest.raises(TypeError, match="wide_resnet.*depth"):
        models.create("wide_resnet", sub_block1=True)
    with pytest.raises(TypeError, match="num_blocks"):
        models.create("resnet18", num_blocks=(1, 1, 1, 1))


def test_create_rejects_bad_values():
    with pytest.raises(ValueError, match="activation"):
        flax_shapes(models.create("dm_wide_resnet", activation="gelu"))
    with pytest.raises(ValueError, match="depth"):
        flax_shapes(models.create("wide_resnet", depth=12))
    with pytest.raises(ValueError, match="depth must be one of"):
        flax_shapes(models.create("dm_preact_resnet", depth=50))
    with pytest.raises(TypeError, match="width_per_group"):  # a BasicBlock net has width 64 only (torchvision's)
        models.create("torchvision_resnet18", width_per_group=128)
    with pytest.raises(ValueError, match="mean and std go together"):
        flax_shapes(models.create("wide_resnet", depth=10, width=1, mean=(0.5, 0.5, 0.5)))
    with pytest.raises(ValueError, match="per_image_standardize replaces mean/std"):
        flax_shapes(models.create("resnet18", mean=0.5, std=0.5, per_image_standardize=True))


@pytest.mark.parametrize("strides", [1, 2])
def test_depthwise_taps_equal_grouped_conv(strides):
    """The tap-sum depthwise conv (CPU path) computes lax.conv's values and input/kernel gradients."""
    from mmard_jax.models.layers import DepthwiseConv

    x = jnp.asarray(random_images(4, size=9, seed=3)[..., :3].repeat(4, axis=-1))  # 12 channels, odd size
    outs, grads = {}, {}
    for impl in ("taps", "conv"):
        layer = DepthwiseConv((3, 3), strides, impl=impl)
        variables = layer.init(jax.random.key(0), x)
        outs[impl] = layer.apply(variables, x)
        grads[impl] = jax.grad(lambda v, z: jnp.sum(jnp.sin(layer.apply(v, z))), argnums=(0, 1))(variables, x)
    assert outs["taps"].shape == (4, 5 if strides == 2 else 9, 5 if strides == 2 else 9, 12)
    np.testing.assert_allclose(outs["taps"], outs["conv"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads["taps"]), jax.tree.leaves(grads["conv"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mobilenet_depthwise_impls_share_parameters_and_logits():
    x = jnp.asarray(random_images(2, size=8, seed=4))
    taps = models.create("mobilenet_v2", num_classes=10, depthwise="taps")
    conv = models.create("mobilenet_v2", num_classes=10, depthwise="conv")
    # The library convolution's init compiles in a fraction of the taps' time; the taps' is only shaped.
    v_conv = jax.jit(lambda k: conv.init(k, x, train=False))(jax.random.key(1))
    v_taps = jax.eval_shape(lambda k: taps.init(k, x, train=False), jax.random.key(1))
    assert jax.tree.structure(v_taps) == jax.tree.structure(v_conv)
    assert jax.tree.map(lambda a: a.shape, v_taps) == jax.tree.map(lambda a: a.shape, v_conv)
    apply = lambda m: jax.jit(lambda v: m.apply(v, x, train=False))(v_conv)  # noqa: E731
    with jax.default_matmul_precision("float32"):
        np.testing.assert_allclose(apply(taps), apply(conv), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize("kernel,strides,padding", [
    (3, 1, ((1, 1), (1, 1))), (3, 2, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))), (1, 2, "VALID"), (1, 1, "VALID"),
])
def test_conv_with_fast_input_gradient_equals_lax(size, kernel, strides, padding):
    """layers.conv_general_dilated (what every nn.Conv of the zoo calls): lax's values, input and kernel
    gradients, for the kernel/stride/padding combinations of our models, odd and even sizes."""
    from mmard_jax.models import layers

    rng = np.random.default_rng(size + kernel + strides)
    x = jnp.asarray(rng.normal(size=(2, size, size, 5)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 7)).astype(np.float32))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def run(fn):
        loss = lambda a, b: jnp.sum(jnp.sin(fn(a, b, (strides, strides), padding, dimension_numbers=dn)))  # noqa: E731
        return fn(x, w, (strides, strides), padding, dimension_numbers=dn), jax.grad(loss, argnums=(0, 1))(x, w)

    with jax.default_matmul_precision("float32"):
        (ours, (dx, dw)), (ref, (rdx, rdw)) = run(layers.conv_general_dilated), run(jax.lax.conv_general_dilated)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-4)
