"""SVHN (cropped digits) from the official MATLAB files `train_32x32.mat` / `test_32x32.mat`, read with SciPy.

Each file holds `X`, uint8 [32,32,3,N] (height, width, channel, example), and `y`, [N,1] labels 1..10 where 10
is the digit 0. Labels become 0..9 with `y % 10`, as torchvision's SVHN does
(pytorch/vision@0318698f0775df59b7cec73851dd499243ca1bcd torchvision/datasets/svhn.py lines 66-69) and the
tfds `svhn_cropped` builder (tensorflow-datasets 4.9.10 datasets/svhn_cropped/svhn_cropped_dataset_builder.py
line 110), so label i is digit i. The files sit directly in the data folder, as torchvision's
`SVHN(root=data_dir)` expects them.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping

import numpy as np

from mmard_jax.errors import DatasetFormatError

URL_BASE = "http://ufldl.stanford.edu/housenumbers/"
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
TFDS_NAME = "svhn_cropped"  # the tensorflow-datasets builder of the same files (features 'image', 'label')


@dataclasses.dataclass(frozen=True)
class SvhnFile:
    """One split's official file and its md5."""

    filename: str
    md5: str

    @property
    def url(self) -> str:
        """Download address of the file."""
        return URL_BASE + self.filename


# md5s as torchvision checks them (pytorch/vision@0318698 torchvision/datasets/svhn.py lines 16-19).
FILES: Mapping[str, SvhnFile] = {
    "train": SvhnFile("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": SvhnFile("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
}


def _variable(mat: dict, name: str, path: pathlib.Path, expected: str) -> np.ndarray:
    """One variable of a loaded .mat file; `DatasetFormatError` naming file and variable if it is missing."""
    if name not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetFormatError(f"{path}: missing variable '{name}' ({expected}; variables found: "
                                 f"{', '.join(found) or 'none'})")
    return np.asarray(mat[name])


def arrays_from_mat(mat: dict, path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Validates a loaded SVHN .mat dict and returns (uint8 NHWC images, int32 labels 0..9)."""
    x = _variable(mat, "X", path, "expected uint8 images [32,32,3,N]")
    y = _variable(mat, "y", path, "expected labels [N,1] in 1..10")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != IMAGE_SHAPE:
        raise DatasetFormatError(f"{path}: variable 'X' is {x.dtype} with shape {x.shape}; "
                                 "expected uint8 with shape (32, 32, 3, N)")
    n = x.shape[3]
    if y.shape not in ((n, 1), (n,)) or not np.issubdtype(y.dtype, np.number):
        raise DatasetFormatError(f"{path}: variable 'y' is {y.dtype} with shape {y.shape}; "
                                 f"expected {n} labels with shape ({n}, 1)")
    labels = y.reshape(-1)
    if labels.size and (labels.min() < 1 or labels.max() > 10 or np.any(labels != np.round(labels))):
        raise DatasetFormatError(f"{path}: variable 'y' has labels in [{labels.min()}, {labels.max()}]; "
                                 "expected whole numbers 1..10 (10 is the digit 0)")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))  # [H,W,C,N] -> [N,H,W,C]
    return images, (labels.astype(np.int64) % 10).astype(np.int32)


def read_mat(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one official SVHN .mat file (MATLAB v5, as published) into (uint8 NHWC images, int32 labels)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as e:  # truncated, not MATLAB, or v7.3 (HDF5), which loadmat does not read
        raise DatasetFormatError(f"{path}: not a readable MATLAB v5 file ({type(e).__name__}: {e})") from e
    return arrays_from_mat(mat, path)
