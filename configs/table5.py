"""Table 5: ARD, RSLAD and MMARD with teachers of growing capacity (RN-18 student, CIFAR-10, 50 epochs).

    --config=configs/table5.py:method=mmard,teacher=wrn70_16

Teachers (Table 2, "Other"): rn18 = Addepalli2021Towards_RN18, wrn34_10 = Zhang2019Theoretically,
wrn34_20 = Cui2020Learnable_34_20, wrn70_16 = Jia2022LAS-AT_70_16.
"""

from mmard_jax import config_lib

METHODS = ("ard", "rslad", "mmard")
TEACHERS = ("rn18", "wrn34_10", "wrn34_20", "wrn70_16")

RUNS = tuple(f"method={m},teacher={t}" for m in METHODS for t in TEACHERS)
LAYOUT = {"rows": "method", "groups": "teacher", "columns": ("clean", "aa"), "metric_major": True, "average": True}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, method="mmard", teacher="wrn34_10")
    c = config_lib.paper_config(a["method"], "resnet18", "cifar10", teacher=a["teacher"])
    c.num_epochs = 50
    return c
