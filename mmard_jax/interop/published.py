"""Teachers published outside RobustBench, converted by the name of their file (`--published=NAME`).

The Tiny-ImageNet and SVHN teachers of the 2024-2026 ARD papers (SAAD loads both: HongsinLee/saad @ 295121c,
utils.py:207-228) are DM-Improves-AT's WRN-28-10 Swish models (wzekai99/DM-Improves-AT @ b390f25, README.md:103-104,
`tiny_linf_wrn28-10.pt`, `svhn_linf_wrn28-10.pt`). Their files are read as published: a dict whose
`model_state_dict` (the weight-averaged model; `unaveraged_model_state_dict` beside it is not used, as its own
evaluation does: eval-aa.py:82-86) is the state_dict of `DataParallel(Sequential(net))`
(core/models/__init__.py:57-62 with `--normalize` False, core/utils/parser.py:31; saved by
gowal21uncovering/utils/watrain.py:197-204), so every key reads `module.0.<name in net>`.
"""

import difflib
from typing import Any, Dict, Mapping, NamedTuple, Tuple

from mmard_jax.models.dm_wide_resnet import SVHN_MEAN, SVHN_STD, TINY_MEAN, TINY_STD

_HUB = "https://huggingface.co/wzekai99/DM-Improves-AT1/resolve/main/checkpoint"  # README.md:103-104


class PublishedTeacher(NamedTuple):
    """A published checkpoint as `models.create(arch, num_classes, **kwargs)` at `input_shape` (H, W, C)."""

    arch: str
    num_classes: int
    kwargs: Mapping[str, Any]
    input_shape: Tuple[int, int, int]
    dataset: str  # the mmard_jax data set it was trained on (the image size and classes come from it)
    threat_model: str
    url: str
    defined_in: str  # the published file that defines its module


# `wrn-28-10-swish` (core/models/__init__.py:19) is depth 28, width 10, activation 'swish' = nn.SiLU
# (ti_wideresnetwithswish.py:21-24, 186-192; wideresnetwithswish.py:19-22, 185-196): 'silu' here.
_WRN_28_10_SILU = {"depth": 28, "width": 10, "activation": "silu"}

PUBLISHED: Dict[str, PublishedTeacher] = {
    # Tiny-ImageNet (200 classes, data/tiny_imagenet.py:15-21; 64x64 crops, data/tiny_imagenet.py:135): the class
    # of ti_wideresnetwithswish.py, picked for 'tiny-imagenet(s)' data (core/models/__init__.py:33-35), with its
    # default Tiny-ImageNet mean/std (lines 117-118) and adaptive average pooling (lines 143, 169).
    "tiny_linf_wrn28-10": PublishedTeacher(
        "dm_wide_resnet", 200, {**_WRN_28_10_SILU, "mean": TINY_MEAN, "std": TINY_STD, "adaptive_pool": True},
        (64, 64, 3), "tiny_imagenet", "Linf", f"{_HUB}/tiny_linf_wrn28-10.pt",
        "core/models/ti_wideresnetwithswish.py"),
    # SVHN (10 classes, data/svhn.py:7-13; torchvision's 32x32 SVHN, data/svhn.py:28-29): the class of
    # wideresnetwithswish.py (core/models/__init__.py:49-50) with the SVHN mean/std it picks for any data set
    # named '*svhn*' (wideresnetwithswish.py:194-196) and `F.avg_pool2d(out, 8)` (line 166), the global mean
    # of the 8x8 map at 32x32.
    "svhn_linf_wrn28-10": PublishedTeacher(
        "dm_wide_resnet", 10, {**_WRN_28_10_SILU, "mean": SVHN_MEAN, "std": SVHN_STD},
        (32, 32, 3), "svhn", "Linf", f"{_HUB}/svhn_linf_wrn28-10.pt", "core/models/wideresnetwithswish.py"),
}


def lookup(name: str) -> PublishedTeacher:
    """The row of a published teacher by its file name (with or without `.pt`); ValueError listing the names."""
    key = name[:-3] if name.endswith(".pt") else name
    if key in PUBLISHED:
        return PUBLISHED[key]
    close = difflib.get_close_matches(key, PUBLISHED, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"{name!r} is not a published teacher this converter knows; known: "
                     f"{', '.join(PUBLISHED)}.{hint}")
