"""MMARD, ResNet-18 student, CIFAR-10, WRN-34-10 teacher (the paper's main setting).

Any (method, student, dataset) of the paper: `--config=configs/default.py:method=rslad,student=mobilenet_v2,dataset=cifar100`.
"""

from mmard_jax import config_lib


def get_config(arg=None):
    a = config_lib.parse_arg(arg, method="mmard", student="resnet18", dataset="cifar10")
    return config_lib.base_config(a["method"], a["student"], a["dataset"])
