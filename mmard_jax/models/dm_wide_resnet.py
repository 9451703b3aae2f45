"""DeepMind WideResNet, layer for layer as RobustBench `model_zoo/architectures/dm_wide_resnet.py`.

The teacher of the paper's CIFAR-100 runs (`Gowal2020Uncovering`, WRN-70-16, Swish); RobustBench builds the
newer ones (`Wang2023Better_*`, `Bartoldson2024Adversarial_*`) with `nn.SiLU`, the same function and the same
state_dict (activations hold no parameters), recorded here as activation 'silu'. The input is
normalized inside the model with constant mean/std (not variables: they are not in the state_dict either).
The first conv of a block pads by hand, (1, 1) at stride 1 and (0, 1) at stride 2, before a padding-0 conv.
Names follow the state_dict: `layer.0.block.0.conv_0.weight` -> `layer_0/block_0/conv_0/kernel`.
"""

from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmard_jax.models.layers import (
    PAD_DM_STRIDE2,
    PAD_SAME_TORCH,
    Dtype,
    ModuleDef,
    batch_norm_factory,
    classifier,
    conv_factory,
    global_avg_pool,
)
from mmard_jax.models.wide_resnet import blocks_per_stage

# RobustBench dm_wide_resnet.py:25-28.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# DeepMind's Swish (RobustBench dm_wide_resnet.py:31-51) is x * sigmoid(x), which is torch.nn.SiLU:
# both names map to the same function, kept apart only to tell which PyTorch class the checkpoint used.
ACTIVATIONS = {"swish": jax.nn.silu, "silu": jax.nn.silu, "relu": nn.relu}

Stats = Union[float, Sequence[float]]


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation named `name` ('swish', 'silu' or 'relu')."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def dm_conv0_padding(strides: int):
    """The hand padding DeepMind applies before a block's first (padding-0) conv."""
    if strides == 1:
        return PAD_SAME_TORCH
    if strides == 2:
        return PAD_DM_STRIDE2
    raise ValueError(f"Unsupported stride {strides}")


class DMBlock(nn.Module):
    """DeepMind pre-activation block; with a width change, the conv1x1 shortcut reads act(bn0(x))."""

    features: int
    strides: int
    act: Callable[[jax.Array], jax.Array]
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        has_shortcut = x.shape[-1] != self.features
        activated = self.act(self.norm(name="batchnorm_0")(x))
        if has_shortcut:
            x = activated
        out = self.conv(self.features, (3, 3), self.strides, padding=dm_conv0_padding(self.strides), name="conv_0")(
            activated
        )
        out = self.act(self.norm(name="batchnorm_1")(out))
        out = self.conv(self.features, (3, 3), 1, padding=PAD_SAME_TORCH, name="conv_1")(out)
        if has_shortcut:
            x = self.conv(self.features, (1, 1), self.strides, padding="VALID", name="shortcut")(x)
        return x + out


class DMBlockGroup(nn.Module):
    """One stage (`_BlockGroup`): `num_blocks` blocks named `block_<i>`, the first one changing width/stride."""

    num_blocks: int
    features: int
    strides: int
    act: Callable[[jax.Array], jax.Array]
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_blocks):
            strides = self.strides if i == 0 else 1
            x = DMBlock(self.features, strides, self.act, conv=self.conv, norm=self.norm, name=f"block_{i}")(x)
        return x


def normalize_input(x: jax.Array, mean: Stats, std: Stats, padding: int, dtype: Dtype) -> jax.Array:
    """DeepMind's input step: zero-pad by `padding`, then (x - mean) / std in float32, cast to `dtype`."""
    x = jnp.asarray(x, jnp.float32)
    if padding > 0:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def final_pool(x: jax.Array, padding: int, window: int = 8) -> jax.Array:
    """PyTorch's `avg_pool2d(out, window)`: the global mean, or with input padding its top-left window."""
    if padding > 0:
        # The padded input gives a final map wider than the window (e.g. 9x9 for padding 2); PyTorch then
        # pools only the first window, and so do we, to keep converted checkpoints exact.
        return jnp.mean(x[:, :window, :window, :], axis=(1, 2))
    return global_avg_pool(x)


class DMWideResNet(nn.Module):
    """RobustBench `DMWideResNet`: (x - mean) / std, conv stem, 3 stages, BN-act, mean pool, linear `logits`."""

    num_classes: int = 10
    depth: int = 28
    width: int = 10
    activation: str = "swish"
    mean: Stats = CIFAR10_MEAN
    std: Stats = CIFAR10_STD
    padding: int = 0
    dtype: Dtype = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n = blocks_per_stage(self.depth)
        act = activation_fn(self.activation)
        conv = conv_factory(self.dtype)
        norm = batch_norm_factory(train, self.dtype, self.bn_axis_name)
        x = normalize_input(x, self.mean, self.std, self.padding, self.dtype)
        x = conv(16, (3, 3), 1, padding=PAD_SAME_TORCH, name="init_conv")(x)
        for i, (channels, strides) in enumerate(((16, 1), (32, 2), (64, 2))):
            x = DMBlockGroup(n, channels * self.width, strides, act, conv=conv, norm=norm, name=f"layer_{i}")(x)
        x = act(norm(name="batchnorm")(x))
        # avg_pool2d(out, 8): RobustBench dm_wide_resnet.py:192.
        return classifier(final_pool(x, self.padding, 8), self.num_classes, self.dtype, name="logits")
