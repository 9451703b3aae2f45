"""Input normalisation inside a model: the wrappers RobustBench puts around a network so that it takes [0, 1] images.

Two kinds exist among the families converted here:
- constant statistics, `(x - mean) / std` per channel: RobustBench's CIFAR subclasses register them as buffers
  `mu`/`sigma` (e.g. `Rice2020OverfittingNet`, robustbench 1.1.1 model_zoo/cifar10.py:71-86) and its ImageNet
  entries wrap the torchvision network in `normalize_model` (`ImageNormalizer` buffers `normalize.mean`/
  `normalize.std`, model_zoo/architectures/utils_architectures.py); `Hendrycks2019UsingNet`'s `2 * x - 1`
  (cifar10.py:66-68) is mean 0.5, std 0.5;
- per-image standardisation (`Ding2020MMANet`, cifar10.py:153-170): each image minus its mean over (C, H, W),
  divided by its unbiased standard deviation, floored at 1 / sqrt(C * H * W).
The statistics are constants of the module (recorded in model.json), not variables: nothing trains them.
"""

import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from mmard_jax.models.layers import Dtype

Stats = Union[float, Sequence[float]]


def check(mean: Optional[Stats], std: Optional[Stats], per_image: bool) -> None:
    """ValueError unless the settings name one normalisation: mean with std, per-image alone, or none."""
    if (mean is None) != (std is None):
        raise ValueError(f"mean and std go together: got mean={mean!r}, std={std!r}")
    if per_image and mean is not None:
        raise ValueError("per_image_standardize replaces mean/std: give one or the other")


def per_image_standardize(x: jax.Array) -> jax.Array:
    """(x - mean) / max(std, 1 / sqrt(n)) per image over its n = H * W * C values, std unbiased as `torch.std`
    (RobustBench `Ding2020MMANet.forward`, model_zoo/cifar10.py:163-169 of robustbench 1.1.1)."""
    n = math.prod(x.shape[1:])
    mu = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    std = jnp.std(x, axis=(1, 2, 3), keepdims=True, ddof=1)
    return (x - mu) / jnp.maximum(std, 1.0 / math.sqrt(n))


def normalize(x: jax.Array, mean: Optional[Stats], std: Optional[Stats], per_image: bool, dtype: Dtype) -> jax.Array:
    """The model's input step: standardised in float32 (as the PyTorch wrappers compute it) and cast to `dtype`;
    unchanged but for the cast when the model has no normalisation."""
    check(mean, std, per_image)
    if not per_image and mean is None:
        return jnp.asarray(x, dtype)
    x = jnp.asarray(x, jnp.float32)
    if per_image:
        x = per_image_standardize(x)
    else:
        x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)
