"""`load_dataset`: one whole split in memory as uint8 NHWC, from CIFAR pickles, SVHN's .mat files, Tiny-ImageNet's
zip or folder, a tfds copy, or bundled digits."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional

import numpy as np

from mmard_jax.data import cifar, digits, svhn, tfds_source, tiny_imagenet
from mmard_jax.data.download import fetch_file
from mmard_jax.errors import DatasetNotFoundError, DownloadError, UserError

DATASETS = ("cifar10", "cifar100", "digits", "tiny_imagenet", "svhn")
SPLITS = ("train", "test")
SOURCES = ("auto", "pickle", "mat", "tfds")
# The sources each data set can be read from ('auto' tries them in this order).
DATASET_SOURCES = {
    "cifar10": ("auto", "pickle", "tfds"),
    "cifar100": ("auto", "pickle", "tfds"),
    "digits": ("auto",),
    "tiny_imagenet": ("auto",),
    "svhn": ("auto", "mat", "tfds"),
}
CLASS_ORDERS = tiny_imagenet.CLASS_ORDERS
DATA_DIR_ENV = "MMARD_DATA_DIR"
_DEFAULT_DATA_DIR = "~/.cache/mmard_jax/data"


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split held in memory: uint8 [N,H,W,C] images and int32 [N] labels (arrays are read-only)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    split: str

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N,H,W,C], got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int32 [{self.images.shape[0]}], got {self.labels.dtype} {self.labels.shape}"
            )
        self.images.setflags(write=False)
        self.labels.setflags(write=False)

    def __len__(self) -> int:
        return self.images.shape[0]


def default_data_dir() -> pathlib.Path:
    """`$MMARD_DATA_DIR` if set, else `~/.cache/mmard_jax/data`."""
    return pathlib.Path(os.environ.get(DATA_DIR_ENV) or _DEFAULT_DATA_DIR).expanduser().resolve()


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
    download: bool = False,
    class_order: Optional[str] = None,
) -> Dataset:
    """Loads a whole split into memory (uint8 NHWC) so the trainer can put it on the device once.

    name: one of `DATASETS`; split: 'train' or 'test' (for 'tiny_imagenet' the official val split).
    data_dir: defaults to `$MMARD_DATA_DIR`, else `~/.cache/mmard_jax/data`.
    source: where from ('auto' tries each in turn, then, with `download=True`, fetches the official file into
    `data_dir`, md5-checked, and reads it):
      cifar10/cifar100: 'pickle' = CIFAR's python batches, extracted (`cifar-10-batches-py/`,
        `cifar-100-python/`) or the `.tar.gz` as downloaded; 'tfds' = a prepared tensorflow-datasets copy
        (array_record format). The pickle path unpickles files: see `mmard_jax.data.cifar` for the risk and guard.
      svhn: 'mat' = the official `train_32x32.mat` / `test_32x32.mat`; 'tfds' = a prepared `svhn_cropped` copy.
      tiny_imagenet: 'auto' only: the folder `tiny-imagenet-200/`, else `tiny-imagenet-200.zip` as downloaded;
        decoded once, then read from `<data_dir>/tiny-imagenet-200.<split>.cache.npz` (see `tiny_imagenet`).
      digits: scikit-learn's bundled set (see `mmard_jax.data.digits`); needs no files.
    class_order (tiny_imagenet only): 'sorted' (the default: sorted wnids, torchvision's ImageFolder, what the
      published DM-Improves-AT teacher is distilled with) or 'wnids' (the order of wnids.txt, as PeerAiD reads it).

    Raises UserError (a ValueError) for an unknown name/split/source/class_order, `DatasetNotFoundError` when no
    copy is found and `DatasetFormatError` for a damaged one.
    """
    _check_choice("name", name, DATASETS)
    _check_choice("split", split, SPLITS)
    if name == "digits" and (source != "auto" or download):
        raise UserError("'digits' is bundled with scikit-learn: use source='auto' and download=False")
    if source not in DATASET_SOURCES[name]:
        raise UserError(f"unknown source {source!r} for {name}; valid: {', '.join(DATASET_SOURCES[name])}")
    if class_order is not None and name != "tiny_imagenet":
        raise UserError(f"class_order applies to tiny_imagenet only; {name}'s labels are fixed by its files")
    if name == "digits":
        images, labels = digits.load_digits_split(split)
        return Dataset(images, labels, digits.NUM_CLASSES, name, split)
    if source == "tfds" and download:
        raise UserError(
            f"download=True fetches {name}'s official files, which source='tfds' does not read; "
            f"use source={DATASET_SOURCES[name][1]!r} or 'auto'"
        )
    root = pathlib.Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
    if name == "tiny_imagenet":
        order = tiny_imagenet.DEFAULT_CLASS_ORDER if class_order is None else class_order
        _check_choice("class_order", order, CLASS_ORDERS)
        images, labels = _read_tiny_imagenet(split, root, download, order)
        return Dataset(images, labels, tiny_imagenet.NUM_CLASSES, name, split)
    if name == "svhn":
        images, labels = _read_svhn(split, root, source, download)
        return Dataset(images, labels, svhn.NUM_CLASSES, name, split)
    spec = cifar.CIFAR_SPECS[name]
    images, labels = _read_cifar(spec, split, root, source, download)
    return Dataset(images, labels, spec.num_classes, name, split)


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    """Raises a UserError (a ValueError) listing the valid values."""
    if value not in valid:
        raise UserError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _read_cifar(spec: cifar.CifarSpec, split: str, root: pathlib.Path, source: str, download: bool):
    """Tries the sources `source` allows, in order; raises `DatasetNotFoundError` when none has the data."""
    folder, tarball = root / spec.folder, root / spec.tarball
    if source in ("auto", "pickle"):
        if folder.is_dir():
            return cifar.read_folder(folder, spec, split)
        if tarball.is_file():
            return cifar.read_tarball(tarball, spec, split)
    if source == "tfds" or (source == "auto" and tfds_source.is_prepared(spec.name, root)):
        return _read_tfds(spec.name, split, root, _not_found_message(spec, split, root))
    if download:
        try:
            fetch_file(spec.url, tarball, spec.md5)
        except DownloadError as e:
            raise DatasetNotFoundError(_not_found_message(spec, split, root, f"Download failed: {e}")) from e
        return cifar.read_tarball(tarball, spec, split)
    raise DatasetNotFoundError(_not_found_message(spec, split, root))


def _read_svhn(split: str, root: pathlib.Path, source: str, download: bool):
    """The official .mat file, else a tfds `svhn_cropped` copy, else (download=True) the fetched .mat file."""
    file = svhn.FILES[split]
    path = root / file.filename
    if source in ("auto", "mat") and path.is_file():
        return svhn.read_mat(path)
    if source == "tfds" or (source == "auto" and tfds_source.is_prepared(svhn.TFDS_NAME, root)):
        return _read_tfds(svhn.TFDS_NAME, split, root, _svhn_not_found_message(split, root))
    if download:
        try:
            fetch_file(file.url, path, file.md5)
        except DownloadError as e:
            raise DatasetNotFoundError(_svhn_not_found_message(split, root, f"Download failed: {e}")) from e
        return svhn.read_mat(path)
    raise DatasetNotFoundError(_svhn_not_found_message(split, root))


def _read_tiny_imagenet(split: str, root: pathlib.Path, download: bool, class_order: str):
    """The extracted folder, else the zip, else (download=True) the fetched zip; labels in `class_order`."""
    source = tiny_imagenet.open_source(root)
    if source is None and download:
        try:
            fetch_file(tiny_imagenet.URL, root / tiny_imagenet.ZIP_NAME, tiny_imagenet.MD5)
        except DownloadError as e:
            raise DatasetNotFoundError(_tiny_imagenet_not_found_message(split, root, f"Download failed: {e}")) from e
        source = tiny_imagenet.open_source(root)
    if source is None:
        raise DatasetNotFoundError(_tiny_imagenet_not_found_message(split, root))
    try:
        images, wnid_index, wnids = tiny_imagenet.read_split(source, split, root)
    finally:
        source.close()
    return images, tiny_imagenet.labels_for(wnid_index, wnids, class_order)


def _read_tfds(tfds_name: str, split: str, root: pathlib.Path, not_found_message: str):
    """Reads a prepared tfds copy; a missing copy becomes `DatasetNotFoundError(not_found_message)`."""
    try:
        data_source = tfds_source.open_source(tfds_name, split, root)
    except Exception as e:  # tfds raises several types for "not prepared" / "wrong file format"
        if not tfds_source.is_prepared(tfds_name, root):  # tfds's own message here is misleading: drop it
            raise DatasetNotFoundError(not_found_message) from None
        raise RuntimeError(
            f"{root / tfds_name}: a tensorflow-datasets copy exists but cannot be read with tfds.data_source "
            f"({type(e).__name__}: {e}); it must be prepared with file_format='array_record'"
        ) from e
    return tfds_source.read_all(data_source)


def _tfds_prepare_lines(tfds_name: str, root: pathlib.Path) -> list[str]:
    """The two lines that prepare a tfds copy of `tfds_name` in `root` (the only step that needs TensorFlow)."""
    prepare = (
        "import tensorflow_datasets as tfds; "
        f"tfds.builder('{tfds_name}', data_dir='{root}').download_and_prepare(file_format='array_record')"
    )
    return ["       pip install tensorflow", f'       python -c "{prepare}"']


def _not_found_message(spec: cifar.CifarSpec, split: str, root: pathlib.Path, reason: str = "") -> str:
    """Says what was looked for, what to download, where to put it, and the tfds alternative."""
    lines = [
        f"{spec.name} ({split}) was not found in {root}." + (f" {reason}" if reason else ""),
        "Looked for:",
        f"  {root / spec.folder}/  (CIFAR's python batches, extracted)",
        f"  {root / spec.tarball}  (the same, as downloaded)",
        f"  {root / spec.name}/<version>/  (a tensorflow-datasets copy in array_record format)",
        "Fix it with one of:",
        f"  1. download {spec.url} (md5 {spec.md5}) and save it as {root / spec.tarball}",
        "     (extracting it is optional), or call load_dataset(..., download=True) to do exactly that;",
        "  2. prepare a tensorflow-datasets copy once (only this step needs TensorFlow):",
        *_tfds_prepare_lines(spec.name, root),
        f"Set ${DATA_DIR_ENV} or pass data_dir= to use another directory.",
    ]
    return "\n".join(lines)


def _svhn_not_found_message(split: str, root: pathlib.Path, reason: str = "") -> str:
    """The same for SVHN: the official .mat file of the split, or a tfds `svhn_cropped` copy."""
    file = svhn.FILES[split]
    lines = [
        f"svhn ({split}) was not found in {root}." + (f" {reason}" if reason else ""),
        "Looked for:",
        f"  {root / file.filename}  (SVHN's cropped digits, the official MATLAB file)",
        f"  {root / svhn.TFDS_NAME}/<version>/  (a tensorflow-datasets copy in array_record format)",
        "Fix it with one of:",
        f"  1. download {file.url} (md5 {file.md5}) and save it as {root / file.filename},",
        "     or call load_dataset(..., download=True) to do exactly that;",
        "  2. prepare a tensorflow-datasets copy once (only this step needs TensorFlow; it also fetches",
        "     the 1.3 GB extra_32x32.mat):",
        *_tfds_prepare_lines(svhn.TFDS_NAME, root),
        f"Set ${DATA_DIR_ENV} or pass data_dir= to use another directory.",
    ]
    return "\n".join(lines)


def _tiny_imagenet_not_found_message(split: str, root: pathlib.Path, reason: str = "") -> str:
    """The same for Tiny-ImageNet: the official zip, as downloaded or extracted."""
    lines = [
        f"tiny_imagenet ({split}) was not found in {root}." + (f" {reason}" if reason else ""),
        "Looked for:",
        f"  {root / tiny_imagenet.FOLDER}/  (Tiny-ImageNet-200, the official zip extracted)",
        f"  {root / tiny_imagenet.ZIP_NAME}  (the same, as downloaded)",
        "Fix it with:",
        f"  download {tiny_imagenet.URL} (md5 {tiny_imagenet.MD5}) and save it as {root / tiny_imagenet.ZIP_NAME}",
        "  (extracting it is optional), or call load_dataset(..., download=True) to do exactly that.",
        f"The first load decodes the JPEGs once and caches them as {root / tiny_imagenet.FOLDER}.<split>.cache.npz.",
        f"Set ${DATA_DIR_ENV} or pass data_dir= to use another directory.",
    ]
    return "\n".join(lines)
