"""RobustBench models whose architecture is exactly one of ours: (dataset, threat model, name) -> (arch, classes,
kwargs[, input shape]).

Read off `robustbench/model_zoo/cifar10.py`, `cifar100.py` and `imagenet.py` of the published robustbench 1.1.1
wheel (line numbers below are that wheel's: RobustBench/robustbench @ f4e1cdd for the CIFAR files, @ 5ff2500 for
imagenet.py); `tests/test_convert.py` parses the installed files and checks every row, and that no entry of a
supported architecture is missing, so the table cannot drift silently. Entries outside it are ensembles, other
block types or other networks (e.g. `Chen2020Adversarial`, RaWideResNet, XCiT, Swin, ConvNeXt) and are not ours.

The normalised CIFAR entries are RobustBench subclasses of a supported network whose `forward` standardises the
input first; their rows carry the statistics of the subclass (`mean`/`std`, or `per_image_standardize`). Their
checkpoints may also hold the statistics as buffers (`mu`/`sigma`): the converter then takes the file's values, as
RobustBench's `load_state_dict` does (`Modas2021PRIMEResNet18` ships its own, cifar10.py:394-396). The ImageNet entries
are torchvision's ResNets, all but `Chen2024Data_WRN_50_2` inside `normalize_model` with ImageNet's statistics.

Rows are keyed (dataset, threat model, name): a name can mean different checkpoints under different threat
models (`Gowal2020Uncovering` is an L2 model on CIFAR-10, an Linf one on CIFAR-100), as in RobustBench.
"""

import difflib
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

from mmard_jax.models.dm_wide_resnet import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions")
_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
# The images RobustBench's models take: CIFAR's 32x32 RGB, and ImageNet's 224x224 crops (`Res256Crop224`,
# imagenet.py:30 and others): what a converted entry records as its input shape unless its row says otherwise.
INPUT_SHAPES = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "imagenet": (224, 224, 3)}

# ImageNet's statistics of RobustBench's `normalize_model` wrappers: imagenet.py:16-17.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The statistics RobustBench's normalised CIFAR subclasses register (robustbench 1.1.1 model_zoo/cifar10.py,
# cifar100.py; lines per constant).
C10_RICE = (CIFAR10_MEAN, CIFAR10_STD)  # cifar10.py:79,82 (also 143,146; 224,227; 260,263; 278,281)
C10_ENGSTROM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # cifar10.py:96,99
C10_AUGUSTIN = ((0.4913997551666284, 0.48215855929893703, 0.4465309133731618),
                (0.24703225141799082, 0.24348516474564, 0.26158783926049628))  # cifar10.py:179-186, 202-209
C10_RONY = ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))  # cifar10.py:242,245
C100_CHEN = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))  # cifar100.py:30,33
C100_WU = ((0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
           (0.2673342858792401, 0.2564384629170883, 0.27615047132568404))  # cifar100.py:48-56 (and 71-79)
# 0.5 / 0.5: `Hendrycks2020AugMixWRNNet` (cifar10.py:51-52, cifar100.py:122-123), the default `Modas2021PRIME`
# replaces from its file (cifar10.py:393-396), and `Hendrycks2019UsingNet`'s `2. * x - 1.` (cifar10.py:67).
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class ZooEntry(NamedTuple):
    """One RobustBench model as `models.create(arch, num_classes, **kwargs)`, taking `input_shape` images (None:
    the data set's, `INPUT_SHAPES`)."""

    arch: str
    num_classes: int
    kwargs: Mapping[str, Any]
    input_shape: Optional[Tuple[int, int, int]] = None


def _normalized(entry: ZooEntry, stats: Tuple[Tuple[float, ...], Tuple[float, ...]]) -> ZooEntry:
    """`entry` inside RobustBench's `(x - mu) / sigma` wrapper."""
    return entry._replace(kwargs={**entry.kwargs, "mean": stats[0], "std": stats[1]})


def _per_image(entry: ZooEntry) -> ZooEntry:
    """`entry` inside `Ding2020MMANet`'s per-image standardisation (cifar10.py:163-169)."""
    return entry._replace(kwargs={**entry.kwargs, "per_image_standardize": True})


def _rn50(dataset: str) -> ZooEntry:
    """RobustBench's CIFAR `ResNet(Bottleneck, [3, 4, 6, 3])`."""
    return ZooEntry("resnet50", _CLASSES[dataset], {})


def _tv(arch: str, normalized: bool = True, **kwargs: Any) -> ZooEntry:
    """torchvision's `resnet18`/`resnet50`/`wide_resnet50_2(**kwargs)`, inside `normalize_model(.., mu, sigma)`
    with ImageNet's statistics when `normalized`."""
    stats = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD} if normalized else {}
    return ZooEntry(f"torchvision_{arch}", _CLASSES["imagenet"], {**kwargs, **stats})


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


