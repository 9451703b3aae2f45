"""DeepMind WideResNet, layer for layer as RobustBench `model_zoo/architectures/dm_wide_resnet.py`.

The teacher of the paper's CIFAR-100 runs (`Gowal2020Uncovering`, WRN-70-16, Swish); RobustBench builds the
newer ones (`Wang2023Better_*`, `Bartoldson2024Adversarial_*`) with `nn.SiLU`, the same function and the same
state_dict (activations hold no parameters), recorded here as activation 'silu'. The input is
normalized inside the model with constant mean/std (not variables: they are not in the state_dict either).
The first conv of a block pads by hand, (1, 1) at stride 1 and (0, 1) at stride 2, before a padding-0 conv.
DM-Improves-AT's published Tiny-ImageNet and SVHN WRN-28-10 teachers (wzekai99/DM-Improves-AT
`core/models/ti_wideresnetwithswish.py`, `wideresnetwithswish.py`) are this network with nn.SiLU, their own
statistics and, for Tiny-ImageNet, adaptive pooling (`adaptive_pool`); `interop/published.py` lists them.
Names follow the state_dict: `layer.0.block.0.conv_0.weight` -> `layer_0/block_0/conv_0/kernel`.
"""

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmard_jax.models import blocks
from mmard_jax.models.blocks import activation_fn
from mmard_jax.models.layers import Dtype, classifier, global_avg_pool

# RobustBench dm_wide_resnet.py:25-28.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# The published DM-Improves-AT teachers' in-model statistics (wzekai99/DM-Improves-AT @ b390f25,
# core/models/ti_wideresnetwithswish.py:16-19; the SVHN pair also in core/models/wideresnetwithswish.py:16-17).
SVHN_MEAN = (0.5, 0.5, 0.5)
SVHN_STD = (0.5, 0.5, 0.5)
TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2302, 0.2265, 0.2262)

Stats = Union[float, Sequence[float]]


def normalize_input(x: jax.Array, mean: Stats, std: Stats, padding: int, dtype: Dtype) -> jax.Array:
    """DeepMind's input step: zero-pad by `padding`, then (x - mean) / std in float32, cast to `dtype`."""
    x = jnp.asarray(x, jnp.float32)
    if padding > 0:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def final_pool(x: jax.Array, padding: int, window: int = 8, adaptive: bool = False) -> jax.Array:
    """PyTorch's `avg_pool2d(out, window)`: the global mean, or with input padding its top-left window;
    `adaptive`: `AdaptiveAvgPool2d((1, 1))`, the global mean whatever the padding."""
    if padding > 0 and not adaptive:
        # The padded input gives a final map wider than the window (e.g. 9x9 for padding 2); PyTorch then
        # pools only the first window, and so do we, to keep converted checkpoints exact.
        return jnp.mean(x[:, :window, :window, :], axis=(1, 2))
    return global_avg_pool(x)


def deepmind_head(x: jax.Array, norm, act: blocks.Activation, padding: int, window: int, num_classes: int,
                  dtype: Dtype, adaptive: bool = False) -> jax.Array:
    """DeepMind's classifier head: act(BN `batchnorm`), `avg_pool2d(out, window)` (or adaptive), linear `logits`."""
    x = blocks.bn_act(x, norm, "batchnorm", act)
    return classifier(final_pool(x, padding, window, adaptive), num_classes, dtype, name="logits")


class DMWideResNet(nn.Module):
    """RobustBench `DMWideResNet`: (x - mean) / std, conv stem, 3 stages, BN-act, mean pool, linear `logits`."""

    num_classes: int = 10
    depth: int = 28
    width: int = 10
    activation: str = "swish"
    mean: Stats = CIFAR10_MEAN
    std: Stats = CIFAR10_STD
    padding: int = 0
    # False: RobustBench's `avg_pool2d(out, 8)` (dm_wide_resnet.py:192), the global mean without input padding.
    # True: DM-Improves-AT's Tiny-ImageNet class, `AdaptiveAvgPool2d((1, 1))` (ti_wideresnetwithswish.py:143,169),
    # the global mean at any padding. Either is the global mean at any input size when padding is 0.
    adaptive_pool: bool = False
    dtype: Dtype = jnp.float32
    bn_axis_name: Optional[str] = None
    conv_grad: str = "auto"  # the convolutions' input gradient: 'auto' | 'custom' | 'lax' (layers.resolve_conv_grad)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = activation_fn(self.activation)
        conv, norm = blocks.factories(self, train)
        block = blocks.pre_act_block(act, conv, norm, blocks.DEEPMIND_WIDE)
        x = normalize_input(x, self.mean, self.std, self.padding, self.dtype)
        x = blocks.stem(x, conv, blocks.WIDE_STEM_CHANNELS, "init_conv")
        x = blocks.wide_stages(x, self.depth, self.width, block, lambda i: f"layer_{i}", "block_")
        # avg_pool2d(out, 8): RobustBench dm_wide_resnet.py:192.
        return deepmind_head(x, norm, act, self.padding, 8, self.num_classes, self.dtype, self.adaptive_pool)
