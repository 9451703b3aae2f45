"""Streamed evaluation (robustness.evaluate_source): a source read in chunks through grain gives exactly the resident
evaluation's per-example results, AutoAttack's cascade included; RobustBench's ImageNet transform as torchvision's
arithmetic computes it; RobustBench's listed-image source and its 5000-image list."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmard_jax import errors, robustness
from mmard_jax.attacks import autoattack
from mmard_jax.data import eval_stream, eval_transforms

N = 20  # examples: chunks of 8, 8 and 4 (the last one padded to 8)
EPS = 4 / 255
# AutoAttack's settings cut to Square's stripes and one query: its outcome is then decided by each example's random
# draws, so a chunk keyed by its own positions instead of the split's would change the masks (the seeds below do).
SQUARE_ONLY = dataclasses.replace(autoattack.STANDARD, square_queries=2)


def chaotic(params, x):
    """A tiny model whose decisions turn within the eps-ball (random stripes flip some of them): any JAX function."""
    return 10 * jnp.sin(x.reshape(x.shape[0], -1) @ params["w"])


class Bordered:
    """An in-memory source (the sources protocol): each 8x8 image inside a border of noise (2 rows above and below,
    3 columns left and right), so the evaluation transform (a centre crop of 8) must restore it exactly."""

    def __init__(self, images, labels):
        rng = np.random.default_rng(0)
        self.records = []
        for image, label in zip(images, labels):
            frame = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
            frame[2:10, 3:11] = image
            self.records.append({"image": frame, "label": int(label)})

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def crop8(image):
    """The transform of the bordered images: a centre crop of 8x8."""
    return eval_transforms.center_crop(image, 8)


@pytest.fixture(scope="module")
def split():
    """(params, images, labels): the model's own predictions as labels but every fifth (misclassified)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(0, 0.3, (192, 10)), jnp.float32)}
    images = rng.integers(0, 256, (N, 8, 8, 3), dtype=np.uint8)
    labels = np.array(chaotic(params, jnp.asarray(images, jnp.float32) / 255).argmax(-1), np.int32)
    labels[::5] = (labels[::5] + 1) % 10
    return params, images, labels


def test_streamed_evaluation_equals_the_resident_one_example_by_example(split):
    """20 images streamed in chunks of 8 (the last padded) under clean, PGD_S and Square (an AutoAttack component
    through the cascade: its queries only on the points still robust) equal the resident evaluation of the same
    images per example, and the report's numbers are the masks'. The outcomes depend on the keys (another seed
    changes them), so a chunk attacked at the wrong positions would fail."""
    params, images, labels = split
    attacks = ("clean", "pgd_s", "square")
    kwargs = dict(attacks=attacks, eps=EPS, batch_size=8, progress=False, aa_config=SQUARE_ONLY)
    resident = robustness.evaluate(chaotic, params, images, labels, **kwargs)
    report = robustness.evaluate_source(chaotic, params, Bordered(images, labels), transform=crop8, chunk_size=8,
                                        **kwargs)
    for name in attacks:
        np.testing.assert_array_equal(report.masks[name], resident.masks[name], err_msg=name)
    assert report.accuracy == resident.accuracy and report.per_class == resident.per_class
    assert report.gradients == resident.gradients and report.flags == resident.flags
    clean, square = report.masks["clean"], report.masks["square"]
    assert (~clean).any() and (clean & ~square)[8:].any() and square[8:].any(), (clean, square)  # not vacuous
    other = robustness.evaluate(chaotic, params, images, labels, **{**kwargs, "attacks": ("square",)}, seed=1)
    other = other.masks["square"]
    assert not np.array_equal(other[8:], square[8:])  # the keys decide Square here


def torchvision_crop_box(h, w):
    """Res256Crop224's resized size and crop corner, worked out by hand from torchvision's rules (int() for the
    longer side, Python's round() for the corner)."""
    new = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
    return new, (int(round((new[0] - 224) / 2)), int(round((new[1] - 224) / 2)))


@pytest.mark.parametrize("h,w", [(300, 417), (256, 301), (500, 333)])
def test_res256_crop224_follows_torchvision(h, w):
    image = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    (nh, nw), (top, left) = torchvision_crop_box(h, w)
    resized = image if min(h, w) == 256 else np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    assert resized.shape[:2] == (nh, nw)
    np.testing.assert_array_equal(eval_transforms.res256_crop224(image), resized[top:top + 224, left:left + 224])
    if (h, w) == (300, 417):  # 256 * 417 / 300 = 355.84: int() gives 355; the corner round(65.5) = 66 (half to even)
        assert (nw, left) == (355, 66)
    small = np.full((100, 230, 3), 7, np.uint8)  # smaller than the crop: zero padding, the image in the middle
    out = eval_transforms.center_crop(small, 224)
    assert out.shape == (224, 224, 3) and out[62:162].min() == 7 and out[:62].max() == 0 and out[162:].max() == 0


def write_val_folder(root, classes=("n02", "n01", "n03"), per_class=2):
    """An ImageNet-style val folder of PNGs (lossless), each image a constant of its (class, index)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            value = 40 * c + 10 * i
            Image.fromarray(np.full((5 + i, 6, 3), value, np.uint8)).save(root / name / f"img{i}.png")
    return root


def test_listed_images_read_robustbench_style(tmp_path):
    """Labels index the sorted class folders (RobustBench loaders.py `_find_classes`), records come in the list's
    order; chunks through grain in order, with the last one short."""
    root = write_val_folder(tmp_path / "val")
    ids = ["n03/img1.png", "n01/img0.png", "n02/img1.png", "n01/img1.png", "n03/img0.png"]
    source = eval_stream.ListedImages(root, ids)
    assert source.class_names == ["n01", "n02", "n03"] and len(source) == 5
    assert source.labels.tolist() == [2, 0, 1, 0, 2]
    record = source[0]
    assert record["image"].shape == (6, 6, 3) and record["image"].max() == 40 * 2 + 10  # n03/img1: (c, i) = (2, 1)
    crop = functools.partial(eval_transforms.center_crop, size=4)
    got = list(eval_stream.chunks(source, crop, chunk_size=2, threads=2))
    assert [len(labels) for _, labels in got] == [2, 2, 1]
    labels = np.concatenate([lab for _, lab in got])
    images = np.concatenate([im for im, _ in got])
    assert labels.tolist() == source.labels.tolist() and images.shape == (5, 4, 4, 3)
    np.testing.assert_array_equal(images, np.stack([crop(source[i]["image"]) for i in range(5)]))
    assert len(list(eval_stream.chunks(source, crop, chunk_size=2, n_examples=3))) == 2
    with pytest.raises(errors.UserError, match="class folder"):
        eval_stream.ListedImages(root, ["n09/img0.png"])


def test_robustbench_image_list():
    """RobustBench's list (installed with the robustbench package): 5000 '<wnid>/ILSVRC2012_val_*.JPEG' lines."""
    ids = eval_stream.read_ids(eval_stream.robustbench_ids_path())
    assert len(ids) == eval_stream.ROBUSTBENCH_IMAGENET_EXAMPLES == len(set(ids))
    assert all(i.startswith("n") and "/ILSVRC2012_val_" in i and i.endswith(".JPEG") for i in ids)
