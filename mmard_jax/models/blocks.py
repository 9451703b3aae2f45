"""Building blocks the model families share: a model's conv/BN factories, conv-BN-activation units, projection
shortcuts, post- and pre-activation residual blocks and stages, each under its PyTorch peer's names.

Submodules are named as the PyTorch state_dict keys (`mmard_jax/interop/naming.py`): a block family's names are
data (`PreActLayout`), so the families differ in their tables, not in code. Every family builds its convolutions
with `factories`, which passes the model's `conv_grad` on (`layers.resolve_conv_grad`).
"""

import functools
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import jax
from flax import linen as nn

from mmard_jax.models.layers import (
    PAD_DM_STRIDE2,
    PAD_SAME_TORCH,
    TORCH_DEFAULT_KERNEL_INIT,
    ModuleDef,
    batch_norm_factory,
    conv_factory,
)

Activation = Callable[[jax.Array], jax.Array]

# DeepMind's Swish (RobustBench dm_wide_resnet.py:31-51) is x * sigmoid(x), which is torch.nn.SiLU:
# both names map to the same function, kept apart only to tell which PyTorch class the checkpoint used.
ACTIVATIONS = {"swish": jax.nn.silu, "silu": jax.nn.silu, "relu": nn.relu}

# (channels, stride) of the three stages of a (TRADES or DeepMind) WideResNet, channels before widening.
WIDE_STAGES = ((16, 1), (32, 2), (64, 2))
WIDE_STEM_CHANNELS = 16
# The conv1x1+BN projection shortcut of RobustBench's `BasicBlock` and kuangliu's MobileNetV2: `nn.Sequential`.
SHORTCUT_CONV_BN = ("shortcut_0", "shortcut_1")
# torchvision's: the `downsample` Sequential of conv1x1 and BN (pytorch/vision @ f50e776,
# torchvision/models/resnet.py:178-182).
DOWNSAMPLE_CONV_BN = ("downsample_0", "downsample_1")
# Output channels per `planes` of a bottleneck block (torchvision resnet.py:76; RobustBench architectures/resnet.py:31).
BOTTLENECK_EXPANSION = 4


def activation_fn(name: str) -> Activation:
    """The activation named `name` ('swish', 'silu' or 'relu')."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def factories(model: nn.Module, train: bool, kernel_init: Callable = TORCH_DEFAULT_KERNEL_INIT):
    """(conv, norm) of a zoo model: convolutions in its `dtype` with its `conv_grad`, BatchNorm in its `dtype`
    over its `bn_axis_name`, in training mode when `train`."""
    conv = conv_factory(model.dtype, kernel_init=kernel_init, conv_grad=model.conv_grad)
    return conv, batch_norm_factory(train, model.dtype, model.bn_axis_name)


def torch_padding(kernel: int):
    """PyTorch's `padding=kernel // 2` of the zoo's square convs: (1, 1) for a 3x3, none for a 1x1."""
    return PAD_SAME_TORCH if kernel == 3 else "VALID"


def dm_conv0_padding(strides: int):
    """The hand padding DeepMind applies before a block's first (padding-0) conv."""
    if strides == 1:
        return PAD_SAME_TORCH
    if strides == 2:
        return PAD_DM_STRIDE2
    raise ValueError(f"Unsupported stride {strides}")


def stem(x: jax.Array, conv: ModuleDef, features: int, name: str) -> jax.Array:
    """The zoo's CIFAR stem: one 3x3 stride-1 conv at PyTorch's padding (no max-pool)."""
    return conv(features, (3, 3), 1, padding=PAD_SAME_TORCH, name=name)(x)


def conv_bn(x: jax.Array, conv: ModuleDef, norm: ModuleDef, features: int, kernel: int, names: Tuple[str, str],
            strides: int = 1) -> jax.Array:
    """BN(conv(x)) with a `kernel` x `kernel` conv at PyTorch's padding; `names` = (conv, BatchNorm)."""
    out = conv(features, (kernel, kernel), strides, padding=torch_padding(kernel), name=names[0])(x)
    return norm(name=names[1])(out)


