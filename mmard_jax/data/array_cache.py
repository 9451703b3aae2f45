"""A cache of decoded arrays as one uncompressed `.npz`, tagged with a key of its source and written atomically.

The key (a string the caller derives from the source files) is stored in the file itself, so a cache whose
source changed is simply not used, and the next write replaces it. A write goes to a temporary file in the
same folder and is renamed into place: a reader sees the old cache or the new one, never a partial file.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Mapping, Optional

import numpy as np

from mmard_jax import files

KEY_FIELD = "source_key"


def read_cache(path: os.PathLike, key: str, fields: tuple[str, ...]) -> Optional[dict[str, np.ndarray]]:
    """The cached arrays `fields` if `path` exists and was written for `key`; None otherwise (also if damaged)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            if KEY_FIELD not in cached.files or str(cached[KEY_FIELD]) != key:
                return None
            if any(field not in cached.files for field in fields):
                return None
            return {field: cached[field] for field in fields}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # truncated or foreign file: decode again
        return None


def write_cache(path: os.PathLike, key: str, arrays: Mapping[str, np.ndarray]) -> pathlib.Path:
    """Writes `arrays` and `key` to `path` via a temporary file and a rename; on any failure nothing is left."""
    return files.write_atomic(path, lambda f: np.savez(f, **{KEY_FIELD: np.array(key)}, **arrays), mode="wb",
                              suffix=".part")
