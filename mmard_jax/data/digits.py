"""scikit-learn's bundled 8x8 digits as a tiny 16x16x3 uint8 CIFAR stand-in, with a fixed train/test split.

The data ships inside the scikit-learn wheel (no download), so tests and smoke runs work offline.
Images: values 0..16 scaled to 0..255 (round half up), 2x nearest-neighbour upsampling, grey copied to
3 channels. Split: within each class, in the file's order, every 5th example (positions 4, 9, 14, ...)
is test and the rest train. No random number generator is involved, so the split is the same on every
machine and every library version: 1442 train and 355 test examples, all 10 classes in both.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Optional

import numpy as np

NUM_CLASSES = 10
TEST_EVERY = 5  # every 5th example of each class is test: a stratified ~80/20 split
TRAIN_SIZE = 1442
TEST_SIZE = 355


def digits_images(raw: np.ndarray) -> np.ndarray:
    """Maps [N,8,8] values 0..16 to [N,16,16,3] uint8 0..255 (nearest-neighbour 2x, grey -> RGB)."""
    levels = np.rint(raw).astype(np.int64)  # the bundled data are whole numbers stored as float64
    scaled = ((levels * 255 + 8) // 16).astype(np.uint8)  # 0 -> 0, 8 -> 128, 16 -> 255
    upsampled = scaled.repeat(2, axis=1).repeat(2, axis=2)
    return np.ascontiguousarray(np.repeat(upsampled[..., None], 3, axis=-1))


def is_test_example(labels: np.ndarray) -> np.ndarray:
    """Boolean [N]: True where an example is the 5th, 10th, ... of its class in file order."""
    mask = np.zeros(labels.shape, bool)
    for c in np.unique(labels):
        (where,) = np.nonzero(labels == c)
        mask[where[TEST_EVERY - 1 :: TEST_EVERY]] = True
    return mask


def bundled_file() -> Optional[pathlib.Path]:
    """scikit-learn's digits.csv.gz, found without importing scikit-learn (None if that wheel lays out otherwise)."""
    spec = importlib.util.find_spec("sklearn")  # a top-level spec: nothing is imported
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as scikit-learn's `load_digits()` gives them: ([N,8,8] float64 0..16, int [N] labels).

    Reads the bundled CSV (64 pixel columns, then the label) itself: importing scikit-learn costs 1.1 s of CPU
    in every training process; `load_digits` is the fallback and the tests' reference.
    """
    path = bundled_file()
    if path is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 [N,16,16,3] images, int32 [N] labels) for 'train' or 'test'."""
    images, target = load_raw()
    labels = target.astype(np.int32)
    is_test = is_test_example(labels)
    keep = is_test if split == "test" else ~is_test
    return digits_images(images[keep]), labels[keep]
