"""Tiny-ImageNet-200 in its original layout, from `tiny-imagenet-200.zip` as downloaded or its extracted folder.

Layout (http://cs231n.stanford.edu/tiny-imagenet-200.zip, everything under `tiny-imagenet-200/`): `wnids.txt`
(the 200 WordNet ids, one a line), `train/<wnid>/images/*.JPEG` (500 per class) and `val/images/*.JPEG` with
`val/val_annotations.txt` (`file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1` a line, 10,000 lines). The `test/` folder
has no labels and is not read: the `test` split here is the official val split, as in every ARD paper.

Example order: train as torchvision's ImageFolder lists it (classes by sorted wnid, files by sorted name), test
in the order of `val_annotations.txt`; neither depends on the class order, which only maps wnids to labels.
Pixels: Pillow's decode, converted to RGB (the grayscale JPEGs among the train images become three equal
channels, as `PIL.Image.convert('RGB')` does in torchvision's loader).
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import sys
import zipfile
from typing import Optional, Sequence

import numpy as np

from mmard_jax.data import array_cache
from mmard_jax.errors import DatasetFormatError

FOLDER = "tiny-imagenet-200"
ZIP_NAME = "tiny-imagenet-200.zip"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# md5 of the official zip: ContinualAI/avalanche@0a0872087edd295eba6329aee90769bc4fe969d8,
# avalanche/benchmarks/datasets/tiny_imagenet/tiny_imagenet.py line 30 (torchvision has no Tiny-ImageNet).
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
NUM_CLASSES = 200
IMAGE_SHAPE = (64, 64, 3)
WNIDS_FILE = "wnids.txt"
VAL_ANNOTATIONS = "val/val_annotations.txt"
EXTENSION = ".JPEG"

# How wnids map to labels (docs/design.md, "Tiny-ImageNet and SVHN"):
#   'sorted': label = rank of the wnid in sorted order, as torchvision's ImageFolder assigns it. SAAD, the one
#             published ARD code that distils from DM-Improves-AT's `tiny_linf_wrn28-10.pt`, labels its data
#             this way (HongsinLee/saad@295121c5d2eed827b5b2d6aa42307de809bdfada utils.py lines 109, 131, 133,
#             teacher loaded at line 215); DGAD sorts wnids.txt (kunsaram01/DGAD@a0329c8 config/TinyImageNet.py
#             line 46). DM-Improves-AT itself reads a repacked train.npz/val.npz whose labelling code is not
#             published (wzekai99/DM-Improves-AT@b390f25d core/data/tiny_imagenet.py lines 26, 42-52).
#   'wnids':  label = line of the wnid in wnids.txt, as PeerAiD reads it
#             (jaewonalive/PeerAiD@cd12e9210ceb43a68c104f3c4ca281ea991880b8 datasets/TinyImageNetDataset.py
#             lines 36-39, 62, 71); PeerAiD trains its own peer, so no published teacher depends on it.
CLASS_ORDERS = ("sorted", "wnids")
DEFAULT_CLASS_ORDER = "sorted"

CACHE_FIELDS = ("images", "wnid_index", "wnids")
CACHE_VERSION = 1  # bump when what is cached changes


class _Source:
    """The files of one copy (zip or folder), named by their path inside `tiny-imagenet-200/`."""

    where: str  # the zip or folder, for messages

    def listdir(self, folder: str) -> list[str]:
        """Sorted names of the files directly in `folder` ([] if it does not exist)."""
        raise NotImplementedError

    def subfolders(self, folder: str) -> list[str]:
        """Sorted names of the folders directly in `folder`."""
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        """The bytes of one file; `DatasetFormatError` naming it if it is missing."""
        raise NotImplementedError

    def fingerprint(self, names: Sequence[str]) -> str:
        """A hex digest that changes when any of `names` changes."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases the open archive, if any."""


