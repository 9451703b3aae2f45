"""MMARD, ResNet-18 student, CIFAR-10, WRN-34-10 teacher (the paper's main setting).

Any (method, student, dataset) of the paper:
`--config=configs/default.py:method=rslad,student=mobilenet_v2,dataset=cifar100`;
`norm=L2` trains and evaluates under the L2 threat model (config_lib.threat_model), e.g. from RobustBench's L2 teachers.
"""

from mmard_jax import config_lib


def get_config(arg=None):
    a = config_lib.parse_arg(arg, method="mmard", student="resnet18", dataset="cifar10", norm="Linf")
    return config_lib.threat_model(config_lib.base_config(a["method"], a["student"], a["dataset"]), a["norm"])
