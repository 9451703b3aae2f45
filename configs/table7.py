"""Table 7: MMARD's trade-off alpha in {0, 0.5, 1, 2} (RN-18 student, CIFAR-10, 300 epochs), under a reading of
the paper's unpublished choices (docs/design.md, "MMARD's unpublished choices"):

    --config=configs/table7.py:alpha=0.5                       # our default reading
    --config=configs/table7.py:alpha=0.5,reading=logit_psi     # psi of Eq. 5 on logits (Huber delta not inert)

Readings: `default` (psi on probabilities, batch-mean TRD, class-summed KL), `logit_psi` (trd_use_probs=False),
`class_mean_kl` (KL divided by C, as ARD/RSLAD's torch.mean), `trd_sum` (Eq. 6's sum over the batch, literally).
configs/table7_readings.py runs every alpha under every reading.
"""

from mmard_jax import config_lib

ALPHAS = ("0", "0.5", "1", "2")
READINGS = {
    "default": {},
    "logit_psi": {"trd_use_probs": False},
    "class_mean_kl": {"kl_class_mean": True},
    "trd_sum": {"trd_reduction": "sum"},
}

RUNS = tuple(f"alpha={a}" for a in ALPHAS)
LAYOUT = {"rows": "alpha", "columns": ("clean", "fgsm", "pgd_s", "pgd_t", "cw", "aa")}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, alpha=1.0, reading="default")
    if a["reading"] not in READINGS:
        raise ValueError(f"unknown reading {a['reading']!r}; known: {', '.join(READINGS)}")
    alpha = a["alpha"]
    # At alpha = 0 the TRD term is gone: its readings do not apply (get_method refuses them), the KL one does.
    reading = {k: v for k, v in READINGS[a["reading"]].items() if alpha != 0.0 or k == "kl_class_mean"}
    return config_lib.paper_config("mmard", "resnet18", "cifar10", alpha=alpha, **reading)
