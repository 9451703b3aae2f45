"""Fetches one file over HTTP(S) into place atomically, verified by md5 (used for CIFAR's python tarballs)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import urllib.request

from mmard_jax import files
from mmard_jax.errors import DownloadError

_CHUNK = 1 << 20


def md5sum(path: os.PathLike) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_file(url: str, dest: os.PathLike, md5: str, *, timeout_s: float = 60.0) -> pathlib.Path:
    """Downloads `url` to `dest` through `files.write_atomic` (a reader never sees a partial file; on any failure,
    a wrong md5 included, nothing is left behind)."""
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def write(out) -> None:
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DownloadError(f"{url}: md5 {digest.hexdigest()} does not match the expected {md5}")

    try:
        files.write_atomic(dest, write, mode="wb", suffix=".part")
    except DownloadError:
        raise
    except Exception as e:  # network, HTTP or disk errors
        raise DownloadError(f"{url}: download to {dest} failed ({type(e).__name__}: {e})") from e
    return dest
