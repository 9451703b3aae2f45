"""Table 7: MMARD's trade-off alpha in {0, 0.5, 1, 2} (RN-18 student, CIFAR-10, 300 epochs).

    --config=configs/table7.py:alpha=0.5
"""

from mmard_jax import config_lib

ALPHAS = ("0", "0.5", "1", "2")

RUNS = tuple(f"alpha={a}" for a in ALPHAS)
LAYOUT = {"rows": "alpha", "columns": ("clean", "fgsm", "pgd_s", "pgd_t", "cw", "aa")}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, alpha="1")
    return config_lib.paper_config("mmard", "resnet18", "cifar10", alpha=float(a["alpha"]))
