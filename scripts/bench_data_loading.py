"""Times the Tiny-ImageNet loader on a synthetic copy in the official layout: first load (JPEG decode + cache
write) and later loads (cache read), from the zip and from the extracted folder.

    PYTHONPATH=. python scripts/bench_data_loading.py [--per_class=50] [--classes=200]

The images are smooth random 64x64 colour fields with mild noise, saved at quality 75 (about the size of the
official JPEGs: 248 MB for 120,000 files, ~2 KB each); times scale with the number of images, so the script
prints the extrapolation to the real 100,000 train + 10,000 val images.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import tempfile
import time
import zipfile

import numpy as np

REAL_TRAIN, REAL_TEST = 100_000, 10_000


def synthetic_jpeg(rng: np.random.Generator) -> bytes:
    """One 64x64 JPEG of a smooth random field plus noise (quality 75)."""
    import PIL.Image

    coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    field = np.kron(coarse, np.ones((8, 8, 1), np.float32)) + rng.normal(0, 12, (64, 64, 3))
    out = io.BytesIO()
    PIL.Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=75)
    return out.getvalue()


def write_zip(path: pathlib.Path, classes: int, per_class: int, val: int) -> int:
    """Writes a tiny-imagenet-200.zip in the official layout; returns its total JPEG bytes."""
    rng = np.random.default_rng(0)
    wnids = [f"n{i:08d}" for i in range(classes)]
    total = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "".join(w + "\n" for w in wnids))
        for w in wnids:
            for j in range(per_class):
                data = synthetic_jpeg(rng)
                total += len(data)
                zf.writestr(f"tiny-imagenet-200/train/{w}/images/{w}_{j}.JPEG", data)
        lines = []
        for j in range(val):
            data = synthetic_jpeg(rng)
            total += len(data)
            zf.writestr(f"tiny-imagenet-200/val/images/val_{j}.JPEG", data)
            lines.append(f"val_{j}.JPEG\t{wnids[j % classes]}\t0\t0\t63\t63\n")
        zf.writestr("tiny-imagenet-200/val/val_annotations.txt", "".join(lines))
    return total


def timed(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per_class", type=int, default=50)
    args = parser.parse_args()
    from mmard_jax import data
    from mmard_jax.data import tiny_imagenet

    n_train, n_val = args.classes * args.per_class, args.classes * args.per_class // 10
    tiny_imagenet.NUM_CLASSES = args.classes  # a smaller synthetic set than the real 200 classes is allowed here
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        jpeg_bytes = write_zip(root / tiny_imagenet.ZIP_NAME, args.classes, args.per_class, n_val)
        print(f"synthetic set: {n_train} train + {n_val} val JPEGs, {jpeg_bytes / (n_train + n_val):.0f} B each")
        rows = []
        for split, n, real in (("train", n_train, REAL_TRAIN), ("test", n_val, REAL_TEST)):
            first, ds = timed(lambda: data.load_dataset("tiny_imagenet", split, data_dir=root))
            again, ds2 = timed(lambda: data.load_dataset("tiny_imagenet", split, data_dir=root))
            assert np.array_equal(ds.images, ds2.images) and len(ds) == n
            rows.append((f"zip {split}", n, first, again, real))
        with zipfile.ZipFile(root / tiny_imagenet.ZIP_NAME) as zf:
            zf.extractall(root)
        for split, n, real in (("train", n_train, REAL_TRAIN),):
            first, _ = timed(lambda: data.load_dataset("tiny_imagenet", split, data_dir=root))  # folder: new key
            again, _ = timed(lambda: data.load_dataset("tiny_imagenet", split, data_dir=root))
            rows.append((f"folder {split}", n, first, again, real))
    print(f"{'source':14s} {'images':>7s} {'first s':>8s} {'cached s':>9s}   real set: first / cached (s)")
    for what, n, first, again, real in rows:
        print(f"{what:14s} {n:7d} {first:8.2f} {again:9.3f}   {first * real / n:8.1f} / {again * real / n:.2f}")


if __name__ == "__main__":
    main()
