"""RobustBench CIFAR-10/100 models whose architecture is exactly one of ours: name -> (arch, classes, kwargs).

Read off `robustbench/model_zoo/cifar10.py` and `cifar100.py` of the published robustbench 1.1.1 wheel (line
numbers below are that wheel's); `tests/test_convert.py` parses the installed files and checks every row, and
that no entry of a supported architecture is missing, so the table cannot drift silently. Entries outside it
wrap an architecture in input normalization, an ensemble or another block type (e.g. `Wong2020Fast`,
`Chen2020Efficient`, RaWideResNet, XCiT) and are not ours.

Rows are keyed (dataset, threat model, name): a name can mean different checkpoints under different threat
models (`Gowal2020Uncovering` is an L2 model on CIFAR-10, an Linf one on CIFAR-100), as in RobustBench.
"""

import difflib
from typing import Any, Dict, Mapping, NamedTuple, Tuple

from mmard_jax.models.dm_wide_resnet import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

DATASETS = ("cifar10", "cifar100")
THREAT_MODELS = ("Linf", "L2", "corruptions")
_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
_CLASSES = {"cifar10": 10, "cifar100": 100}
# The images RobustBench's CIFAR models take (CIFAR's 32x32 RGB): what a converted entry records as its input shape.
INPUT_SHAPES = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}


class ZooEntry(NamedTuple):
    """One RobustBench model as `models.create(arch, num_classes, **kwargs)`."""

    arch: str
    num_classes: int
    kwargs: Mapping[str, Any]


def _wrn(dataset: str, depth: int, width: int) -> ZooEntry:
    """TRADES-layout `WideResNet(depth, widen_factor=width)` (ReLU, no normalization; sub_block1 unused)."""
    return ZooEntry("wide_resnet", _CLASSES[dataset], {"depth": depth, "width": width})


def _dm(dataset: str, depth: int, width: int, activation: str = "swish") -> ZooEntry:
    """DeepMind `DMWideResNet(depth, width, activation_fn=Swish or as named, mean/std of the dataset)`."""
    mean, std = _STATS[dataset]
    kwargs = {"depth": depth, "width": width, "activation": activation, "mean": mean, "std": std}
    return ZooEntry("dm_wide_resnet", _CLASSES[dataset], kwargs)


def _dm_silu(dataset: str, depth: int, width: int) -> ZooEntry:
    """`DMWideResNet(..., activation_fn=nn.SiLU)`: the 2023-24 entries; Swish by another name, same state_dict."""
    return _dm(dataset, depth, width, activation="silu")


def _dm_rn18(dataset: str) -> ZooEntry:
    """DeepMind `DMPreActResNet(depth=18, width=0, activation_fn=Swish, mean/std of the dataset)`."""
    mean, std = _STATS[dataset]
    kwargs = {"depth": 18, "activation": "swish", "mean": mean, "std": std}
    return ZooEntry("dm_preact_resnet", _CLASSES[dataset], kwargs)


def _rn18(dataset: str) -> ZooEntry:
    """`ResNet(BasicBlock, [2, 2, 2, 2])` / `ResNet18()`."""
    return ZooEntry("resnet18", _CLASSES[dataset], {})


def _parn18(dataset: str, **kwargs: bool) -> ZooEntry:
    """`PreActResNet(PreActBlock, [2, 2, 2, 2])`; `PreActBlockV2` is PreActBlock with out_shortcut=True."""
    return ZooEntry("preact_resnet18", _CLASSES[dataset], dict(kwargs))


_C10, _C100 = "cifar10", "cifar100"

