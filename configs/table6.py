"""Table 6: ARD, IAD and RSLAD's outer objectives with MMARD's inner maximization (Eq. 3).

    --config=configs/table6.py:outer=iad
"""

from mmard_jax import config_lib

OUTERS = ("ard", "iad", "rslad")

RUNS = tuple(f"outer={o}" for o in OUTERS)
LAYOUT = {"rows": "outer", "columns": ("clean", "fgsm", "aa")}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, outer="ard")
    return config_lib.paper_config(a["outer"], "resnet18", "cifar10", inner="mmard")