_C10, _C100, _IN = "cifar10", "cifar100", "imagenet"

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
    # Normalised subclasses (class lines; the table rows at cifar10.py:427-470, 556-558).
    (_C10, "Linf", "Hendrycks2019Using"): _normalized(_wrn(_C10, 28, 10), HALF),  # 2x - 1: cifar10.py:59-68
    (_C10, "Linf", "Rice2020Overfitting"): _normalized(_wrn(_C10, 34, 20), C10_RICE),  # cifar10.py:71-86
    (_C10, "Linf", "Engstrom2019Robustness"): _normalized(_rn50(_C10), C10_ENGSTROM),  # cifar10.py:89-103
    (_C10, "Linf", "Wong2020Fast"): _normalized(_parn18(_C10), C10_RICE),  # cifar10.py:137-150
    (_C10, "Linf", "Ding2020MMA"): _per_image(_wrn(_C10, 28, 4)),  # cifar10.py:153-169
    (_C10, "Linf", "Chen2020Efficient"): _normalized(_wrn(_C10, 34, 10), C10_RICE),  # cifar10.py:270-285
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
    (_C10, "L2", "Augustin2020Adversarial"): _normalized(_rn50(_C10), C10_AUGUSTIN),  # cifar10.py:172-190
    (_C10, "L2", "Engstrom2019Robustness"): _normalized(_rn50(_C10), C10_ENGSTROM),  # cifar10.py:89-103
    (_C10, "L2", "Rice2020Overfitting"): _normalized(  # PreActBlockV2, bn_before_fc: cifar10.py:216-231
        _parn18(_C10, bn_before_fc=True, out_shortcut=True), C10_RICE),
    (_C10, "L2", "Rony2019Decoupling"): _normalized(_wrn(_C10, 28, 10), C10_RONY),  # cifar10.py:234-249
    (_C10, "L2", "Ding2020MMA"): _per_image(_wrn(_C10, 28, 4)),  # cifar10.py:153-169
    (_C10, "L2", "Augustin2020Adversarial_34_10"): _normalized(_wrn(_C10, 34, 10), C10_AUGUSTIN),  # :193-213
    (_C10, "L2", "Augustin2020Adversarial_34_10_extra"): _normalized(_wrn(_C10, 34, 10), C10_AUGUSTIN),
    # ---------------------------------------------------------------- CIFAR-10, common corruptions
    (_C10, "corruptions", "Rebuffi2021Fixing_70_16_cutmix_extra_Linf"): _dm(_C10, 70, 16),
    (_C10, "corruptions", "Rebuffi2021Fixing_70_16_cutmix_extra_L2"): _dm(_C10, 70, 16),
    (_C10, "corruptions", "Standard"): _wrn(_C10, 28, 10),
    (_C10, "corruptions", "Addepalli2021Towards_WRN34"): _wrn(_C10, 34, 10),
    (_C10, "corruptions", "Addepalli2022Efficient_WRN_34_10"): _wrn(_C10, 34, 10),
    (_C10, "corruptions", "Hendrycks2020AugMix_WRN"): _normalized(_wrn(_C10, 40, 2), HALF),  # cifar10.py:45-56
    # `Kireev2021EffectivenessNet`: PreActBlockV2, bn_before_fc, CIFAR-10 statistics (cifar10.py:252-267).
    (_C10, "corruptions", "Kireev2021Effectiveness_Gauss50percent"): _normalized(
        _parn18(_C10, bn_before_fc=True, out_shortcut=True), C10_RICE),
    (_C10, "corruptions", "Kireev2021Effectiveness_AugMixNoJSD"): _normalized(
        _parn18(_C10, bn_before_fc=True, out_shortcut=True), C10_RICE),
    (_C10, "corruptions", "Kireev2021Effectiveness_RLAT"): _normalized(
        _parn18(_C10, bn_before_fc=True, out_shortcut=True), C10_RICE),
    (_C10, "corruptions", "Kireev2021Effectiveness_RLATAugMixNoJSD"): _normalized(
        _parn18(_C10, bn_before_fc=True, out_shortcut=True), C10_RICE),
    (_C10, "corruptions", "Kireev2021Effectiveness_RLATAugMix"): _normalized(
        _parn18(_C10, bn_before_fc=True, out_shortcut=True), C10_RICE),
    (_C10, "corruptions", "Modas2021PRIMEResNet18"): _normalized(_rn18(_C10), HALF),  # cifar10.py:389-400
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
    (_C100, "Linf", "Chen2020Efficient"): _normalized(_wrn(_C100, 34, 10), C100_CHEN),  # cifar100.py:21-37
    (_C100, "Linf", "Wu2020Adversarial"): _normalized(_wrn(_C100, 34, 10), C100_WU),  # cifar100.py:40-60
    (_C100, "Linf", "Hendrycks2019Using"): _normalized(_wrn(_C100, 28, 10), HALF),  # 2x - 1: cifar100.py:86-96
    (_C100, "Linf", "Rice2020Overfitting"): _normalized(  # cifar100.py:63-83
        _parn18(_C100, bn_before_fc=True, out_shortcut=True), C100_WU),
    # ---------------------------------------------------------------- CIFAR-100, common corruptions
    (_C100, "corruptions", "Gowal2020Uncovering_Linf"): _dm(_C100, 70, 16),
    (_C100, "corruptions", "Gowal2020Uncovering_extra_Linf"): _dm(_C100, 70, 16),
    (_C100, "corruptions", "Addepalli2021Towards_PARN18"): _parn18(_C100, bn_before_fc=True, out_shortcut=True),
    (_C100, "corruptions", "Addepalli2021Towards_WRN34"): _wrn(_C100, 34, 10),
    (_C100, "corruptions", "Addepalli2022Efficient_WRN_34_10"): _wrn(_C100, 34, 10),
    (_C100, "corruptions", "Hendrycks2020AugMix_WRN"): _normalized(_wrn(_C100, 40, 2), HALF),  # cifar100.py:115-127
    (_C100, "corruptions", "Modas2021PRIMEResNet18"): _normalized(_rn18(_C100), HALF),  # cifar100.py:233-243
    # ---------------------------------------------------------------- ImageNet, Linf (imagenet.py:20-189)
    # Wong2020Fast is evaluated on 288x288 crops (`'preprocessing': 'Crop288'`, imagenet.py:22-25).
    (_IN, "Linf", "Wong2020Fast"): _tv("resnet50")._replace(input_shape=(288, 288, 3)),  # imagenet.py:22
    (_IN, "Linf", "Engstrom2019Robustness"): _tv("resnet50"),  # imagenet.py:27
    (_IN, "Linf", "Salman2020Do_R50"): _tv("resnet50"),  # imagenet.py:32
    (_IN, "Linf", "Salman2020Do_R18"): _tv("resnet18"),  # imagenet.py:37
    (_IN, "Linf", "Salman2020Do_50_2"): _tv("wide_resnet50_2"),  # imagenet.py:42
    # torchvision's own weights (`resnet50(pretrained=True)`, imagenet.py:47-48: IMAGENET1K_V1).
    (_IN, "Linf", "Standard_R50"): _tv("resnet50"),
    # `pt_models.resnet50(width_per_group=64 * 2)`, no normalize_model (imagenet.py:136-140).
    (_IN, "Linf", "Chen2024Data_WRN_50_2"): _tv("resnet50", normalized=False, width_per_group=128),
    # ---------------------------------------------------------------- ImageNet, corruptions (imagenet.py:191-256)
    (_IN, "corruptions", "Erichson2022NoisyMix"): _tv("resnet50"),  # imagenet.py:193
    (_IN, "corruptions", "Erichson2022NoisyMix_new"): _tv("resnet50"),  # imagenet.py:198
    (_IN, "corruptions", "Geirhos2018_SIN"): _tv("resnet50"),  # imagenet.py:203
    (_IN, "corruptions", "Geirhos2018_SIN_IN"): _tv("resnet50"),  # imagenet.py:208
    (_IN, "corruptions", "Geirhos2018_SIN_IN_IN"): _tv("resnet50"),  # imagenet.py:213
    (_IN, "corruptions", "Hendrycks2020Many"): _tv("resnet50"),  # imagenet.py:218
    (_IN, "corruptions", "Hendrycks2020AugMix"): _tv("resnet50"),  # imagenet.py:223
    (_IN, "corruptions", "Salman2020Do_50_2_Linf"): _tv("wide_resnet50_2"),  # imagenet.py:228
    (_IN, "corruptions", "Standard_R50"): _tv("resnet50"),  # imagenet.py:233
}


def names(dataset: str, threat_model: str = "Linf") -> Tuple[str, ...]:
    """The supported RobustBench names of one dataset and threat model, in RobustBench's order."""
    return tuple(n for d, t, n in ZOO if d == dataset and t == threat_model)


def input_shape(name: str, dataset: str, threat_model: str = "Linf") -> Tuple[int, int, int]:
    """The (H, W, C) images a RobustBench model takes: its row's, else its data set's."""
    return lookup(name, dataset, threat_model).input_shape or INPUT_SHAPES[dataset]


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