ZOO: Dict[Tuple[str, str, str], ZooEntry] = {
    # ---------------------------------------------------------------- CIFAR-10, Linf
    (_C10, "Linf", "Andriushchenko2020Understanding"): _parn18(_C10),
    (_C10, "Linf", "Carmon2019Unlabeled"): _wrn(_C10, 28, 10),
    (_C10, "Linf", "Sehwag2020Hydra"): _wrn(_C10, 28, 10),
    (_C10, "Linf", "Wang2020Improving"): _wrn(_C10, 28, 10),
    (_C10, "Linf", "Zhang2019Theoretically"): _wrn(_C10, 34, 10),  # the paper's CIFAR-10 teacher
    (_C10, "Linf", "Huang2020Self"): _wrn(_C10, 34, 10),
    (_C10, "Linf", "Zhang2019You"): _wrn(_C10, 34, 10),
    (_C10, "Linf", "Zhang2020Attacks"): _wrn(_C10, 34, 10),
    (_C10, "Linf", "Wu2020Adversarial_extra"): _wrn(_C10, 28, 10),
    (_C10, "Linf", "Wu2020Adversarial"): _wrn(_C10, 34, 10),
    (_C10, "Linf", "Gowal2020Uncovering_70_16"): _dm(_C10, 70, 16),
    (_C10, "Linf", "Gowal2020Uncovering_70_16_extra"): _dm(_C10, 70, 16),
    (_C10, "Linf", "Gowal2020Uncovering_34_20"): _dm(_C10, 34, 20),
    (_C10, "Linf", "Gowal2020Uncovering_28_10_extra"): _dm(_C10, 28, 10),
    (_C10, "Linf", "Sehwag2021Proxy"): _wrn(_C10, 34, 10),  # WideResNet(34, 10): depth, num_classes
    (_C10, "Linf", "Sehwag2021Proxy_R18"): _rn18(_C10),
    (_C10, "Linf", "Sitawarin2020Improving"): _wrn(_C10, 34, 10),
    (_C10, "Linf", "Cui2020Learnable_34_20"): _wrn(_C10, 34, 20),  # paper Table 2, WRN-34-20
    (_C10, "Linf", "Cui2020Learnable_34_10"): _wrn(_C10, 34, 10),
    (_C10, "Linf", "Zhang2020Geometry"): _wrn(_C10, 28, 10),
    (_C10, "Linf", "Rebuffi2021Fixing_28_10_cutmix_ddpm"): _dm(_C10, 28, 10),
    (_C10, "Linf", "Rebuffi2021Fixing_106_16_cutmix_ddpm"): _dm(_C10, 106, 16),
    (_C10, "Linf", "Rebuffi2021Fixing_70_16_cutmix_ddpm"): _dm(_C10, 70, 16),
    (_C10, "Linf", "Rebuffi2021Fixing_70_16_cutmix_extra"): _dm(_C10, 70, 16),
    (_C10, "Linf", "Sridhar2021Robust"): _wrn(_C10, 28, 10),
    (_C10, "Linf", "Sridhar2021Robust_34_15"): _wrn(_C10, 34, 15),
    (_C10, "Linf", "Rebuffi2021Fixing_R18_ddpm"): _dm_rn18(_C10),  # cifar10.py:634
    (_C10, "Linf", "Rade2021Helper_R18_extra"): _dm_rn18(_C10),  # cifar10.py:645
    (_C10, "Linf", "Rade2021Helper_R18_ddpm"): _dm_rn18(_C10),  # cifar10.py:656
    (_C10, "Linf", "Rade2021Helper_extra"): _dm(_C10, 34, 10),
    (_C10, "Linf", "Rade2021Helper_ddpm"): _dm(_C10, 28, 10),
    (_C10, "Linf", "Addepalli2021Towards_RN18"): _rn18(_C10),  # paper Table 2, RN-18
    (_C10, "Linf", "Addepalli2021Towards_WRN34"): _wrn(_C10, 34, 10),
    (_C10, "Linf", "Gowal2021Improving_70_16_ddpm_100m"): _dm(_C10, 70, 16),
    (_C10, "Linf", "Gowal2021Improving_28_10_ddpm_100m"): _dm(_C10, 28, 10),
    (_C10, "Linf", "Gowal2021Improving_R18_ddpm_100m"): _dm_rn18(_C10),  # cifar10.py:740
    (_C10, "Linf", "Chen2021LTD_WRN34_10"): _wrn(_C10, 34, 10),
    (_C10, "Linf", "Chen2021LTD_WRN34_20"): _wrn(_C10, 34, 20),
    (_C10, "Linf", "Standard"): _wrn(_C10, 28, 10),
    (_C10, "Linf", "Jia2022LAS-AT_34_10"): _wrn(_C10, 34, 10),
    (_C10, "Linf", "Jia2022LAS-AT_70_16"): _wrn(_C10, 70, 16),  # paper Table 2, WRN-70-16 ReLU (TRADES layout)
    (_C10, "Linf", "Pang2022Robustness_WRN28_10"): _dm(_C10, 28, 10),
    (_C10, "Linf", "Pang2022Robustness_WRN70_16"): _dm(_C10, 70, 16),
    (_C10, "Linf", "Addepalli2022Efficient_RN18"): _rn18(_C10),
    (_C10, "Linf", "Addepalli2022Efficient_WRN_34_10"): _wrn(_C10, 34, 10),
    (_C10, "Linf", "Wang2023Better_WRN-28-10"): _dm_silu(_C10, 28, 10),  # cifar10.py:831
    (_C10, "Linf", "Wang2023Better_WRN-70-16"): _dm_silu(_C10, 70, 16),  # cifar10.py:842
    (_C10, "Linf", "Xu2023Exploring_WRN-28-10"): _dm_silu(_C10, 28, 10),  # cifar10.py:853
    (_C10, "Linf", "Cui2023Decoupled_WRN-28-10"): _dm_silu(_C10, 28, 10),  # cifar10.py:864
    (_C10, "Linf", "Cui2023Decoupled_WRN-34-10"): _wrn(_C10, 34, 10),  # cifar10.py:875
    (_C10, "Linf", "Chen2024Data_WRN_34_10"): _wrn(_C10, 34, 10),  # cifar10.py:898
    (_C10, "Linf", "Chen2024Data_WRN_34_20"): _wrn(_C10, 34, 20),  # cifar10.py:902
    (_C10, "Linf", "Bartoldson2024Adversarial_WRN-94-16"): _dm_silu(_C10, 94, 16),  # cifar10.py:921
    (_C10, "Linf", "Bartoldson2024Adversarial_WRN-82-8"): _dm_silu(_C10, 82, 8),  # cifar10.py:932
    # ---------------------------------------------------------------- CIFAR-10, L2
    (_C10, "L2", "Standard"): _wrn(_C10, 28, 10),
    (_C10, "L2", "Wu2020Adversarial"): _wrn(_C10, 34, 10),
    (_C10, "L2", "Gowal2020Uncovering"): _dm(_C10, 70, 16),
    (_C10, "L2", "Gowal2020Uncovering_extra"): _dm(_C10, 70, 16),
    (_C10, "L2", "Sehwag2021Proxy"): _wrn(_C10, 34, 10),
    (_C10, "L2", "Sehwag2021Proxy_R18"): _rn18(_C10),
    (_C10, "L2", "Rebuffi2021Fixing_70_16_cutmix_ddpm"): _dm(_C10, 70, 16),
    (_C10, "L2", "Rebuffi2021Fixing_28_10_cutmix_ddpm"): _dm(_C10, 28, 10),
    (_C10, "L2", "Rebuffi2021Fixing_70_16_cutmix_extra"): _dm(_C10, 70, 16),
    (_C10, "L2", "Rebuffi2021Fixing_R18_cutmix_ddpm"): _dm_rn18(_C10),  # cifar10.py:1045
    (_C10, "L2", "Rade2021Helper_R18_ddpm"): _dm_rn18(_C10),  # cifar10.py:1056
    (_C10, "L2", "Wang2023Better_WRN-28-10"): _dm_silu(_C10, 28, 10),  # cifar10.py:1067
    (_C10, "L2", "Wang2023Better_WRN-70-16"): _dm_silu(_C10, 70, 16),  # cifar10.py:1078
    # ---------------------------------------------------------------- CIFAR-10, common corruptions
    (_C10, "corruptions", "Rebuffi2021Fixing_70_16_cutmix_extra_Linf"): _dm(_C10, 70, 16),
    (_C10, "corruptions", "Rebuffi2021Fixing_70_16_cutmix_extra_L2"): _dm(_C10, 70, 16),
    (_C10, "corruptions", "Standard"): _wrn(_C10, 28, 10),
    (_C10, "corruptions", "Addepalli2021Towards_WRN34"): _wrn(_C10, 34, 10),
    (_C10, "corruptions", "Addepalli2022Efficient_WRN_34_10"): _wrn(_C10, 34, 10),
    # ---------------------------------------------------------------- CIFAR-100, Linf
    (_C100, "Linf", "Gowal2020Uncovering"): _dm(_C100, 70, 16),  # the paper's CIFAR-100 teacher
    (_C100, "Linf", "Gowal2020Uncovering_extra"): _dm(_C100, 70, 16),
    (_C100, "Linf", "Cui2020Learnable_34_20_LBGAT6"): _wrn(_C100, 34, 20),
    (_C100, "Linf", "Cui2020Learnable_34_10_LBGAT0"): _wrn(_C100, 34, 10),
    (_C100, "Linf", "Cui2020Learnable_34_10_LBGAT6"): _wrn(_C100, 34, 10),
    (_C100, "Linf", "Sehwag2021Proxy"): _wrn(_C100, 34, 10),
    (_C100, "Linf", "Sitawarin2020Improving"): _wrn(_C100, 34, 10),
    (_C100, "Linf", "Rebuffi2021Fixing_70_16_cutmix_ddpm"): _dm(_C100, 70, 16),
    (_C100, "Linf", "Rebuffi2021Fixing_28_10_cutmix_ddpm"): _dm(_C100, 28, 10),
    (_C100, "Linf", "Rebuffi2021Fixing_R18_ddpm"): _dm_rn18(_C100),  # cifar100.py:342
    (_C100, "Linf", "Rade2021Helper_R18_ddpm"): _dm_rn18(_C100),  # cifar100.py:353
    (_C100, "Linf", "Addepalli2021Towards_PARN18"): _parn18(_C100, bn_before_fc=True, out_shortcut=True),
    (_C100, "Linf", "Addepalli2021Towards_WRN34"): _wrn(_C100, 34, 10),
    (_C100, "Linf", "Chen2021LTD_WRN34_10"): _wrn(_C100, 34, 10),
    (_C100, "Linf", "Pang2022Robustness_WRN28_10"): _dm(_C100, 28, 10),
    (_C100, "Linf", "Pang2022Robustness_WRN70_16"): _dm(_C100, 70, 16),
    (_C100, "Linf", "Jia2022LAS-AT_34_10"): _wrn(_C100, 34, 10),
    (_C100, "Linf", "Jia2022LAS-AT_34_20"): _wrn(_C100, 34, 20),
    (_C100, "Linf", "Addepalli2022Efficient_RN18"): _rn18(_C100),
    (_C100, "Linf", "Addepalli2022Efficient_WRN_34_10"): _wrn(_C100, 34, 10),
    (_C100, "Linf", "Cui2020Learnable_34_10_LBGAT9_eps_8_255"): _wrn(_C100, 34, 10),  # cifar100.py:447
    (_C100, "Linf", "Wang2023Better_WRN-28-10"): _dm_silu(_C100, 28, 10),  # cifar100.py:454
    (_C100, "Linf", "Wang2023Better_WRN-70-16"): _dm_silu(_C100, 70, 16),  # cifar100.py:465
    (_C100, "Linf", "Cui2023Decoupled_WRN-28-10"): _dm_silu(_C100, 28, 10),  # cifar100.py:490
    (_C100, "Linf", "Cui2023Decoupled_WRN-34-10"): _wrn(_C100, 34, 10),  # cifar100.py:501
    (_C100, "Linf", "Cui2023Decoupled_WRN-34-10_autoaug"): _wrn(_C100, 34, 10),  # cifar100.py:508
    (_C100, "Linf", "Chen2024Data_WRN_34_10"): _wrn(_C100, 34, 10),  # cifar100.py:521
    # ---------------------------------------------------------------- CIFAR-100, common corruptions
    (_C100, "corruptions", "Gowal2020Uncovering_Linf"): _dm(_C100, 70, 16),
    (_C100, "corruptions", "Gowal2020Uncovering_extra_Linf"): _dm(_C100, 70, 16),
    (_C100, "corruptions", "Addepalli2021Towards_PARN18"): _parn18(_C100, bn_before_fc=True, out_shortcut=True),
    (_C100, "corruptions", "Addepalli2021Towards_WRN34"): _wrn(_C100, 34, 10),
    (_C100, "corruptions", "Addepalli2022Efficient_WRN_34_10"): _wrn(_C100, 34, 10),
}


def names(dataset: str, threat_model: str = "Linf") -> Tuple[str, ...]:
    """The supported RobustBench names of one dataset and threat model, in RobustBench's order."""
    return tuple(n for d, t, n in ZOO if d == dataset and t == threat_model)


def lookup(name: str, dataset: str, threat_model: str = "Linf") -> ZooEntry:
    """The row of a RobustBench model; ValueError saying why not (dataset, threat model, close names)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; RobustBench models here are for {', '.join(DATASETS)}")
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"unknown threat model {threat_model!r}; known: {', '.join(THREAT_MODELS)}")
    key = (dataset, threat_model, name)
    if key in ZOO:
        return ZOO[key]
    elsewhere = [f"{d}/{t}" for d, t, n in ZOO if n == name]
    hint = f" It is listed under {', '.join(elsewhere)} (use --dataset/--threat_model)." if elsewhere else ""
    close = difflib.get_close_matches(name, names(dataset, threat_model), n=5)
    hint += f" Close names: {', '.join(close)}." if close else ""
    raise ValueError(
        f"{name!r} is not a supported RobustBench {dataset} {threat_model} model: either the name is misspelt or "
        f"its architecture is not one we implement (then use --arch/--arch_kwargs/--num_classes).{hint}"
    )
