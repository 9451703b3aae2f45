"""CIFAR MobileNetV2 of kuangliu/pytorch-cifar, as RSLAD uses it (zibojia/RSLAD `cifar10_models/mobilenet_v2.py`).

Stride-1 stem and stride 1 in the second stage (CIFAR changes of the ImageNet net), 4x4 final map on
32x32 inputs. Names follow that PyTorch module's state_dict: `layers.0.conv1.weight` ->
`layers_0/conv1/kernel`; `tests/torch_refs/mobilenetv2.py` is the peer it is tested against.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmard_jax.models import blocks
from mmard_jax.models.layers import PAD_SAME_TORCH, DepthwiseConv, Dtype, ModuleDef, classifier, global_avg_pool

# (expansion, out_planes, num_blocks, stride) of each stage.
CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def block_plan(cfg=CFG) -> Tuple[Tuple[int, int, int], ...]:
    """(expansion, out channels, stride) of every inverted-residual block, in PyTorch's `layers` order."""
    return tuple(
        (expansion, out, stride if i == 0 else 1) for expansion, out, count, stride in cfg for i in range(count)
    )


class InvertedResidual(nn.Module):
    """Expand 1x1 - depthwise 3x3 - project 1x1; residual only at stride 1 (conv1x1+BN if widths differ)."""

    expansion: int
    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    depthwise: str = "auto"
    conv_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_planes = x.shape[-1]
        out = blocks.conv_bn_act(x, self.conv, self.norm, self.expansion * in_planes, 1, ("conv1", "bn1"))
        out = DepthwiseConv((3, 3), self.strides, PAD_SAME_TORCH, dtype=self.conv.keywords["dtype"],
                            impl=self.depthwise, conv_grad=self.conv_grad, name="conv2")(out)
        out = blocks.bn_act(out, self.norm, "bn2")
        out = blocks.conv_bn(out, self.conv, self.norm, self.features, 1, ("conv3", "bn3"))
        if self.strides != 1:
            return out
        shortcut = x
        if in_planes != self.features:
            shortcut = blocks.conv_bn(x, self.conv, self.norm, self.features, 1, blocks.SHORTCUT_CONV_BN)
        return out + shortcut


class MobileNetV2(nn.Module):
    """kuangliu/RSLAD CIFAR MobileNetV2: conv-BN-ReLU stem, 17 inverted residuals, 1x1 to 1280, mean pool, linear."""

    num_classes: int = 10
    dtype: Dtype = jnp.float32
    bn_axis_name: Optional[str] = None
    depthwise: str = "auto"  # how the depthwise convs compute: 'auto' | 'taps' | 'conv' (layers.DepthwiseConv)
    conv_grad: str = "auto"  # the convs' gradients (plain and depthwise taps): 'auto' | 'custom' | 'lax' (layers)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = blocks.factories(self, train)
        x = blocks.conv_bn_act(jnp.asarray(x, self.dtype), conv, norm, STEM_CHANNELS, 3, ("conv1", "bn1"))
        for i, (expansion, features, strides) in enumerate(block_plan()):
            x = InvertedResidual(expansion, features, strides, conv=conv, norm=norm, depthwise=self.depthwise,
                                 conv_grad=self.conv_grad, name=f"layers_{i}")(x)
        x = blocks.conv_bn_act(x, conv, norm, HEAD_CHANNELS, 1, ("conv2", "bn2"))
        return classifier(global_avg_pool(x), self.num_classes, self.dtype, name="linear")
