"""ImageNet ResNet-18/50 and WideResNet-50-2, layer for layer as torchvision's `ResNet` (the networks of
RobustBench's ImageNet entries, `pt_models.resnet18/resnet50/wide_resnet50_2`, robustbench 1.1.1
model_zoo/imagenet.py), with an optional input normalisation (RobustBench's `normalize_model` wrapper).

Written from pytorch/vision @ f50e776 `torchvision/models/resnet.py`: a 7x7 stride-2 padding-3 conv stem `conv1`,
`bn1`, ReLU and a 3x3 stride-2 padding-1 max-pool (lines 139-143); four stages `layer1`..`layer4` of 64, 128, 256,
512 planes, strides 1, 2, 2, 2 (144-150), of `BasicBlock`s (35-72) or `Bottleneck`s (75-115, stride on the 3x3
conv, inner width int(planes * width_per_group / 64), line 83); a conv1x1+BN `downsample` where the shape changes
(178-182); adaptive average pooling and the linear `fc` (151-152). `wide_resnet50_2` is `resnet50` with
width_per_group 128 (line 323). Convolutions are initialised as torchvision's (kaiming normal, fan_out, ReLU gain:
lines 154-156). The pool is the global mean, so any input size works (224x224 in RobustBench's protocol, 288x288
for Wong2020Fast, smaller ones in the tests). Names follow the state_dict: `layer1.0.downsample.0.weight` ->
`layer1_0/downsample_0/kernel`.
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmard_jax.models import blocks, normalization
from mmard_jax.models.layers import WRN_CONV_KERNEL_INIT, Dtype, classifier, global_avg_pool
from mmard_jax.models.normalization import Stats

# (planes, stride) of `layer1`..`layer4` (resnet.py:144-150) and the stem's width (`self.inplanes = 64`, line 128).
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
STEM_CHANNELS = 64
STEM_PADDING = ((3, 3), (3, 3))  # `kernel_size=7, stride=2, padding=3` (line 139)
POOL_PADDING = ((1, 1), (1, 1))  # `MaxPool2d(kernel_size=3, stride=2, padding=1)` (line 143)
BASE_WIDTH = 64  # the width_per_group at which a bottleneck's inner width is `planes` (line 83)


def bottleneck_width(planes: int, width_per_group: int) -> int:
    """A bottleneck's inner width, `int(planes * (base_width / 64.)) * groups` with groups 1 (resnet.py:83)."""
    return int(planes * (width_per_group / BASE_WIDTH))


def max_pool(x: jax.Array) -> jax.Array:
    """The stem's 3x3 stride-2 max-pool; PyTorch's padding never wins the max (Flax pads with -inf)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=POOL_PADDING)


class TorchvisionResNet(nn.Module):
    """torchvision `ResNet(block, layers, width_per_group=...)`: [normalisation], 7x7 stem, max-pool, four stages,
    mean pool, `fc`."""

    num_classes: int = 1000
    block: str = "bottleneck"  # 'basic' (`BasicBlock`) or 'bottleneck' (`Bottleneck`)
    layers: Sequence[int] = (3, 4, 6, 3)
    width_per_group: int = BASE_WIDTH
    mean: Optional[Stats] = None
    std: Optional[Stats] = None
    per_image_standardize: bool = False
    dtype: Dtype = jnp.float32
    bn_axis_name: Optional[str] = None
    conv_grad: str = "auto"  # the convolutions' input gradient: 'auto' | 'custom' | 'lax' (layers.resolve_conv_grad)

    def block_fn(self, conv, norm):
        """The stage blocks as `block(planes, strides, name=...)`, torchvision's `downsample` names."""
        common = {"conv": conv, "norm": norm, "shortcut_names": blocks.DOWNSAMPLE_CONV_BN}
        if self.block == "basic":
            if self.width_per_group != BASE_WIDTH:  # torchvision raises the same (resnet.py:43-44)
                raise ValueError(f"BasicBlock only supports width_per_group={BASE_WIDTH}, got {self.width_per_group}")
            return functools.partial(blocks.BasicBlock, **common)
        if self.block == "bottleneck":
            return lambda planes, strides, name: blocks.Bottleneck(
                planes, strides, width=bottleneck_width(planes, self.width_per_group), name=name, **common)
        raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = blocks.factories(self, train, kernel_init=WRN_CONV_KERNEL_INIT)  # kaiming normal, fan_out
        block = self.block_fn(conv, norm)
        if len(self.layers) != len(STAGES):
            raise ValueError(f"layers must give the blocks of {len(STAGES)} stages, got {tuple(self.layers)}")
        x = normalization.normalize(x, self.mean, self.std, self.per_image_standardize, self.dtype)
        x = conv(STEM_CHANNELS, (7, 7), 2, padding=STEM_PADDING, name="conv1")(x)
        x = max_pool(blocks.bn_act(x, norm, "bn1"))
        for name, planes, strides in blocks.stage_plan(STAGES, self.layers, "layer", first=1):
            x = block(planes, strides, name=name)(x)
        return classifier(global_avg_pool(x), self.num_classes, self.dtype, name="fc")
