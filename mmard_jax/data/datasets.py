"""`load_dataset`: one whole split in memory as uint8 NHWC, from CIFAR pickles, a tfds copy or bundled digits."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from mmard_jax.data import cifar, digits, tfds_source
from mmard_jax.data.download import fetch_file
from mmard_jax.errors import DatasetNotFoundError, DownloadError

DATASETS = ("cifar10", "cifar100", "digits")
SPLITS = ("train", "test")
SOURCES = ("auto", "pickle", "tfds")
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
) -> Dataset:
    """Loads a whole split into memory (uint8 NHWC) so the trainer can put it on the device once.

    name: 'cifar10', 'cifar100' or 'digits'; split: 'train' or 'test'.
    source (CIFAR only): 'pickle' = CIFAR's python batches in `data_dir`, extracted
    (`cifar-10-batches-py/`, `cifar-100-python/`) or the `.tar.gz` as downloaded; 'tfds' = a prepared
    tensorflow-datasets copy in `data_dir` (array_record format); 'auto' = pickle, then tfds, then, if
    `download=True`, fetch CIFAR's python tarball into `data_dir` (md5-checked) and read it.
    data_dir: defaults to `$MMARD_DATA_DIR`, else `~/.cache/mmard_jax/data`.
    'digits' is scikit-learn's bundled set (see `mmard_jax.data.digits`) and needs no files.

    The pickle path unpickles files from `data_dir`; see `mmard_jax.data.cifar` for the risk and the guard.
    Raises ValueError for an unknown name/split/source and `DatasetNotFoundError` when no copy is found.
    """
    _check_choice("name", name, DATASETS)
    _check_choice("split", split, SPLITS)
    _check_choice("source", source, SOURCES)
    if name == "digits":
        if source != "auto" or download:
            raise ValueError("'digits' is bundled with scikit-learn: use source='auto' and download=False")
        images, labels = digits.load_digits_split(split)
        return Dataset(images, labels, digits.NUM_CLASSES, name, split)
    if source == "tfds" and download:
        raise ValueError(
            "download=True fetches CIFAR's python tarball, which source='tfds' does not read; "
            "use source='auto' or 'pickle'"
        )
    spec = cifar.CIFAR_SPECS[name]
    root = pathlib.Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
    images, labels = _read_cifar(spec, split, root, source, download)
    return Dataset(images, labels, spec.num_classes, name, split)


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    """Raises ValueError listing the valid values."""
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _read_cifar(spec: cifar.CifarSpec, split: str, root: pathlib.Path, source: str, download: bool):
    """Tries the sources `source` allows, in order; raises `DatasetNotFoundError` when none has the data."""
    folder, tarball = root / spec.folder, root / spec.tarball
    if source in ("auto", "pickle"):
        if folder.is_dir():
            return cifar.read_folder(folder, spec, split)
        if tarball.is_file():
            return cifar.read_tarball(tarball, spec, split)
    if source == "tfds" or (source == "auto" and tfds_source.is_prepared(spec.name, root)):
        return _read_tfds(spec, split, root)
    if download:
        try:
            fetch_file(spec.url, tarball, spec.md5)
        except DownloadError as e:
            raise DatasetNotFoundError(_not_found_message(spec, split, root, f"Download failed: {e}")) from e
        return cifar.read_tarball(tarball, spec, split)
    raise DatasetNotFoundError(_not_found_message(spec, split, root))


def _read_tfds(spec: cifar.CifarSpec, split: str, root: pathlib.Path):
    """Reads a prepared tfds copy; a missing copy becomes `DatasetNotFoundError` with instructions."""
    try:
        data_source = tfds_source.open_source(spec.name, split, root)
    except Exception as e:  # tfds raises several types for "not prepared" / "wrong file format"
        if not tfds_source.is_prepared(spec.name, root):  # tfds's own message here is misleading: drop it
            raise DatasetNotFoundError(_not_found_message(spec, split, root)) from None
        raise RuntimeError(
            f"{root / spec.name}: a tensorflow-datasets copy exists but cannot be read with tfds.data_source "
            f"({type(e).__name__}: {e}); it must be prepared with file_format='array_record'"
        ) from e
    return tfds_source.read_all(data_source)


def _not_found_message(spec: cifar.CifarSpec, split: str, root: pathlib.Path, reason: str = "") -> str:
    """Says what was looked for, what to download, where to put it, and the tfds alternative."""
    prepare = (
        "import tensorflow_datasets as tfds; "
        f"tfds.builder('{spec.name}', data_dir='{root}').download_and_prepare(file_format='array_record')"
    )
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
        "       pip install tensorflow",
        f'       python -c "{prepare}"',
        f"Set ${DATA_DIR_ENV} or pass data_dir= to use another directory.",
    ]
    return "\n".join(lines)
