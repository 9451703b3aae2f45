"""Our side of scripts/bench_data_loading.py: the Tiny-ImageNet loader timed on a synthetic copy in the official
layout, first load (list + JPEG decode + cache write) and cached load (list + key + cache read), zip and folder.

The images are smooth random 64x64 colour fields with mild noise saved at JPEG quality 75, about the size of the
official files (248 MB for 120,000 files, ~2 KB each). Times scale with the number of images, so each row also
extrapolates to the real 100,000 train / 10,000 val images.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import time
import zipfile
from typing import Callable, List, Tuple

import numpy as np

REAL_IMAGES = {"train": 100_000, "test": 10_000}


@dataclasses.dataclass(frozen=True)
class Row:
    """One timed load: which copy and split, how many images, seconds of the first and of a cached load."""

    source: str
    split: str
    images: int
    first_s: float
    cached_s: float

    def real(self) -> Tuple[float, float]:
        """(first, cached) seconds extrapolated to the real split."""
        scale = REAL_IMAGES[self.split] / self.images
        return self.first_s * scale, self.cached_s * scale


def synthetic_jpeg(rng: np.random.Generator) -> bytes:
    """One 64x64 JPEG of a smooth random field plus noise (quality 75)."""
    import PIL.Image

    coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    field = np.kron(coarse, np.ones((8, 8, 1), np.float32)) + rng.normal(0, 12, (64, 64, 3))
    out = io.BytesIO()
    PIL.Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=75)
    return out.getvalue()


def write_synthetic_zip(path: pathlib.Path, per_class: int, val: int, classes: int = 200) -> int:
    """Writes a `tiny-imagenet-200.zip` in the official layout (stored, as the official zip); returns its JPEG bytes."""
    rng = np.random.default_rng(0)
    wnids = [f"n{i:08d}" for i in range(classes)]
    total = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "".join(w + "\n" for w in wnids))
        for wnid in wnids:
            for j in range(per_class):
                content = synthetic_jpeg(rng)
                total += len(content)
                zf.writestr(f"tiny-imagenet-200/train/{wnid}/images/{wnid}_{j}.JPEG", content)
        lines = []
        for j in range(val):
            content = synthetic_jpeg(rng)
            total += len(content)
            zf.writestr(f"tiny-imagenet-200/val/images/val_{j}.JPEG", content)
            lines.append(f"val_{j}.JPEG\t{wnids[j % classes]}\t0\t0\t63\t63\n")
        zf.writestr("tiny-imagenet-200/val/val_annotations.txt", "".join(lines))
    return total


def _seconds(fn: Callable):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _time_loads(source: str, split: str, root: pathlib.Path) -> Row:
    """A first and a second load of one split from `root`; checks that both give the same arrays."""
    from mmard_jax import data

    first, ds = _seconds(lambda: data.load_dataset("tiny_imagenet", split, data_dir=root))
    cached, again = _seconds(lambda: data.load_dataset("tiny_imagenet", split, data_dir=root))
    if not (np.array_equal(ds.images, again.images) and np.array_equal(ds.labels, again.labels)):
        raise AssertionError(f"{source} {split}: the cached load differs from the first")
    return Row(source, split, len(ds), first, cached)


def run(root: pathlib.Path, per_class: int) -> List[Row]:
    """Writes the synthetic zip into `root` (empty), times train and test from it, then train from the folder."""
    write_synthetic_zip(root / "tiny-imagenet-200.zip", per_class, val=per_class * 20)
    rows = [_time_loads("zip", split, root) for split in ("train", "test")]
    folder_root = root / "extracted"
    with zipfile.ZipFile(root / "tiny-imagenet-200.zip") as zf:
        zf.extractall(folder_root)
    rows.append(_time_loads("folder", "train", folder_root))
    return rows


def table(rows: List[Row]) -> str:
    """The rows as a Markdown table (as in BENCHMARKS.md, "Data loading")."""
    lines = ["| source, split | images | first load | cached load | real set: first / cached |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        real_first, real_cached = r.real()
        lines.append(f"| {r.source}, {r.split} | {r.images:,} | {r.first_s:.2f} s | {r.cached_s:.3f} s "
                     f"| ~{real_first:.0f} s / ~{real_cached:.1f} s |")
    return "\n".join(lines)
