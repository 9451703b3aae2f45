"""DeepMind PreAct-ResNet, layer for layer as RobustBench `DMPreActResNet` (`architectures/dm_wide_resnet.py`).

The ResNet-18-size teachers of RobustBench (`Gowal2021Improving_R18_ddpm_100m`, `Rebuffi2021Fixing_R18_*`,
`Rade2021Helper_R18_*`, Swish). It differs from `resnet.PreActResNet` in four ways that change the weights
or the logits: the input is normalized inside the model (constant mean/std, as in `DMWideResNet`); a block's
first conv and its shortcut pad by hand, (1, 1) at stride 1 and (0, 1) at stride 2, before a padding-0 conv;
the shortcut is a 3x3 conv of the block's raw input (not of act(bn(x))); BN-act comes before the classifier.
Names follow the state_dict: `layer_1.0.conv_2d_1.weight` -> `layer_1_0/conv_2d_1/kernel`.
"""

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmard_jax.models.dm_wide_resnet import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Stats,
    activation_fn,
    dm_conv0_padding,
    final_pool,
    normalize_input,
)
from mmard_jax.models.layers import PAD_SAME_TORCH, Dtype, ModuleDef, batch_norm_factory, classifier, conv_factory

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


class DMPreActBlock(nn.Module):
    """RobustBench `_PreActBlock`: conv(act(bn0(x))), act(bn1), conv, plus x or a hand-padded 3x3 conv of x."""

    features: int
    strides: int
    act: Callable[[jax.Array], jax.Array]
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = dm_conv0_padding(self.strides)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = self.conv(self.features, (3, 3), self.strides, padding=padding, name="shortcut")(x)
        out = self.act(self.norm(name="batchnorm_0")(x))
        out = self.conv(self.features, (3, 3), self.strides, padding=padding, name="conv_2d_1")(out)
        out = self.act(self.norm(name="batchnorm_1")(out))
        out = self.conv(self.features, (3, 3), 1, padding=PAD_SAME_TORCH, name="conv_2d_2")(out)
        return out + shortcut


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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        blocks = blocks_of_depth(self.depth)
        act = activation_fn(self.activation)
        conv = conv_factory(self.dtype)
        norm = batch_norm_factory(train, self.dtype, self.bn_axis_name)
        x = normalize_input(x, self.mean, self.std, self.padding, self.dtype)
        x = conv(STEM_CHANNELS, (3, 3), 1, padding=PAD_SAME_TORCH, name="conv_2d")(x)
        for stage, ((features, strides), count) in enumerate(zip(STAGES, blocks)):
            for i in range(count):
                block = DMPreActBlock(features, strides if i == 0 else 1, act, conv=conv, norm=norm,
                                      name=f"layer_{stage}_{i}")
                x = block(x)
        x = act(norm(name="batchnorm")(x))
        return classifier(final_pool(x, self.padding, POOL_WINDOW), self.num_classes, self.dtype, name="logits")