class ZipSource(_Source):
    """The official zip, read in place: members `tiny-imagenet-200/...`, indexed once from its central directory."""

    def __init__(self, path: pathlib.Path):
        self.where = str(path)
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetFormatError(f"{path}: not a readable zip ({type(e).__name__}: {e})") from e
        prefix = FOLDER + "/"
        self._members = {info.filename[len(prefix):]: info for info in self._zip.infolist()
                         if info.filename.startswith(prefix) and not info.is_dir()}
        self._files: dict[str, list[str]] = {}
        for name in self._members:
            folder, _, base = name.rpartition("/")
            self._files.setdefault(folder, []).append(base)

    def listdir(self, folder: str) -> list[str]:
        return sorted(self._files.get(folder, ()))

    def subfolders(self, folder: str) -> list[str]:
        prefix = folder + "/"
        return sorted({f[len(prefix):].split("/")[0] for f in self._files if f.startswith(prefix)})

    def read(self, name: str) -> bytes:
        info = self._members.get(name)
        if info is None:
            raise DatasetFormatError(f"{self.where}: missing member {FOLDER}/{name}")
        try:
            return self._zip.read(info)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DatasetFormatError(f"{self.where}: member {FOLDER}/{name} is damaged ({e})") from e

    def fingerprint(self, names: Sequence[str]) -> str:
        """sha256 of each member's name, CRC-32 and size: the content, as the zip records it (a copy still hits)."""
        digest = hashlib.sha256()
        for name in names:
            info = self._members[name]
            digest.update(f"{name}\0{info.CRC:08x}\0{info.file_size}\n".encode())
        return "zip:" + digest.hexdigest()

    def close(self) -> None:
        self._zip.close()


class FolderSource(_Source):
    """The extracted folder `tiny-imagenet-200/`."""

    def __init__(self, path: pathlib.Path):
        self.where = str(path)
        self._root = path

    def _entries(self, folder: str) -> list[os.DirEntry]:
        try:
            with os.scandir(self._root / folder) as it:
                return list(it)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def listdir(self, folder: str) -> list[str]:
        return sorted(e.name for e in self._entries(folder) if e.is_file())

    def subfolders(self, folder: str) -> list[str]:
        return sorted(e.name for e in self._entries(folder) if e.is_dir())

    def read(self, name: str) -> bytes:
        path = self._root / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise DatasetFormatError(f"{path}: missing") from None

    def fingerprint(self, names: Sequence[str]) -> str:
        """sha256 of each file's name, size and modification time (no checksum on disk; reading it all is the
        decode the cache saves)."""
        digest = hashlib.sha256()
        for name in names:
            st = os.stat(self._root / name)
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "folder:" + digest.hexdigest()


def open_source(root: pathlib.Path) -> Optional[_Source]:
    """The copy in `root`: the extracted folder if there, else the zip; None if neither exists."""
    if (root / FOLDER).is_dir():
        return FolderSource(root / FOLDER)
    if (root / ZIP_NAME).is_file():
        return ZipSource(root / ZIP_NAME)
    return None


def read_wnids(source: _Source) -> list[str]:
    """The wnids in the order of `wnids.txt` (blank lines skipped; a repeated wnid is an error)."""
    text = source.read(WNIDS_FILE).decode("ascii", errors="replace")
    wnids = [line.strip() for line in text.splitlines() if line.strip()]
    seen: set[str] = set()
    for wnid in wnids:
        if wnid in seen:
            raise DatasetFormatError(f"{source.where}: {WNIDS_FILE} lists {wnid} twice; expected each wnid once")
        seen.add(wnid)
    if len(wnids) != NUM_CLASSES:
        raise DatasetFormatError(f"{source.where}: {WNIDS_FILE} lists {len(wnids)} wnids; expected {NUM_CLASSES}, "
                                 "one a line")
    return wnids


