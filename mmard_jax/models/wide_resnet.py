"""TRADES WideResNet, layer for layer as RobustBench `model_zoo/architectures/wide_resnet.py`.

The teacher of the paper's CIFAR-10 runs (`Zhang2019Theoretically`, WRN-34-10, ReLU, no input
normalization). TRADES's checkpoint carries an unused `sub_block1`: it never enters the forward pass,
so it is not built here and the converter drops its keys (docs/design.md, "Teachers and conversion"). An optional
input normalisation (`mean`/`std` or `per_image_standardize`, `normalization.py`) is the wrapper of RobustBench's
normalised WRN entries (`Rice2020OverfittingNet`, `Chen2020EfficientNet`, `Ding2020MMANet`, ...).
Names follow the state_dict: `block1.layer.0.bn1.weight` -> `block1/layer_0/bn1/scale`.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmard_jax.models import blocks, normalization
from mmard_jax.models.layers import WRN_CONV_KERNEL_INIT, Dtype, classifier, global_avg_pool
from mmard_jax.models.normalization import Stats


class WideResNet(nn.Module):
    """RobustBench/TRADES `WideResNet(depth, widen_factor=width)`: [normalisation], conv stem, 3 stages, BN-ReLU,
    mean pool, fc."""

    num_classes: int = 10
    depth: int = 34
    width: int = 10
    bias_last: bool = True
    mean: Optional[Stats] = None
    std: Optional[Stats] = None
    per_image_standardize: bool = False
    dtype: Dtype = jnp.float32
    bn_axis_name: Optional[str] = None
    conv_grad: str = "auto"  # the convolutions' input gradient: 'auto' | 'custom' | 'lax' (layers.resolve_conv_grad)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = blocks.factories(self, train, kernel_init=WRN_CONV_KERNEL_INIT)
        block = blocks.pre_act_block(nn.relu, conv, norm, blocks.TRADES_WIDE)
        x = normalization.normalize(x, self.mean, self.std, self.per_image_standardize, self.dtype)
        x = blocks.stem(x, conv, blocks.WIDE_STEM_CHANNELS, "conv1")
        x = blocks.wide_stages(x, self.depth, self.width, block, lambda i: f"block{i + 1}", "layer_")
        x = blocks.bn_act(x, norm, "bn1")
        # RobustBench zeroes the fc bias at init.
        return classifier(
            global_avg_pool(x), self.num_classes, self.dtype, name="fc",
            use_bias=self.bias_last, bias_init=nn.initializers.zeros,
        )
