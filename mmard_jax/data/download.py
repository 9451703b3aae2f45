"""Fetches one file over HTTP(S) into place atomically, verified by md5 (used for CIFAR's python tarballs)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import urllib.request

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
    """Downloads `url` to `dest` via a temp file in the same folder, checks md5, then renames into place.

    A reader never sees a partial file: the rename is atomic on one file system, and on any failure the
    temp file is removed.
    """
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = pathlib.Path(tmp_name)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DownloadError(f"{url}: md5 {digest.hexdigest()} does not match the expected {md5}")
        os.replace(tmp, dest)
    except DownloadError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # network, HTTP or disk errors
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"{url}: download to {dest} failed ({type(e).__name__}: {e})") from e
    return dest
