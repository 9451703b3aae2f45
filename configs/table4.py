"""Table 4: Table 3's runs on CIFAR-100 (WRN-70-16 teacher, Gowal2020Uncovering).

    --config=configs/table4.py:method=mmard,student=mobilenet_v2
"""

from mmard_jax import config_lib

METHODS = ("nature", "sat", "trades", "ard", "iad", "rslad", "mtard", "mmard")
STUDENTS = ("resnet18", "mobilenet_v2")
DATASET = "cifar100"

RUNS = tuple(f"method={m},student={s},dataset={DATASET}" for m in METHODS for s in STUDENTS)
LAYOUT = {"rows": "method", "groups": "student", "columns": ("clean", "fgsm", "pgd_s", "pgd_t", "cw", "aa")}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, method="mmard", student="resnet18", dataset=DATASET)
    return config_lib.paper_config(a["method"], a["student"], a["dataset"])
