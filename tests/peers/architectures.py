"""The PyTorch peer of `mmard_jax.models.create`: RobustBench's WideResNet and ResNet-18, the CIFAR MobileNetV2,
each as a private copy whose last pooling is the global mean, so that 8x8 and 16x16 inputs work; SAAD's
PreAct-ResNet-18 and DM-Improves-AT's WideResNets as published (`peers.published_models`: adaptive pooling where
the published file has it)."""

import functools
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from peers import mobilenetv2, published_models, robustbench

# mmard_jax.models.blocks.ACTIVATIONS' names -> the PyTorch modules DM-Improves-AT builds with ('swish' is
# nn.SiLU: ti_wideresnetwithswish.py:21-24, 186-192).
DM_ACTIVATIONS = {"swish": torch.nn.SiLU, "silu": torch.nn.SiLU, "relu": torch.nn.ReLU}


class _GlobalPoolF:
    """`torch.nn.functional` with `avg_pool2d` as the global mean, for the architecture files below.

    The peers pool their last map with a fixed kernel (8 for the WRN, 4 for ResNet-18/MobileNetV2), which
    is the global mean on 32x32 inputs and fails on 16x16; the Flax zoo takes the global mean at any size
    (layers.global_avg_pool), so the reference does too. Every other function is torch's own.
    """

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def avg_pool2d(x, kernel_size, *args, **kwargs):
        return F.adaptive_avg_pool2d(x, 1)


@functools.cache
def _global_pool_copy(path: str, name: str):
    """The architecture file `path` executed again as module `name`, with the global-pool `F` (the tests' shared
    copies stay intact)."""
    mod = robustbench.exec_file(path, name)
    mod.F = _GlobalPoolF()
    return mod


def _robustbench(module: str):
    return _global_pool_copy(str(robustbench.arch_file(module)), f"_torch_step_rb_{module}")


def build_model(arch: str, num_classes: int = 10, kwargs: Optional[Mapping] = None) -> torch.nn.Module:
    """The PyTorch peer of `mmard_jax.models.create(arch, num_classes, **kwargs)`."""
    kwargs = dict(kwargs or {})
    if arch == "wide_resnet":
        wrn = _robustbench("wide_resnet")
        return wrn.WideResNet(depth=kwargs.pop("depth", 34), widen_factor=kwargs.pop("width", 10),
                              num_classes=num_classes, **kwargs)
    if arch == "resnet18":
        if kwargs.get("base_width", 64) != 64:
            raise ValueError("RobustBench's ResNet-18 has base width 64 only")
        rn = _robustbench("resnet")
        return rn.ResNet(rn.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    if arch == "mobilenet_v2":
        if kwargs:
            raise ValueError(f"mobilenet_v2 takes no arguments, got {kwargs}")
        mnv2 = _global_pool_copy(mobilenetv2.__file__, "_torch_step_mobilenetv2")
        return mnv2.MobileNetV2(num_classes=num_classes)
    if arch == "preact_resnet18_saad":  # SAAD's published `pResNet18` (adaptive pooling as published)
        return published_models.SaadPreActResNet18(num_classes=num_classes, base_width=kwargs.pop("base_width", 64),
                                                    **kwargs)
    if arch == "dm_wide_resnet":  # DM-Improves-AT's published WideResNet files (their own pooling)
        activation = kwargs.pop("activation", "swish")
        if activation not in DM_ACTIVATIONS:
            raise ValueError(f"dm_wide_resnet peer: activation {activation!r}; known: {sorted(DM_ACTIVATIONS)}")
        cls = published_models.TinyWideResNet if kwargs.pop("adaptive_pool", False) \
            else published_models.CifarWideResNet
        return cls(num_classes=num_classes, activation_fn=DM_ACTIVATIONS[activation], **kwargs)
    raise ValueError(f"no PyTorch peer for {arch!r}; known: wide_resnet, resnet18, mobilenet_v2, "
                     "preact_resnet18_saad, dm_wide_resnet")
