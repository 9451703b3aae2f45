"""A test split read from a source in chunks for evaluation (host memory bounded by a chunk, not the split), and
RobustBench's own list of the 5000 ImageNet validation images it evaluates.

`chunks` reads a source (the protocol of mmard_jax.data.sources: `len(source)`, `source[i]` -> {"image": uint8
HWC, "label": int}) through grain: decoding and the evaluation transform run in grain's reader threads (or worker
processes) ahead of the consumer, so the next chunk is prepared while the device attacks the current one.
"""

import importlib.util
import pathlib
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from absl import flags
from PIL import Image

from mmard_jax import errors
from mmard_jax.data.eval_transforms import RecordTransform

# RobustBench evaluates ImageNet on at most 5000 images (robustbench/data.py:151-153).
ROBUSTBENCH_IMAGENET_EXAMPLES = 5000
# RobustBench's list of them, "<wnid>/<file name>" in evaluation order (robustbench/loaders.py:19-26, 68-70).
ROBUSTBENCH_IDS_FILE = "helper_files/imagenet_test_image_ids.txt"


def chunks(source, transform: Callable[[np.ndarray], np.ndarray], chunk_size: int, n_examples: int = -1,
           workers: int = 0, threads: int = 8) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(images uint8 [<= chunk_size, H, W, 3], labels int32) of the source's first `n_examples` records (all when
    <= 0), in order, each record through `transform`; `workers` > 0 decodes in that many grain worker processes,
    else in `threads` reader threads of this process. Every chunk but the last holds chunk_size examples."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    import grain  # here, not at import: importing grain takes about a second, and only streamed runs need it

    n = len(source) if n_examples <= 0 else min(n_examples, len(source))
    ds = grain.MapDataset.source(source)[:n].map(RecordTransform(transform))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=chunk_size))
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags: their defaults outside an absl program
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    for batch in it.batch(chunk_size, drop_remainder=False):
        yield np.asarray(batch["image"], np.uint8), np.asarray(batch["label"], np.int32)


def robustbench_ids_path() -> pathlib.Path:
    """The installed robustbench package's image list (found without importing robustbench, which needs
    torchvision); a UserError naming the fix when it is not installed."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise errors.UserError("the RobustBench ImageNet image list needs the robustbench package "
                               "(pip install -r requirements-test.txt), or pass its ids file explicitly")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / ROBUSTBENCH_IDS_FILE


def read_ids(path) -> List[str]:
    """The '<wnid>/<file>' lines of an ids file, in order."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise errors.UserError(f"{path}: no such ids file (expected lines '<class folder>/<image file>')")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class ListedImages:
    """A source over listed files of an image-folder tree, as RobustBench's CustomImageFolder reads its val folder:
    labels index the sorted class folders of `root` (loaders.py:87-108 `_find_classes`), records in the list's
    order; Pillow decode, converted to RGB. Picklable (grain workers)."""

    def __init__(self, root, relpaths: Sequence[str]):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise errors.UserError(f"{self.root}: no such image folder (expected <root>/<class>/<image>)")
        self.class_names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        index = {c: i for i, c in enumerate(self.class_names)}
        missing = sorted({r.split("/")[0] for r in relpaths} - set(index))
        if missing:
            raise errors.UserError(f"{self.root}: class folder(s) {missing[:3]} of the image list are missing")
        self.relpaths = list(relpaths)
        self.labels = np.asarray([index[r.split("/")[0]] for r in self.relpaths], np.int32)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, i):
        with Image.open(self.root / self.relpaths[i]) as image:
            return {"image": np.asarray(image.convert("RGB")), "label": int(self.labels[i])}


def robustbench_imagenet(val_root, ids_file: Optional[str] = None) -> ListedImages:
    """RobustBench's ImageNet test set: the 5000 listed images of an ImageNet val folder (`val_root/<wnid>/*.JPEG`,
    1000 class folders) in its order (ids_file: default the robustbench package's list)."""
    return ListedImages(val_root, read_ids(ids_file or robustbench_ids_path()))
