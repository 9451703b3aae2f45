"""Models by name: `create('resnet18', num_classes=100)`, and `count_params`."""

import dataclasses
import math
from typing import Any, Dict, Mapping, NamedTuple, Tuple

import jax
from flax import linen as nn

from mmard_jax.models.dm_preact_resnet import DMPreActResNet
from mmard_jax.models.dm_wide_resnet import DMWideResNet
from mmard_jax.models.mobilenet_v2 import MobileNetV2
from mmard_jax.models.resnet import PreActResNet, ResNet
from mmard_jax.models.torchvision_resnet import TorchvisionResNet
from mmard_jax.models.wide_resnet import WideResNet


class ModelSpec(NamedTuple):
    """A registered model: its Flax class, the attributes the name fixes, and its PyTorch container names."""

    cls: type
    fixed: Mapping[str, Any]
    torch_containers: frozenset  # for `interop.naming.join_torch_key` (Flax -> PyTorch names)


_RESNET_CONTAINERS = frozenset({"layer1", "layer2", "layer3", "layer4", "shortcut"})
_TORCHVISION_CONTAINERS = frozenset({"layer1", "layer2", "layer3", "layer4", "downsample"})

MODELS: Dict[str, ModelSpec] = {
    "resnet18": ModelSpec(ResNet, {"num_blocks": (2, 2, 2, 2), "block": "basic"}, _RESNET_CONTAINERS),
    # RobustBench `ResNet(Bottleneck, [3, 4, 6, 3])`, the CIFAR ResNet-50 of Engstrom2019Robustness and
    # Augustin2020Adversarial (robustbench 1.1.1 model_zoo/cifar10.py:89-104, 172-191).
    "resnet50": ModelSpec(ResNet, {"num_blocks": (3, 4, 6, 3), "block": "bottleneck"}, _RESNET_CONTAINERS),
    "preact_resnet18": ModelSpec(PreActResNet, {"num_blocks": (2, 2, 2, 2)}, _RESNET_CONTAINERS),
    # SAAD's Tiny-ImageNet student `pResNet18` (HongsinLee/saad @ 295121c, cifar100_models/preresnet.py:8-30,
    # 59-95; utils.py:182-186): the shortcut conv reads relu(bn1(x)) (line 26), BN-ReLU before the pool
    # (lines 70, 88), adaptive average pooling (71, 89), Linear(512, classes) (72).
    "preact_resnet18_saad": ModelSpec(
        PreActResNet, {"num_blocks": (2, 2, 2, 2), "bn_before_fc": True, "out_shortcut": True}, _RESNET_CONTAINERS
    ),
    # DGAD's `PreActResNet18` (kunsaram01/DGAD @ a0329c8, networks/preresnet.py:14-36, 67-100; the Tiny-ImageNet
    # teacher of main_tiny.py:227-230 and its `--model presnet18`): the same blocks, no BN-ReLU before the pool,
    # `F.avg_pool2d(out, 4)` flattened (lines 93-94) into Linear(2048, classes) (line 77) at 64x64.
    "preact_resnet18_dgad": ModelSpec(
        PreActResNet, {"num_blocks": (2, 2, 2, 2), "out_shortcut": True, "pool_window": 4}, _RESNET_CONTAINERS
    ),
    "mobilenet_v2": ModelSpec(MobileNetV2, {}, frozenset({"layers", "shortcut"})),
    "wide_resnet": ModelSpec(WideResNet, {}, frozenset({"layer"})),
    "dm_wide_resnet": ModelSpec(DMWideResNet, {}, frozenset({"layer", "block"})),
    "dm_preact_resnet": ModelSpec(DMPreActResNet, {}, frozenset({"layer_0", "layer_1", "layer_2", "layer_3"})),
    # torchvision's ImageNet networks (pytorch/vision @ f50e776 torchvision/models/resnet.py:222-231, 246-255,
    # 310-325): RobustBench's ImageNet entries, `torchvision_resnet.py`.
    "torchvision_resnet18": ModelSpec(
        TorchvisionResNet, {"block": "basic", "layers": (2, 2, 2, 2), "width_per_group": 64}, _TORCHVISION_CONTAINERS),
    "torchvision_resnet50": ModelSpec(
        TorchvisionResNet, {"block": "bottleneck", "layers": (3, 4, 6, 3)}, _TORCHVISION_CONTAINERS),
    "torchvision_wide_resnet50_2": ModelSpec(
        TorchvisionResNet, {"block": "bottleneck", "layers": (3, 4, 6, 3), "width_per_group": 128},
        _TORCHVISION_CONTAINERS),
}

_NOT_ARGUMENTS = frozenset({"parent", "name"})


def accepted_arguments(name: str) -> Tuple[str, ...]:
    """Keyword arguments `create(name, ...)` accepts: the module's attributes, less those the name fixes."""
    spec = _spec(name)
    fields = (f.name for f in dataclasses.fields(spec.cls) if f.init)
    return tuple(f for f in fields if f not in _NOT_ARGUMENTS and f not in spec.fixed)


def create(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Builds the registered model `name`; unknown name -> ValueError, unknown argument -> TypeError."""
    spec = _spec(name)
    accepted = accepted_arguments(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"Model {name!r} got unexpected argument(s) {unknown}; it accepts {list(accepted)}")
    return spec.cls(num_classes=num_classes, **spec.fixed, **kwargs)


def count_params(variables_or_params: Mapping) -> int:
    """Number of scalars in the `params` collection (given full variables) or in a params tree.

    Works on arrays and on `jax.eval_shape` results alike, so big models need no memory.
    """
    params = variables_or_params.get("params", variables_or_params)
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def _spec(name: str) -> ModelSpec:
    """The registry entry of `name`, or ValueError listing the known names."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name]
