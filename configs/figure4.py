"""Figure 4: combinations of inner and outer processes (RN-18 student, CIFAR-10, 300 epochs).

    --config=configs/figure4.py:variant=rslad_inner

A = vanilla MMARD; B (`rslad_inner`) = RSLAD's inner process + MMARD's outer; C (`eq4_outer`) =
MMARD's inner process + Eq. 4 alone as the outer (MMARD with alpha = 0).
"""

from mmard_jax import config_lib

VARIANTS = {"mmard": {}, "rslad_inner": {"inner": "rslad"}, "eq4_outer": {"alpha": 0.0}}

RUNS = tuple(f"variant={v}" for v in VARIANTS)
LAYOUT = {"rows": "variant", "columns": ("clean", "aa")}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, variant="mmard")
    if a["variant"] not in VARIANTS:
        raise ValueError(f"unknown variant {a['variant']!r}; known: {', '.join(VARIANTS)}")
    return config_lib.paper_config("mmard", "resnet18", "cifar10", **VARIANTS[a["variant"]])
