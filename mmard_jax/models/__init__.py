"""Model zoo: Flax (linen, NHWC, inputs in [0, 1]) twins of the PyTorch students and RobustBench teachers.

Every model is `module.apply(variables, x, train=False) -> float32 logits`; `train=True` uses batch
statistics and needs `mutable=['batch_stats']`. Variable names mirror the PyTorch state_dict keys
(`mmard_jax/interop/naming.py`), so checkpoints convert by name.
"""

from mmard_jax.models import store
from mmard_jax.models.dm_preact_resnet import DMPreActResNet
from mmard_jax.models.dm_wide_resnet import DMWideResNet
from mmard_jax.models.mobilenet_v2 import MobileNetV2
from mmard_jax.models.registry import MODELS, ModelSpec, accepted_arguments, count_params, create
from mmard_jax.models.resnet import PreActResNet, ResNet
from mmard_jax.models.torchvision_resnet import TorchvisionResNet
from mmard_jax.models.wide_resnet import WideResNet


def load_pretrained(directory, dtype: str = "float32", input_shape=None):
    """(module, variables) of a converted teacher (model directory; a training workdir's best student:
    `mmard_jax.checkpoints.load_model`).

    `module.apply(variables, x, train=False)` on NHWC x in [0, 1] gives the logits (`store.load_model`); the
    variables are built at the input shape model.json records (64x64x3 for a Tiny-ImageNet teacher), or at
    `input_shape` when given, which must then agree with the recorded one.
    """
    return store.load_model(directory, dtype=dtype, input_shape=input_shape)


__all__ = [
    "MODELS",
    "DMPreActResNet",
    "DMWideResNet",
    "MobileNetV2",
    "ModelSpec",
    "PreActResNet",
    "ResNet",
    "TorchvisionResNet",
    "WideResNet",
    "accepted_arguments",
    "count_params",
    "create",
    "load_pretrained",
]
