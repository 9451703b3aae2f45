"""CIFAR ResNet-18 and PreAct-ResNet-18, layer for layer as RobustBench `model_zoo/architectures/resnet.py`.

3x3 stride-1 stem, no max-pool, four stages of two blocks (64, 128, 256, 512 channels at base_width 64).
Submodule names follow the PyTorch state_dict (`layer1.0.conv1.weight` -> `layer1_0/conv1/kernel`,
see `mmard_jax/interop/naming.py`), so RobustBench checkpoints convert by name.
"""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmard_jax.models.layers import (
    PAD_SAME_TORCH,
    Dtype,
    ModuleDef,
    batch_norm_factory,
    classifier,
    conv_factory,
    global_avg_pool,
)

STAGE_MULTIPLIERS = (1, 2, 4, 8)
STAGE_STRIDES = (1, 2, 2, 2)


def stage_plan(base_width: int, num_blocks: Sequence[int]) -> Tuple[Tuple[str, int, int], ...]:
    """(block name, out channels, stride) of every residual block, in the order PyTorch numbers them."""
    plan = []
    for stage, (mult, stride, count) in enumerate(zip(STAGE_MULTIPLIERS, STAGE_STRIDES, num_blocks), 1):
        for i in range(count):
            plan.append((f"layer{stage}_{i}", base_width * mult, stride if i == 0 else 1))
    return tuple(plan)


class BasicBlock(nn.Module):
    """Post-activation residual block; conv1x1+BN shortcut when stride or width changes."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv(self.features, (3, 3), self.strides, padding=PAD_SAME_TORCH, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out))
        out = self.conv(self.features, (3, 3), 1, padding=PAD_SAME_TORCH, name="conv2")(out)
        out = self.norm(name="bn2")(out)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = self.conv(self.features, (1, 1), self.strides, padding="VALID", name="shortcut_0")(x)
            shortcut = self.norm(name="shortcut_1")(shortcut)
        return nn.relu(out + shortcut)


class PreActBlock(nn.Module):
    """Pre-activation residual block; bias-free conv1x1 shortcut, on x or on relu(bn1(x)) (`out_shortcut`)."""

    features: int
    strides: int
    out_shortcut: bool
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = nn.relu(self.norm(name="bn1")(x))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            source = out if self.out_shortcut else x
            shortcut = self.conv(self.features, (1, 1), self.strides, padding="VALID", name="shortcut_0")(source)
        out = self.conv(self.features, (3, 3), self.strides, padding=PAD_SAME_TORCH, name="conv1")(out)
        out = nn.relu(self.norm(name="bn2")(out))
        out = self.conv(self.features, (3, 3), 1, padding=PAD_SAME_TORCH, name="conv2")(out)
        return out + shortcut


class ResNet(nn.Module):
    """RobustBench `ResNet(BasicBlock, num_blocks)`: conv-BN-ReLU stem, residual stages, mean pool, linear."""

    num_classes: int = 10
    num_blocks: Sequence[int] = (2, 2, 2, 2)
    base_width: int = 64
    dtype: Dtype = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = conv_factory(self.dtype)
        norm = batch_norm_factory(train, self.dtype, self.bn_axis_name)
        x = jnp.asarray(x, self.dtype)
        x = conv(self.base_width, (3, 3), 1, padding=PAD_SAME_TORCH, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        for name, features, strides in stage_plan(self.base_width, self.num_blocks):
            x = BasicBlock(features, strides, conv=conv, norm=norm, name=name)(x)
        return classifier(global_avg_pool(x), self.num_classes, self.dtype, name="linear")


class PreActResNet(nn.Module):
    """RobustBench `PreActResNet(PreActBlock, num_blocks)`: conv stem, pre-activation stages, [BN-ReLU], linear."""

    num_classes: int = 10
    num_blocks: Sequence[int] = (2, 2, 2, 2)
    base_width: int = 64
    bn_before_fc: bool = False
    out_shortcut: bool = False
    dtype: Dtype = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = conv_factory(self.dtype)
        norm = batch_norm_factory(train, self.dtype, self.bn_axis_name)
        x = jnp.asarray(x, self.dtype)
        x = conv(self.base_width, (3, 3), 1, padding=PAD_SAME_TORCH, name="conv1")(x)
        for name, features, strides in stage_plan(self.base_width, self.num_blocks):
            x = PreActBlock(features, strides, self.out_shortcut, conv=conv, norm=norm, name=name)(x)
        if self.bn_before_fc:
            x = nn.relu(norm(name="bn")(x))
        return classifier(global_avg_pool(x), self.num_classes, self.dtype, name="linear")