def conv_bn_act(x: jax.Array, conv: ModuleDef, norm: ModuleDef, features: int, kernel: int, names: Tuple[str, str],
                strides: int = 1, act: Activation = nn.relu) -> jax.Array:
    """act(BN(conv(x))): the post-activation unit of stems, ResNet blocks and MobileNetV2."""
    return act(conv_bn(x, conv, norm, features, kernel, names, strides))


def bn_act(x: jax.Array, norm: ModuleDef, name: str, act: Activation = nn.relu) -> jax.Array:
    """act(BN(x)): the pre-activation unit (and the BN-activation before a pre-activation net's classifier)."""
    return act(norm(name=name)(x))


def needs_projection(x: jax.Array, features: int, strides: int) -> bool:
    """Whether a residual block's shortcut must be a conv: its stride or its width changes the shape (the wide
    families' stride-2 blocks always widen, so for them this is PyTorch's `not equalInOut`)."""
    return strides != 1 or x.shape[-1] != features


class BasicBlock(nn.Module):
    """Post-activation residual block (RobustBench and torchvision `BasicBlock`); conv1x1+BN shortcut, named
    `shortcut_names`, when stride or width changes."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    shortcut_names: Tuple[str, str] = SHORTCUT_CONV_BN

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = conv_bn_act(x, self.conv, self.norm, self.features, 3, ("conv1", "bn1"), self.strides)
        out = conv_bn(out, self.conv, self.norm, self.features, 3, ("conv2", "bn2"))
        return nn.relu(out + projected(x, self.conv, self.norm, self.features, self.strides, self.shortcut_names))


class Bottleneck(nn.Module):
    """Post-activation bottleneck block (torchvision `Bottleneck`, resnet.py:75-115; RobustBench's CIFAR
    `Bottleneck`, architectures/resnet.py:30-55, is the same at width `planes`): conv1x1 to `width`, conv3x3 at
    the stride (torchvision v1.5), conv1x1 to 4 * planes, each with BN, ReLU after the sum with the shortcut."""

    planes: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    width: int = 0  # the inner width: torchvision's int(planes * width_per_group / 64) (resnet.py:83); 0 = planes
    shortcut_names: Tuple[str, str] = SHORTCUT_CONV_BN

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = self.width or self.planes
        features = self.planes * BOTTLENECK_EXPANSION
        out = conv_bn_act(x, self.conv, self.norm, width, 1, ("conv1", "bn1"))
        out = conv_bn_act(out, self.conv, self.norm, width, 3, ("conv2", "bn2"), self.strides)
        out = conv_bn(out, self.conv, self.norm, features, 1, ("conv3", "bn3"))
        return nn.relu(out + projected(x, self.conv, self.norm, features, self.strides, self.shortcut_names))


def projected(x: jax.Array, conv: ModuleDef, norm: ModuleDef, features: int, strides: int,
              names: Tuple[str, str]) -> jax.Array:
    """A post-activation block's shortcut: x itself, or BN(conv1x1(x)) at the stride when the shape changes."""
    if not needs_projection(x, features, strides):
        return x
    return conv_bn(x, conv, norm, features, 1, names, strides)


class PreActLayout(NamedTuple):
    """A pre-activation block family: its PyTorch names and where its shortcut and padding differ."""

    norms: Tuple[str, str]  # the BatchNorm before each of the two convs
    convs: Tuple[str, str]
    shortcut: str  # the projection conv
    shortcut_reads: str  # 'input' (the block's x) or 'activated' (act(BN(x)), as the main path)
    shortcut_kernel: int  # 1 (1x1, no padding) or 3 (3x3 padded as the first conv)
    hand_padding: bool  # DeepMind: the first conv pads by hand, (1, 1) at stride 1 and (0, 1) at stride 2


