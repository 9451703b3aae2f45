"""CIFAR-10/100 in CIFAR's own python-pickle layout: an extracted folder or the `.tar.gz`, read without TensorFlow.

Security: the batches are Python pickles, and unpickling an untrusted file can run arbitrary code.
Only place files here that came from CIFAR's site (https://www.cs.toronto.edu/~kriz/, md5 in `CIFAR_SPECS`)
or that you made yourself. As a second line of defence the unpickler below only resolves the few globals
a CIFAR batch needs (numpy arrays and dtypes), so a tampered file fails with `DatasetFormatError` instead
of importing and calling arbitrary functions.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import pickle
import tarfile
from typing import IO, Mapping

import numpy as np

from mmard_jax.errors import DatasetFormatError

CIFAR_URL_BASE = "https://www.cs.toronto.edu/~kriz/"
_ROW_LENGTH = 3 * 32 * 32  # one image as a channel-major row: 1024 red, 1024 green, 1024 blue values


@dataclasses.dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives on disk and on CIFAR's site."""

    name: str
    num_classes: int
    folder: str  # the folder the tarball extracts to
    tarball: str
    md5: str
    label_key: bytes
    files: Mapping[str, tuple[str, ...]]  # split -> batch files inside `folder`

    @property
    def url(self) -> str:
        """Download address of the python-pickle tarball."""
        return CIFAR_URL_BASE + self.tarball


CIFAR_SPECS: Mapping[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="cifar10",
        num_classes=10,
        folder="cifar-10-batches-py",
        tarball="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        label_key=b"labels",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        num_classes=100,
        folder="cifar-100-python",
        tarball="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        label_key=b"fine_labels",
        files={"train": ("train",), "test": ("test",)},
    ),
}

# The only globals a CIFAR batch pickle refers to (protocol 2 from Python 2 or 3, or protocol 5 from numpy 2).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),  # how protocol 2 stores `bytes` written by Python 3
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array/dtype globals, so a batch file cannot call arbitrary code."""

    def __init__(self, file: IO[bytes], where: str):
        super().__init__(file, encoding="bytes")
        self._where = where

    def find_class(self, module: str, name: str):
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise DatasetFormatError(
                f"{self._where}: the pickle refers to {module}.{name}, which a CIFAR batch never does; "
                "refusing to load it (unpickling untrusted files can run arbitrary code)"
            )
        return super().find_class(*target)


def unpickle_batch(file: IO[bytes], where: str) -> dict:
    """Unpickles one CIFAR batch dict (bytes keys, as `pickle.load(f, encoding="bytes")` gives them)."""
    try:
        batch = _CifarUnpickler(file, where).load()
    except DatasetFormatError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise DatasetFormatError(f"{where}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DatasetFormatError(f"{where}: expected a pickled dict, got {type(batch).__name__}")
    return batch


def _get_key(batch: dict, key: bytes, where: str):
    """Looks a key up as bytes (Python 2 pickles) or str (Python 3 pickles); names file and key if missing."""
    for k in (key, key.decode()):
        if k in batch:
            return batch[k]
    found = sorted(repr(k) for k in batch)
    raise DatasetFormatError(f"{where}: missing key {key!r} (keys found: {', '.join(found)})")


def batch_to_arrays(batch: dict, spec: CifarSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validates one batch dict and returns (uint8 NHWC images, int32 labels)."""
    data = np.asarray(_get_key(batch, b"data", where))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_LENGTH:
        raise DatasetFormatError(
            f"{where}: key b'data' is {data.dtype} with shape {data.shape}; expected uint8 with shape "
            f"(N, {_ROW_LENGTH}) (one 3x32x32 channel-major image per row)"
        )
    labels = np.asarray(_get_key(batch, spec.label_key, where))
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(
            f"{where}: key {spec.label_key!r} has shape {labels.shape} ({labels.dtype}); "
            f"expected {data.shape[0]} integer labels, one per row of b'data'"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DatasetFormatError(
            f"{where}: key {spec.label_key!r} has labels in [{labels.min()}, {labels.max()}]; "
            f"expected 0..{spec.num_classes - 1}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> NHWC
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Joins per-batch (images, labels) in file order."""
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_folder(folder: pathlib.Path, spec: CifarSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split from an extracted CIFAR folder (e.g. `cifar-10-batches-py/`)."""
    parts = []
    for filename in spec.files[split]:
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; {folder} should hold {', '.join(spec.files[split])}")
        with open(path, "rb") as f:
            parts.append(batch_to_arrays(unpickle_batch(f, str(path)), spec, str(path)))
    return _concat(parts)


def read_tarball(tarball: pathlib.Path, spec: CifarSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split straight from CIFAR's `.tar.gz` (one pass over the archive, nothing extracted)."""
    wanted = {f"{spec.folder}/{filename}": filename for filename in spec.files[split]}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    found[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetFormatError(f"{tarball}: not a readable .tar.gz ({type(e).__name__}: {e})") from e
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DatasetFormatError(f"{tarball}: missing member(s) {', '.join(missing)}")
    parts = []
    for member_name in wanted:  # file order, not archive order
        where = f"{tarball}:{member_name}"
        parts.append(batch_to_arrays(unpickle_batch(io.BytesIO(found[member_name]), where), spec, where))
    return _concat(parts)
