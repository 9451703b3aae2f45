"""Training augmentation on the CPU, one uint8 HWC image at a time (run in grain's workers by the streamed pipeline).

Two recipes: the small sets' zero-pad + random crop + horizontal flip, the same formula as `augment.crop_and_flip`
on the device; and ImageNet's random-resized crop + flip, torchvision's `RandomResizedCrop` with its defaults
(pytorch/vision @1f1a920, torchvision 0.29.1, torchvision/transforms/transforms.py:902-907: scale (0.08, 1), ratio
(3/4, 4/3), bilinear; get_params :929-968), resized with Pillow's bilinear filter (antialiased, as torchvision's PIL
path). Every draw comes from a NumPy Generator the caller keys, so an image's augmentation is a pure function of it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

KINDS = ("pad_crop", "random_resized_crop")
RRC_SCALE = (0.08, 1.0)  # transforms.py:904
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # transforms.py:905
RRC_ATTEMPTS = 10  # transforms.py:945


def pad_crop_params(rng: np.random.Generator, padding: int, flip: bool) -> tuple[np.ndarray, bool]:
    """(crop offset int [2] (row, col) in 0..2*padding, whether to mirror): `augment.crop_flip_params` per image."""
    offset = rng.integers(0, 2 * padding + 1, size=2)
    return offset, bool(flip and rng.random() < 0.5)


def pad_crop_flip(image: np.ndarray, offset, flip: bool, padding: int) -> np.ndarray:
    """Zero-pads each side by `padding`, crops the original size at `offset`, mirrors if `flip` (uint8 in, out)."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    crop = padded[offset[0]: offset[0] + height, offset[1]: offset[1] + width]
    return np.ascontiguousarray(crop[:, ::-1] if flip else crop)


def resized_crop_params(rng: np.random.Generator, height: int, width: int, scale=RRC_SCALE,
                        ratio=RRC_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's RandomResizedCrop.get_params (transforms.py:941-968), NumPy's draws."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(RRC_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # the fallback: a central crop at the nearest allowed aspect ratio (:957-968)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HWC -> uint8 [size, size, C], Pillow's bilinear (antialiased when shrinking)."""
    import PIL.Image

    if image.shape[:2] == (size, size):
        return image
    return np.asarray(PIL.Image.fromarray(image).resize((size, size), PIL.Image.Resampling.BILINEAR))


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The central square (side: the shorter side) resized to `size`: a small set's images at another side. An
    image already size x size is returned as is."""
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return resize(np.ascontiguousarray(image[top: top + side, left: left + side]), size)


@dataclasses.dataclass(frozen=True)
class Augment:
    """One recipe: `kind` (KINDS), the pad-crop's `padding`, `flip`, and the output `size` (0: as stored; pad-crop
    takes the central square resized to it first where the stored size differs). `aug(image, rng)` -> uint8 HWC."""

    kind: str = "pad_crop"
    padding: int = 4
    flip: bool = True
    size: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"augmentation {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.kind == "random_resized_crop" and self.size <= 0:
            raise ValueError("random_resized_crop needs an output size > 0")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "pad_crop":
            if self.size:
                image = center_crop_resize(image, self.size)
            offset, flip = pad_crop_params(rng, self.padding, self.flip)
            return pad_crop_flip(image, offset, flip, self.padding)
        top, left, h, w = resized_crop_params(rng, *image.shape[:2])
        out = resize(np.ascontiguousarray(image[top: top + h, left: left + w]), self.size)
        return np.ascontiguousarray(out[:, ::-1]) if self.flip and rng.random() < 0.5 else out
