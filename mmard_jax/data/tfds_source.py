"""CIFAR from a prepared tensorflow-datasets copy, read with `tfds.data_source` (array_record; no TensorFlow)."""

from __future__ import annotations

import pathlib

import numpy as np

_CHUNK = 2048  # records per `__getitems__` call: batched reads, bounded temporary memory


def is_prepared(name: str, data_dir: pathlib.Path) -> bool:
    """Whether `data_dir` holds a prepared tfds copy of `name` (checked without downloading anything)."""
    if not (data_dir / name).is_dir():  # cheap answer for the common case, and no tfds import or log noise
        return False
    import tensorflow_datasets as tfds  # deferred: only the tfds path pays for the import

    return tfds.builder(name, data_dir=str(data_dir)).is_prepared()


def open_source(name: str, split: str, data_dir: pathlib.Path):
    """`tfds.data_source` with downloading off, so a missing copy never triggers a (TensorFlow-only) build."""
    import tensorflow_datasets as tfds

    return tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)


def read_all(source) -> tuple[np.ndarray, np.ndarray]:
    """Reads every record of a data source into (uint8 NHWC images, int32 labels), in the source's order."""
    n = len(source)
    if n == 0:
        raise ValueError(f"{source!r} has no records")
    first = source[0]
    images = np.empty((n, *np.shape(first["image"])), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _CHUNK):
        keys = list(range(start, min(start + _CHUNK, n)))
        for i, record in zip(keys, source.__getitems__(keys)):
            images[i] = record["image"]
            labels[i] = record["label"]
    return images, labels
