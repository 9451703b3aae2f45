"""The evaluation transforms of RobustBench's ImageNet protocol, on decoded uint8 images, as its PyTorch code runs them.

RobustBench evaluates every ImageNet model of the Linf leaderboard on 5000 validation images resized (shorter side)
to 256 and centre-cropped to 224 (RobustBench/robustbench @78fcc9e robustbench/data.py:20-26 PREPROCESSINGS
'Res256Crop224', :146-163 load_imagenet), eps 4/255 (model_info/imagenet/Linf/*.json "eps"). Its transforms run
torchvision on PIL images; the same arithmetic is written here with Pillow (pytorch/vision @b6ca391
torchvision/transforms/functional.py `_compute_resized_output_size`: the longer side int(256 * long / short), the
image unchanged when its shorter side is 256 already; `resize` on a PIL image: `Image.resize` with BILINEAR, the
Resize default; `center_crop`: top/left int(round((size - 224) / 2)), zero padding first where the image is
smaller than the crop). The records are the source protocol's {"image": uint8 HWC, "label": int}.
"""

import functools
from typing import Callable, Dict, Optional

import numpy as np
from PIL import Image


def resize_shorter(image: np.ndarray, size: int, resample=Image.BILINEAR) -> np.ndarray:
    """uint8 HWC resized so that its shorter side is `size` (torchvision `Resize(size)` on a PIL image)."""
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HWC centre crop of size x size (torchvision `CenterCrop(size)`: zero padding first if smaller)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
        bottom, right = max(size - h + 1, 0) // 2, max(size - w + 1, 0) // 2
        image = np.pad(image, ((top, bottom), (left, right), (0, 0)))
        h, w = image.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[top:top + size, left:left + size]


def resize_center_crop(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """torchvision's `Resize(resize)` then `CenterCrop(crop)`: the ImageNet evaluation view at any size."""
    return center_crop(resize_shorter(image, resize), crop)


def res256_crop224(image: np.ndarray) -> np.ndarray:
    """RobustBench's 'Res256Crop224' (data.py:21-26): resize the shorter side to 256, centre crop 224."""
    return resize_center_crop(image, 256, 224)


def imagenet_view(size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The evaluation view of a network trained on random-resized crops of side `size`: the shorter side resized to
    size / 0.875, centre crop `size` (Res256Crop224 at 224). A partial of module functions: picklable for grain."""
    return functools.partial(resize_center_crop, resize=int(round(size / 0.875)), crop=size)


def identity(image: np.ndarray) -> np.ndarray:
    """RobustBench's None preprocessing (ToTensor only): the image as it is (CIFAR-sized sets)."""
    return image


# RobustBench's preprocessing names (data.py:20-45) that this module writes; the others (Crop288, Res224,
# BicubicRes256Crop224) belong to entries the converter does not cover.
PREPROCESSINGS: Dict[Optional[str], Callable[[np.ndarray], np.ndarray]] = {
    "Res256Crop224": res256_crop224,
    None: identity,
}


class RecordTransform:
    """Applies an image transform to a source record: {"image": uint8 HWC, "label": int32}. A picklable class,
    so grain can run it in worker processes."""

    def __init__(self, transform: Callable[[np.ndarray], np.ndarray]):
        self.transform = transform

    def __call__(self, record):
        image = np.asarray(record["image"], np.uint8)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a decoded HxWx3 uint8 image, got shape {image.shape}")
        return {"image": np.ascontiguousarray(self.transform(image)), "label": np.int32(record["label"])}