# RobustBench `PreActBlock` (`out_shortcut=False`; True reads 'activated', as `PreActBlockV2`).
ROBUSTBENCH_PREACT = PreActLayout(("bn1", "bn2"), ("conv1", "conv2"), "shortcut_0", "input", 1, False)
# TRADES/RobustBench WideResNet `BasicBlock`: without `equalInOut`, x itself is replaced by its activation.
TRADES_WIDE = PreActLayout(("bn1", "bn2"), ("conv1", "conv2"), "convShortcut", "activated", 1, False)
# DeepMind `_Block` (DMWideResNet).
DEEPMIND_WIDE = PreActLayout(("batchnorm_0", "batchnorm_1"), ("conv_0", "conv_1"), "shortcut", "activated", 1, True)
# DeepMind `_PreActBlock` (DMPreActResNet): a 3x3 shortcut of the raw input.
DEEPMIND_PREACT = PreActLayout(("batchnorm_0", "batchnorm_1"), ("conv_2d_1", "conv_2d_2"), "shortcut", "input", 3,
                               True)


class PreActBlock(nn.Module):
    """Pre-activation residual block: conv(act(BN(x))), act(BN), conv, plus x or a projection of x or act(BN(x));
    `layout` names the parts as the family's PyTorch peer does."""

    features: int
    strides: int
    act: Activation
    conv: ModuleDef
    norm: ModuleDef
    layout: PreActLayout = ROBUSTBENCH_PREACT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lay = self.layout
        padding = dm_conv0_padding(self.strides) if lay.hand_padding else PAD_SAME_TORCH
        activated = bn_act(x, self.norm, lay.norms[0], self.act)
        shortcut = x
        if needs_projection(x, self.features, self.strides):
            source = activated if lay.shortcut_reads == "activated" else x
            k = lay.shortcut_kernel
            shortcut = self.conv(self.features, (k, k), self.strides, padding=padding if k == 3 else "VALID",
                                 name=lay.shortcut)(source)
        out = self.conv(self.features, (3, 3), self.strides, padding=padding, name=lay.convs[0])(activated)
        out = bn_act(out, self.norm, lay.norms[1], self.act)
        out = self.conv(self.features, (3, 3), 1, padding=PAD_SAME_TORCH, name=lay.convs[1])(out)
        return out + shortcut


def pre_act_block(act: Activation, conv: ModuleDef, norm: ModuleDef, layout: PreActLayout,
                  out_shortcut: Optional[bool] = None) -> ModuleDef:
    """`PreActBlock` with everything but (features, strides, name) fixed; `out_shortcut` overrides where the
    layout's shortcut reads (RobustBench `PreActResNet(out_shortcut=...)`)."""
    if out_shortcut is not None:
        layout = layout._replace(shortcut_reads="activated" if out_shortcut else "input")
    return functools.partial(PreActBlock, act=act, conv=conv, norm=norm, layout=layout)


class BlockGroup(nn.Module):
    """One stage as one submodule (TRADES `NetworkBlock`, DeepMind `_BlockGroup`): `num_blocks` blocks named
    `<prefix><i>`, the first one changing width and stride; `block(features, strides, name=...)` builds one."""

    num_blocks: int
    features: int
    strides: int
    block: ModuleDef
    prefix: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_blocks):
            x = self.block(self.features, self.strides if i == 0 else 1, name=f"{self.prefix}{i}")(x)
        return x


def blocks_per_stage(depth: int) -> int:
    """Residual blocks in each of the three stages of a WRN-`depth` ((depth - 4) / 6, depth = 6n + 4)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
    return (depth - 4) // 6


def wide_stages(x: jax.Array, depth: int, width: int, block: ModuleDef, group_name: Callable[[int], str],
                prefix: str) -> jax.Array:
    """The three widened stages of a WRN-`depth` (`WIDE_STAGES`), each a `BlockGroup` named `group_name(i)`."""
    n = blocks_per_stage(depth)
    for i, (channels, strides) in enumerate(WIDE_STAGES):
        x = BlockGroup(n, channels * width, strides, block, prefix, name=group_name(i))(x)
    return x


def stage_plan(stages: Sequence[Tuple[int, int]], counts: Sequence[int], prefix: str,
               first: int = 0) -> Tuple[Tuple[str, int, int], ...]:
    """(block name, out channels, stride) of every block of flat-named stages (`<prefix><stage>_<i>`, stages
    numbered from `first`), in the order PyTorch numbers them; a stage's first block takes its stride."""
    return tuple(
        (f"{prefix}{stage}_{i}", features, strides if i == 0 else 1)
        for stage, ((features, strides), count) in enumerate(zip(stages, counts), first)
        for i in range(count)
    )
