"""TRADES WideResNet, layer for layer as RobustBench `model_zoo/architectures/wide_resnet.py`.

The teacher of the paper's CIFAR-10 runs (`Zhang2019Theoretically`, WRN-34-10, ReLU, no input
normalization). TRADES's checkpoint carries an unused `sub_block1`: it never enters the forward pass,
so it is not built here and the converter drops its keys (docs/design.md, "Teachers and conversion").
Names follow the state_dict: `block1.layer.0.bn1.weight` -> `block1/layer_0/bn1/scale`.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmard_jax.models.layers import (
    PAD_SAME_TORCH,
    WRN_CONV_KERNEL_INIT,
    Dtype,
    ModuleDef,
    batch_norm_factory,
    classifier,
    conv_factory,
    global_avg_pool,
)


def blocks_per_stage(depth: int) -> int:
    """Residual blocks in each of the three stages of a WRN-`depth` ((depth - 4) / 6, depth = 6n + 4)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
    return (depth - 4) // 6


class WideBasicBlock(nn.Module):
    """TRADES pre-activation block; when widths differ, the conv1x1 shortcut reads relu(bn1(x)), not x."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        equal_in_out = x.shape[-1] == self.features
        activated = nn.relu(self.norm(name="bn1")(x))
        if not equal_in_out:  # `equalInOut` is False: x itself is replaced by its activation
            x = activated
        out = self.conv(self.features, (3, 3), self.strides, padding=PAD_SAME_TORCH, name="conv1")(activated)
        out = nn.relu(self.norm(name="bn2")(out))
        out = self.conv(self.features, (3, 3), 1, padding=PAD_SAME_TORCH, name="conv2")(out)
        if not equal_in_out:
            x = self.conv(self.features, (1, 1), self.strides, padding="VALID", name="convShortcut")(x)
        return x + out


class NetworkBlock(nn.Module):
    """One stage (`NetworkBlock`): `num_blocks` blocks named `layer_<i>`, the first one changing width/stride."""

    num_blocks: int
    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_blocks):
            strides = self.strides if i == 0 else 1
            x = WideBasicBlock(self.features, strides, conv=self.conv, norm=self.norm, name=f"layer_{i}")(x)
        return x


class WideResNet(nn.Module):
    """RobustBench/TRADES `WideResNet(depth, widen_factor=width)`: conv stem, 3 stages, BN-ReLU, mean pool, fc."""

    num_classes: int = 10
    depth: int = 34
    width: int = 10
    bias_last: bool = True
    dtype: Dtype = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n = blocks_per_stage(self.depth)
        conv = conv_factory(self.dtype, kernel_init=WRN_CONV_KERNEL_INIT)
        norm = batch_norm_factory(train, self.dtype, self.bn_axis_name)
        x = jnp.asarray(x, self.dtype)
        x = conv(16, (3, 3), 1, padding=PAD_SAME_TORCH, name="conv1")(x)
        for stage, (channels, strides) in enumerate(((16, 1), (32, 2), (64, 2)), 1):
            x = NetworkBlock(n, channels * self.width, strides, conv=conv, norm=norm, name=f"block{stage}")(x)
        x = nn.relu(norm(name="bn1")(x))
        # RobustBench zeroes the fc bias at init.
        return classifier(
            global_avg_pool(x), self.num_classes, self.dtype, name="fc",
            use_bias=self.bias_last, bias_init=nn.initializers.zeros,
        )
