"""Tables 3 and 4: every method x {ResNet-18, MobileNetV2} on CIFAR-10 (Table 3) or CIFAR-100 (Table 4).

    --config=configs/table3.py:method=rslad,student=mobilenet_v2,dataset=cifar100

Teachers (Table 2, "Default"): CIFAR-10 WRN-34-10 (Zhang2019Theoretically), CIFAR-100 WRN-70-16
(Gowal2020Uncovering). MTARD also needs a naturally trained WRN-34-10 (config.teacher2).

The baselines train with their own published recipes (the paper keeps "the default settings of the original
papers", section 4.1; config_lib.RECIPES); `recipe=unified` trains every method with MMARD's (300 epochs, cosine).
"""

from mmard_jax import config_lib

METHODS = ("nature", "sat", "trades", "ard", "iad", "rslad", "mtard", "mmard")
STUDENTS = ("resnet18", "mobilenet_v2")
DATASET = "cifar10"


def runs(dataset: str):
    """The table's runs on `dataset`, for scripts/run_table.py."""
    return tuple(f"method={m},student={s},dataset={dataset}" for m in METHODS for s in STUDENTS)


# For scripts/run_table.py: the runs of this table and how their results are laid out.
RUNS = runs(DATASET)
LAYOUT = {"rows": "method", "groups": "student", "columns": ("clean", "fgsm", "pgd_s", "pgd_t", "cw", "aa")}


def get_config(arg=None, dataset=DATASET):
    a = config_lib.parse_arg(arg, method="mmard", student="resnet18", dataset=dataset, recipe="published")
    return config_lib.paper_config(a["method"], a["student"], a["dataset"], recipe=a["recipe"])
