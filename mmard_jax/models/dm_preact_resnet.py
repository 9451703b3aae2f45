"""DeepMind PreAct-ResNet, layer for layer as RobustBench `DMPreActResNet` (`architectures/dm_wide_resnet.py`).

The ResNet-18-size teachers of RobustBench (`Gowal2021Improving_R18_ddpm_100m`, `Rebuffi2021Fixing_R18_*`,
`Rade2021Helper_R18_*`, Swish). It differs from `resnet.PreActResNet` in four ways that change the weights
or the logits: the input is normalized inside the model (constant mean/std, as in `DMWideResNet`); a block's
first conv and its shortcut pad by hand, (1, 1) at stride 1 and (0, 1) at stride 2, before a padding-0 conv;
the shortcut is a 3x3 conv of the block's raw input (not of act(bn(x))); BN-act comes before the classifier.
Names follow the state_dict: `layer_1.0.conv_2d_1.weight` -> `layer_1_0/conv_2d_1/kernel`.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmard_jax.models import blocks
from mmard_jax.models.dm_wide_resnet import CIFAR10_MEAN, CIFAR10_STD, Stats, deepmind_head, normalize_input
from mmard_jax.models.layers import Dtype

# Blocks per stage of the supported depths: RobustBench dm_wide_resnet.py:262-267.
BLOCKS_PER_DEPTH = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
# (channels, stride) of the four stages `layer_0` .. `layer_3`: dm_wide_resnet.py:268-271.
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
STEM_CHANNELS = 64  # `conv_2d`: dm_wide_resnet.py:260.
POOL_WINDOW = 4  # `F.avg_pool2d(out, 4)`: dm_wide_resnet.py:297.


def blocks_of_depth(depth: int) -> Tuple[int, ...]:
    """Blocks per stage of a DeepMind PreAct-ResNet of `depth` (18 or 34, as RobustBench accepts)."""
    if depth not in BLOCKS_PER_DEPTH:
        raise ValueError(f"DMPreActResNet depth must be one of {sorted(BLOCKS_PER_DEPTH)}, got {depth}")
    return BLOCKS_PER_DEPTH[depth]


class DMPreActBlock(blocks.PreActBlock):
    """RobustBench `_PreActBlock`: conv(act(bn0(x))), act(bn1), conv, plus x or a hand-padded 3x3 conv of x."""

    layout: blocks.PreActLayout = blocks.DEEPMIND_PREACT


class DMPreActResNet(nn.Module):
    """RobustBench `DMPreActResNet`: (x - mean) / std, conv stem, 4 stages, BN-act, mean pool, linear `logits`.

    Defaults are RobustBench's (dm_wide_resnet.py:238-247) except the activation: its default is ReLU, but
    every RobustBench entry passes Swish (e.g. cifar10.py:636-639 of robustbench 1.1.1), so 'swish' it is here.
    RobustBench's `width` must be 0 and is therefore not an attribute.
    """

    num_classes: int = 10
    depth: int = 18
    activation: str = "swish"
    mean: Stats = CIFAR10_MEAN
    std: Stats = CIFAR10_STD
    padding: int = 0
    dtype: Dtype = jnp.float32
    bn_axis_name: Optional[str] = None
    conv_grad: str = "auto"  # the convolutions' input gradient: 'auto' | 'custom' | 'lax' (layers.resolve_conv_grad)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        plan = blocks.stage_plan(STAGES, blocks_of_depth(self.depth), "layer_")
        act = blocks.activation_fn(self.activation)
        conv, norm = blocks.factories(self, train)
        x = normalize_input(x, self.mean, self.std, self.padding, self.dtype)
        x = blocks.stem(x, conv, STEM_CHANNELS, "conv_2d")
        for name, features, strides in plan:
            x = DMPreActBlock(features, strides, act, conv=conv, norm=norm, name=name)(x)
        return deepmind_head(x, norm, act, self.padding, POOL_WINDOW, self.num_classes, self.dtype)