def train_examples(source: _Source, wnids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(files, wnid index into `wnids`) of the train split in ImageFolder order: sorted wnid, then sorted name."""
    listed = set(wnids)
    for folder in source.subfolders("train"):
        if folder not in listed:
            raise DatasetFormatError(f"{source.where}: train/{folder}/ is not a class listed in {WNIDS_FILE}")
    position = {wnid: i for i, wnid in enumerate(wnids)}
    files, index = [], []
    for wnid in sorted(wnids):
        names = [n for n in source.listdir(f"train/{wnid}/images") if n.endswith(EXTENSION)]
        if not names:
            raise DatasetFormatError(
                f"{source.where}: {WNIDS_FILE} lists {wnid}, but train/{wnid}/images/ holds no {EXTENSION} files"
            )
        files += [f"train/{wnid}/images/{n}" for n in names]
        index += [position[wnid]] * len(names)
    return files, np.asarray(index, np.int32)


def val_examples(source: _Source, wnids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(files, wnid index into `wnids`) of the official val split, in the order of `val_annotations.txt`."""
    position = {wnid: i for i, wnid in enumerate(wnids)}
    available = set(source.listdir("val/images"))
    files, index = [], []
    text = source.read(VAL_ANNOTATIONS).decode("ascii", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{source.where}: {VAL_ANNOTATIONS} line {number}"
        if len(fields) < 2:
            raise DatasetFormatError(f"{where}: expected 'file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1', got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in position:
            raise DatasetFormatError(f"{where}: wnid {wnid} is not listed in {WNIDS_FILE}")
        if name not in available:
            raise DatasetFormatError(f"{where}: names {name}, which val/images/ does not hold")
        files.append(f"val/images/{name}")
        index.append(position[wnid])
    if not files:
        raise DatasetFormatError(f"{source.where}: {VAL_ANNOTATIONS} has no annotations; expected one a line")
    return files, np.asarray(index, np.int32)


def decode_jpeg(data: bytes, where: str) -> np.ndarray:
    """One image file -> uint8 [64,64,3] RGB (Pillow's decode; grayscale and other modes converted to RGB)."""
    import PIL.Image

    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetFormatError(f"{where}: not a readable image ({type(e).__name__}: {e})") from e
    if pixels.shape != IMAGE_SHAPE:
        raise DatasetFormatError(f"{where}: image is {pixels.shape[1]}x{pixels.shape[0]}; expected 64x64")
    return pixels


def decode_all(source: _Source, files: Sequence[str], desc: str) -> np.ndarray:
    """Decodes `files` into one uint8 [N,64,64,3] array, with a tqdm progress bar."""
    from tqdm.auto import tqdm

    images = np.empty((len(files), *IMAGE_SHAPE), np.uint8)
    for i in tqdm(range(len(files)), desc=desc, unit="img", mininterval=1.0):
        images[i] = decode_jpeg(source.read(files[i]), f"{source.where}:{files[i]}")
    return images


def labels_for(wnid_index: np.ndarray, wnids: Sequence[str], class_order: str) -> np.ndarray:
    """int32 labels from indices into the `wnids.txt` order: unchanged for 'wnids', sorted rank for 'sorted'."""
    if class_order == "wnids":
        return wnid_index.astype(np.int32)
    rank = np.empty(len(wnids), np.int32)
    rank[np.argsort(np.asarray(wnids), kind="stable")] = np.arange(len(wnids), dtype=np.int32)
    return rank[wnid_index]


def cache_path(root: pathlib.Path, split: str) -> pathlib.Path:
    """Where the decoded split is cached: beside the data, `<root>/tiny-imagenet-200.<split>.cache.npz`."""
    return root / f"{FOLDER}.{split}.cache.npz"


def cache_key(source: _Source, split: str, files: Sequence[str]) -> str:
    """What the cache of a split depends on: the cache format, Pillow's version (its JPEG decoder) and the source
    files the split reads (their fingerprint)."""
    import PIL

    names = [WNIDS_FILE, *([VAL_ANNOTATIONS] if split == "test" else []), *files]
    return f"v{CACHE_VERSION} pillow-{PIL.__version__} {split} {source.fingerprint(names)}"


def read_split(source: _Source, split: str, root: pathlib.Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images, wnid index, wnids in file order) of one split: from the cache beside the data when it was
    made from these very files, else decoded (progress bar) and cached atomically."""
    wnids = read_wnids(source)
    files, index = train_examples(source, wnids) if split == "train" else val_examples(source, wnids)
    key, path = cache_key(source, split, files), cache_path(root, split)
    cached = array_cache.read_cache(path, key, CACHE_FIELDS)
    if cached is not None:
        return cached["images"], cached["wnid_index"].astype(np.int32), [str(w) for w in cached["wnids"]]
    images = decode_all(source, files, f"decoding {FOLDER} {split} (once; cached in {path.name})")
    try:
        array_cache.write_cache(path, key, {"images": images, "wnid_index": index, "wnids": np.asarray(wnids)})
    except OSError as e:  # a read-only or full data folder: the data are still good, only the next run decodes again
        print(f"{path}: not cached ({type(e).__name__}: {e}); the next load decodes again", file=sys.stderr)
    return images, index, wnids
