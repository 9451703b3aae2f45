"""CIFAR ResNet-18/50 and PreAct-ResNet-18, layer for layer as RobustBench `model_zoo/architectures/resnet.py`.

3x3 stride-1 stem, no max-pool, four stages of two blocks (64, 128, 256, 512 channels at base_width 64; ResNet-50:
`Bottleneck` blocks, 3-4-6-3, four times the channels out). An optional input normalisation (`mean`/`std` or
`per_image_standardize`, `normalization.py`) is the wrapper of RobustBench's normalised CIFAR entries. The
final pool is the global mean at any input size, as the 64x64 students of PeerAiD and SAAD pool (adaptive
average pooling); `PreActResNet(pool_window=4)` pools and flattens as DGAD's PreAct-ResNet-18 does instead
(docs/design.md, "Models at any input size").
Submodule names follow the PyTorch state_dict (`layer1.0.conv1.weight` -> `layer1_0/conv1/kernel`,
see `mmard_jax/interop/naming.py`), so RobustBench checkpoints convert by name.
"""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmard_jax.models import blocks, normalization
from mmard_jax.models.layers import Dtype, classifier, global_avg_pool, window_avg_pool_flatten
from mmard_jax.models.normalization import Stats

STAGE_MULTIPLIERS = (1, 2, 4, 8)
STAGE_STRIDES = (1, 2, 2, 2)


def stage_plan(base_width: int, num_blocks: Sequence[int]) -> Tuple[Tuple[str, int, int], ...]:
    """(block name, out channels, stride) of every residual block, in the order PyTorch numbers them."""
    stages = [(base_width * mult, stride) for mult, stride in zip(STAGE_MULTIPLIERS, STAGE_STRIDES)]
    return blocks.stage_plan(stages, num_blocks, "layer", first=1)


# RobustBench's two block classes of `ResNet(block, num_blocks)` (architectures/resnet.py:5-55).
BLOCKS = {"basic": blocks.BasicBlock, "bottleneck": blocks.Bottleneck}


def block_class(name: str) -> type:
    """The Flax block a ResNet's `block` setting names ('basic' or 'bottleneck')."""
    if name not in BLOCKS:
        raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {name!r}")
    return BLOCKS[name]


class ResNet(nn.Module):
    """RobustBench `ResNet(BasicBlock or Bottleneck, num_blocks)`: [normalisation], conv-BN-ReLU stem, residual
    stages, mean pool, linear."""

    num_classes: int = 10
    num_blocks: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    base_width: int = 64
    mean: Optional[Stats] = None
    std: Optional[Stats] = None
    per_image_standardize: bool = False
    dtype: Dtype = jnp.float32
    bn_axis_name: Optional[str] = None
    conv_grad: str = "auto"  # the convolutions' input gradient: 'auto' | 'custom' | 'lax' (layers.resolve_conv_grad)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = blocks.factories(self, train)
        block = block_class(self.block)
        x = normalization.normalize(x, self.mean, self.std, self.per_image_standardize, self.dtype)
        x = blocks.conv_bn_act(x, conv, norm, self.base_width, 3, ("conv1", "bn1"))
        for name, features, strides in stage_plan(self.base_width, self.num_blocks):
            x = block(features, strides, conv=conv, norm=norm, name=name)(x)
        return classifier(global_avg_pool(x), self.num_classes, self.dtype, name="linear")


class PreActResNet(nn.Module):
    """RobustBench `PreActResNet(PreActBlock, num_blocks)`: [normalisation], conv stem, pre-activation stages,
    [BN-ReLU], pool, linear."""

    num_classes: int = 10
    num_blocks: Sequence[int] = (2, 2, 2, 2)
    base_width: int = 64
    bn_before_fc: bool = False
    out_shortcut: bool = False
    # 0: the global mean (RobustBench at 32x32; SAAD's `AdaptiveAvgPool2d`, HongsinLee/saad
    # cifar100_models/preresnet.py:71,89). k > 0: `F.avg_pool2d(out, k)` flattened, the classifier reading
    # 512 * (H/32) * (W/32) features (DGAD, kunsaram01/DGAD networks/preresnet.py:77,93-94: 2048 at 64x64).
    pool_window: int = 0
    mean: Optional[Stats] = None
    std: Optional[Stats] = None
    per_image_standardize: bool = False
    dtype: Dtype = jnp.float32
    bn_axis_name: Optional[str] = None
    conv_grad: str = "auto"  # the convolutions' input gradient: 'auto' | 'custom' | 'lax' (layers.resolve_conv_grad)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = blocks.factories(self, train)
        block = blocks.pre_act_block(nn.relu, conv, norm, blocks.ROBUSTBENCH_PREACT, self.out_shortcut)
        x = normalization.normalize(x, self.mean, self.std, self.per_image_standardize, self.dtype)
        x = blocks.stem(x, conv, self.base_width, "conv1")
        for name, features, strides in stage_plan(self.base_width, self.num_blocks):
            x = block(features, strides, name=name)(x)
        if self.bn_before_fc:
            x = blocks.bn_act(x, norm, "bn")
        features = global_avg_pool(x) if self.pool_window == 0 else window_avg_pool_flatten(x, self.pool_window)
        return classifier(features, self.num_classes, self.dtype, name="linear")
