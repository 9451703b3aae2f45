"""Random-access image sources for the streamed pipeline: an image-folder tree and a prepared tfds copy.

A *source* is what grain reads: `len(source)` and `source[i]` -> `{"image": uint8 HWC (3 channels), "label": int}`,
decoded inside `__getitem__` (so in grain's worker processes when read through them), and picklable. Nothing here
holds a split in memory: a source keeps file paths (folder) or an array_record reader (tfds).
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

from mmard_jax.data import tfds_source
from mmard_jax.errors import DatasetNotFoundError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")  # matched case-insensitively: ImageNet's .JPEG, .jpg, .png


def decode_image(path) -> np.ndarray:
    """A file's pixels as uint8 HWC RGB (Pillow; grey, CMYK and palette images converted to RGB)."""
    import PIL.Image

    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class ImageFolder:
    """`root/<class>/<file>` as a source: classes in sorted order (label = rank), files sorted within a class."""

    def __init__(self, root, class_names: Sequence[str], paths: Sequence[str], labels: Sequence[int]):
        self.root = str(root)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self._paths = list(paths)
        self._labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int):
        return {"image": decode_image(self._paths[index]), "label": int(self._labels[index])}

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images, {self.num_classes} classes)"


def image_folder(root) -> ImageFolder:
    """The source of `root/<class>/*.{JPEG,jpg,jpeg,png}`; a DatasetNotFoundError naming `root` if it holds none."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: no such image folder (expected {root}/<class>/<image>.JPEG)")
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(f.name for f in os.scandir(root / name)
                       if f.is_file() and os.path.splitext(f.name)[1].lower() in IMAGE_SUFFIXES)
        paths += [str(root / name / f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise DatasetNotFoundError(f"{root} holds no images in class folders (expected {root}/<class>/<image>.JPEG, "
                                   f"suffixes {', '.join(IMAGE_SUFFIXES)})")
    return ImageFolder(root, class_names, paths, labels)


class TfdsSource:
    """A prepared tfds split read through `tfds.data_source` (array_record, no TensorFlow), as {"image", "label"}."""

    def __init__(self, name: str, split: str, data_dir):
        self.name, self.split, self.data_dir = name, split, str(data_dir)
        self._source = _open_tfds(name, split, self.data_dir)
        label = self._source.dataset_info.features["label"]
        self.num_classes = int(label.num_classes)
        self.class_names = tuple(label.names)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        record = self._source[int(index)]
        image = np.asarray(record["image"], np.uint8)
        if image.shape[-1] == 1:  # grey tfds images (e.g. MNIST-like) as three channels
            image = np.repeat(image, 3, axis=-1)
        return {"image": image, "label": int(record["label"])}

    def __getstate__(self):  # the reader holds open files: a worker process opens its own
        return {"name": self.name, "split": self.split, "data_dir": self.data_dir}

    def __setstate__(self, state):
        self.__init__(state["name"], state["split"], state["data_dir"])

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, {self.data_dir!r}, {len(self)} records)"


def _open_tfds(name: str, split: str, data_dir: str):
    """`tfds.data_source` with downloading off; a DatasetNotFoundError naming the copy it looked for."""
    import tensorflow_datasets as tfds

    why = None if tfds_source.is_prepared(name, pathlib.Path(data_dir)) else "not prepared there"
    if why is None:
        try:
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except (AssertionError, FileNotFoundError, NotImplementedError, ValueError) as err:  # unknown split, format
            why = str(err).splitlines()[0]
    raise DatasetNotFoundError(f"no prepared tensorflow-datasets copy of {name!r} split {split!r} in {data_dir} "
                               f"({why}); prepare it with tfds in the array_record format")


def tfds(name: str, split: str, data_dir) -> TfdsSource:
    """The source of a prepared tfds copy of `name` (e.g. 'imagenet2012', 'imagenet_resized/64x64', 'cifar10')."""
    return TfdsSource(name, split, data_dir)
