"""The state of the art in one table: AdaAD, AdaIAD, IGDM and PeerAiD beside MMARD, each with its paper's teacher
and its published recipe (config_lib.RECIPES), ResNet-18 on CIFAR-10 first, then MobileNetV2 and CIFAR-100 where
the papers report them.

    python scripts/run_table.py --table=configs/sota.py --workroot=runs/sota
    --config=configs/sota.py:method=adaiad,setting=resnet18_cifar10,plugins=igdm     # IGDM on AdaIAD

Teachers: AdaAD/AdaIAD/IGDM Chen2021LTD WRN-34-20 (CIFAR-10) / WRN-34-10 (CIFAR-100) (AdaAD main.py:206-230;
the IGDM paper follows AdaAD; its CIFAR-10 script also offers `teacher=gowal_wrn28_10`), MMARD the paper's
WRN-34-10 / WRN-70-16; PeerAiD trains its peer from scratch (no teacher).
"""

from mmard_jax import config_lib

METHODS = ("mmard", "adaad", "adaiad", "igdm", "peeraid")
SETTINGS = {"resnet18_cifar10": ("resnet18", "cifar10"), "mobilenet_v2_cifar10": ("mobilenet_v2", "cifar10"),
            "resnet18_cifar100": ("resnet18", "cifar100")}
TEACHER = {("cifar10", m): "ltd_wrn34_20" for m in ("adaad", "adaiad", "igdm")}
TEACHER.update({("cifar100", m): "ltd_wrn34_10" for m in ("adaad", "adaiad", "igdm")})
# PeerAiD reports ResNet-18 and WRN-34-10 students, no MobileNetV2 (PeerAiD README.md:31-65).
REPORTED = {("peeraid", "mobilenet_v2_cifar10")}

RUNS = tuple(f"method={m},setting={s}" for s in SETTINGS for m in METHODS if (m, s) not in REPORTED)
LAYOUT = {"rows": "method", "groups": "setting", "columns": ("clean", "pgd_s", "aa")}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, method="adaad", setting="resnet18_cifar10", plugins=(), teacher="")
    if a["setting"] not in SETTINGS:
        raise ValueError(f"unknown setting {a['setting']!r}; known: {', '.join(SETTINGS)}")
    student, dataset = SETTINGS[a["setting"]]
    teacher = a["teacher"] or TEACHER.get((dataset, a["method"]))
    c = config_lib.base_config(a["method"], student, dataset, teacher, plugins=a["plugins"])
    c = config_lib.apply_recipe(c, a["method"])
    c.eval.final_attacks = ("clean", "fgsm", "pgd_s", "pgd_t", "cw", "aa")
    if "igdm" in c.method.plugins or a["method"] == "igdm":
        c.method.igdm_epochs = float(c.num_epochs)  # the term reaches its full weight at the last epoch
    return c
