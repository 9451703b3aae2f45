"""Tests for Tiny-ImageNet-200 (official zip or folder, class orders, the decode cache) and SVHN (.mat, tfds copy)."""

import hashlib
import io
import os
import types
import zipfile

import jax
import numpy as np
import PIL.Image
import pytest
import scipy.io

from mmard_jax import data
from mmard_jax.data import array_cache, svhn, tiny_imagenet
from mmard_jax.errors import DatasetFormatError, UserError

# ---------------------------------------------------------------- Tiny-ImageNet in its official layout

# Not in sorted order, so the two class orders differ: sorted = (n01443537, n02124075, n09256479).
WNIDS = ("n09256479", "n01443537", "n02124075")
PER_CLASS = 3
GRAY = "train/n02124075/images/n02124075_1.JPEG"  # a grayscale ('L') JPEG, as a few official train images are


def _jpeg(seed: int, mode: str = "RGB") -> bytes:
    """A real 64x64 JPEG of random blocks (mode 'RGB' or 'L')."""
    rng = np.random.default_rng(seed)
    shape = (8, 8, 3) if mode == "RGB" else (8, 8)
    blocks = rng.integers(0, 256, shape).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    out = io.BytesIO()
    PIL.Image.fromarray(blocks, mode).save(out, "JPEG", quality=90)
    return out.getvalue()


def _tiny_files(seed: int = 0) -> dict:
    """{path inside tiny-imagenet-200/: bytes} of a 3-class copy in the official layout (val in its TSV format)."""
    files = {"wnids.txt": "".join(w + "\n" for w in WNIDS).encode(), "words.txt": b"n01443537\tgoldfish\n"}
    k = seed * 1000
    for wnid in WNIDS:
        boxes = []
        for j in range(PER_CLASS):
            name = f"train/{wnid}/images/{wnid}_{j}.JPEG"
            files[name] = _jpeg(k := k + 1, "L" if name == GRAY else "RGB")
            boxes.append(f"{wnid}_{j}.JPEG\t0\t0\t63\t63\n")
        files[f"train/{wnid}/{wnid}_boxes.txt"] = "".join(boxes).encode()
    # val_annotations.txt: file, wnid, box; not grouped by class (as in the official file)
    val_wnids = ("n02124075", "n09256479", "n01443537", "n09256479", "n02124075")
    lines = []
    for j, wnid in enumerate(val_wnids):
        files[f"val/images/val_{j}.JPEG"] = _jpeg(k := k + 1)
        lines.append(f"val_{j}.JPEG\t{wnid}\t{j}\t10\t63\t58\n")
    files["val/val_annotations.txt"] = "".join(lines).encode()
    files["test/images/test_0.JPEG"] = _jpeg(k + 1)  # unlabelled: never read
    return files


def _write_zip(path, files: dict) -> None:
    """tiny-imagenet-200.zip as downloaded: members under tiny-imagenet-200/, with folder entries."""
    folders = sorted({"/".join(name.split("/")[:i]) for name in files for i in range(1, name.count("/") + 1)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("tiny-imagenet-200/", b"")
        for folder in folders:
            zf.writestr(f"tiny-imagenet-200/{folder}/", b"")
        for name, content in files.items():
            zf.writestr(f"tiny-imagenet-200/{name}", content)


def _write_folder(root, files: dict) -> None:
    """The extracted folder tiny-imagenet-200/."""
    for name, content in files.items():
        path = root / "tiny-imagenet-200" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def _write_tiny(root, files: dict, packed: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _write_zip(root / "tiny-imagenet-200.zip", files) if packed else _write_folder(root, files)


def _pil_rgb(content: bytes) -> np.ndarray:
    """Pillow's own decode of one file, grey replicated to three channels by hand for an 'L' image."""
    image = PIL.Image.open(io.BytesIO(content))
    pixels = np.asarray(image)
    return np.repeat(pixels[..., None], 3, axis=-1) if image.mode == "L" else pixels


def _expected(files: dict, split: str) -> tuple[list[str], list[str]]:
    """(files in the expected example order, their wnids): ImageFolder's order for train, the TSV's for test."""
    if split == "train":
        names = [n for w in sorted(WNIDS) for n in sorted(files) if n.startswith(f"train/{w}/images/")]
        return names, [n.split("/")[1] for n in names]
    rows = [line.split("\t") for line in files["val/val_annotations.txt"].decode().splitlines()]
    return [f"val/images/{r[0]}" for r in rows], [r[1] for r in rows]


@pytest.fixture
def three_classes(monkeypatch):
    """The test copies hold 3 classes, not the real 200."""
    monkeypatch.setattr(tiny_imagenet, "NUM_CLASSES", len(WNIDS))


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("packed", [True, False], ids=["zip", "folder"])
def test_tiny_imagenet_pixels_labels_and_order(tmp_path, three_classes, packed, split):
    files = _tiny_files()
    _write_tiny(tmp_path, files, packed)
    ds = data.load_dataset("tiny_imagenet", split, data_dir=tmp_path)
    names, wnids = _expected(files, split)
    assert ds.images.shape == (len(names), 64, 64, 3) and ds.images.dtype == np.uint8
    assert ds.num_classes == len(WNIDS) and ds.name == "tiny_imagenet" and ds.split == split
    for image, name in zip(ds.images, names):
        np.testing.assert_array_equal(image, _pil_rgb(files[name]), err_msg=name)
    np.testing.assert_array_equal(ds.labels, [sorted(WNIDS).index(w) for w in wnids])  # the default: sorted
    if split == "train":
        gray = ds.images[names.index(GRAY)]
        assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])


@pytest.mark.parametrize("split", ["train", "test"])
def test_tiny_imagenet_class_orders(tmp_path, three_classes, split):
    files = _tiny_files()
    _write_tiny(tmp_path, files, packed=True)
    by_sorted = data.load_dataset("tiny_imagenet", split, data_dir=tmp_path, class_order="sorted")
    by_file = data.load_dataset("tiny_imagenet", split, data_dir=tmp_path, class_order="wnids")
    _, wnids = _expected(files, split)
    np.testing.assert_array_equal(by_file.labels, [WNIDS.index(w) for w in wnids])
    np.testing.assert_array_equal(by_sorted.labels, [sorted(WNIDS).index(w) for w in wnids])
    assert not np.array_equal(by_sorted.labels, by_file.labels)
    np.testing.assert_array_equal(by_sorted.images, by_file.images)  # the order only relabels
    assert set(os.listdir(tmp_path)) == {"tiny-imagenet-200.zip", f"tiny-imagenet-200.{split}.cache.npz"}  # one cache


def test_tiny_imagenet_zip_equals_folder(tmp_path, three_classes):
    files = _tiny_files()
    _write_tiny(tmp_path / "zip", files, packed=True)
    _write_tiny(tmp_path / "folder", files, packed=False)
    for split in ("train", "test"):
        a = data.load_dataset("tiny_imagenet", split, data_dir=tmp_path / "zip", class_order="wnids")
        b = data.load_dataset("tiny_imagenet", split, data_dir=tmp_path / "folder", class_order="wnids")
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


def _refuse_to_decode(monkeypatch):
    def refuse(content, where):
        raise AssertionError(f"decoded {where} although the cache was valid")

    monkeypatch.setattr(tiny_imagenet, "decode_jpeg", refuse)


@pytest.mark.parametrize("packed", [True, False], ids=["zip", "folder"])
def test_tiny_imagenet_cache_hit_reads_without_decoding(tmp_path, three_classes, monkeypatch, packed):
    _write_tiny(tmp_path, _tiny_files(), packed)
    first = data.load_dataset("tiny_imagenet", "train", data_dir=tmp_path)
    assert (tmp_path / "tiny-imagenet-200.train.cache.npz").is_file()
    _refuse_to_decode(monkeypatch)
    again = data.load_dataset("tiny_imagenet", "train", data_dir=tmp_path, class_order="wnids")
    np.testing.assert_array_equal(again.images, first.images)
    wnids = [n.split("/")[1] for n in _expected(_tiny_files(), "train")[0]]
    np.testing.assert_array_equal(again.labels, [WNIDS.index(w) for w in wnids])


@pytest.mark.parametrize("packed", [True, False], ids=["zip", "folder"])
def test_tiny_imagenet_cache_invalidated_when_source_changes(tmp_path, three_classes, packed):
    files = _tiny_files()
    _write_tiny(tmp_path, files, packed)
    data.load_dataset("tiny_imagenet", "test", data_dir=tmp_path)
    changed = dict(files)
    changed["val/images/val_2.JPEG"] = _jpeg(777)
    if packed:
        _write_zip(tmp_path / "tiny-imagenet-200.zip", changed)
    else:
        path = tmp_path / "tiny-imagenet-200" / "val/images/val_2.JPEG"
        before = path.stat().st_mtime_ns
        path.write_bytes(changed["val/images/val_2.JPEG"])
        os.utime(path, ns=(before + 10**9, before + 10**9))  # a later edit (the key reads size and mtime)
    ds = data.load_dataset("tiny_imagenet", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.images[2], _pil_rgb(changed["val/images/val_2.JPEG"]))
    assert not np.array_equal(ds.images[2], _pil_rgb(files["val/images/val_2.JPEG"]))


def test_tiny_imagenet_zip_cache_survives_a_copy(tmp_path, three_classes, monkeypatch):
    """The zip's key is its members' CRC-32s and sizes: the same zip written anew (new mtime) still hits."""
    files = _tiny_files()
    _write_tiny(tmp_path, files, packed=True)
    first = data.load_dataset("tiny_imagenet", "test", data_dir=tmp_path)
    zip_path = tmp_path / "tiny-imagenet-200.zip"
    content = zip_path.read_bytes()
    zip_path.unlink()
    zip_path.write_bytes(content)
    _refuse_to_decode(monkeypatch)
    np.testing.assert_array_equal(data.load_dataset("tiny_imagenet", "test", data_dir=tmp_path).images, first.images)


def test_tiny_imagenet_failed_decode_leaves_no_cache(tmp_path, three_classes):
    files = _tiny_files()
    last = _expected(files, "train")[0][-1]
    files[last] = b"\xff\xd8 not really a JPEG"
    _write_tiny(tmp_path, files, packed=True)
    with pytest.raises(DatasetFormatError, match=f"tiny-imagenet-200.zip:{last}: not a readable image"):
        data.load_dataset("tiny_imagenet", "train", data_dir=tmp_path)
    assert os.listdir(tmp_path) == ["tiny-imagenet-200.zip"]  # no cache, no temporary file


def test_tiny_imagenet_interrupted_cache_write_leaves_nothing(tmp_path, three_classes, monkeypatch):
    _write_tiny(tmp_path, _tiny_files(), packed=True)

    def savez_then_fail(file, **arrays):
        file.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(array_cache.np, "savez", savez_then_fail)
    with pytest.raises(KeyboardInterrupt):
        data.load_dataset("tiny_imagenet", "test", data_dir=tmp_path)
    assert os.listdir(tmp_path) == ["tiny-imagenet-200.zip"]


def test_tiny_imagenet_unwritable_cache_still_loads(tmp_path, three_classes, monkeypatch, capsys):
    _write_tiny(tmp_path, _tiny_files(), packed=True)

    def no_space(path, key, arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(array_cache, "write_cache", no_space)
    ds = data.load_dataset("tiny_imagenet", "test", data_dir=tmp_path)
    assert len(ds) == 5
    assert "not cached" in capsys.readouterr().err


def test_damaged_cache_is_decoded_again(tmp_path, three_classes):
    _write_tiny(tmp_path, _tiny_files(), packed=True)
    first = data.load_dataset("tiny_imagenet", "test", data_dir=tmp_path)
    (tmp_path / "tiny-imagenet-200.test.cache.npz").write_bytes(b"truncated")
    np.testing.assert_array_equal(data.load_dataset("tiny_imagenet", "test", data_dir=tmp_path).images, first.images)


def _drop(name):
    return lambda files: {k: v for k, v in files.items() if k != name}


def _replace(name, content):
    return lambda files: {**files, name: content}


def _without_class_folder(files):
    return {k: v for k, v in files.items() if not k.startswith("train/n01443537/")}


def _with_extra_class_folder(files):
    return {**files, "train/n07720875/images/n07720875_0.JPEG": _jpeg(5)}


@pytest.mark.parametrize(
    "damage, split, match",
    [
        (_drop("wnids.txt"), "train", r"tiny-imagenet-200.zip: missing member tiny-imagenet-200/wnids.txt"),
        (_drop("val/val_annotations.txt"), "test", r"missing member tiny-imagenet-200/val/val_annotations.txt"),
        (_without_class_folder, "train",
         r"wnids.txt lists n01443537, but train/n01443537/images/ holds no .JPEG files"),
        (_with_extra_class_folder, "train", r"train/n07720875/ is not a class listed in wnids.txt"),
        (_replace("val/val_annotations.txt",
                  b"val_0.JPEG\tn02124075\t0\t10\t63\t58\nval_1.JPEG\tn99999999\t0\t0\t1\t1\n"),
         "test", r"val/val_annotations.txt line 2: wnid n99999999 is not listed in wnids.txt"),
        (_replace("val/val_annotations.txt", b"val_9.JPEG\tn02124075\t0\t10\t63\t58\n"),
         "test", r"val/val_annotations.txt line 1: names val_9.JPEG, which val/images/ does not hold"),
        (_replace("val/val_annotations.txt", b"val_0.JPEG n02124075\n"), "test", r"line 1: expected 'file<TAB>wnid"),
        (_replace("wnids.txt", b"n09256479\nn01443537\n"), "train", r"wnids.txt lists 2 wnids; expected 3"),
        (_replace("wnids.txt", b"n09256479\nn01443537\nn01443537\n"), "train", r"wnids.txt lists n01443537 twice"),
    ],
)
def test_tiny_imagenet_damaged_copy_names_file_and_expectation(tmp_path, three_classes, damage, split, match):
    _write_tiny(tmp_path, damage(_tiny_files()), packed=True)
    with pytest.raises(DatasetFormatError, match=match) as info:
        data.load_dataset("tiny_imagenet", split, data_dir=tmp_path)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    assert str(tmp_path.resolve() / "tiny-imagenet-200.zip") in str(info.value)


def test_tiny_imagenet_not_a_zip(tmp_path):
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(b"<html>404</html>")
    with pytest.raises(DatasetFormatError, match=r"tiny-imagenet-200.zip: not a readable zip"):
        data.load_dataset("tiny_imagenet", "train", data_dir=tmp_path)


def test_tiny_imagenet_real_class_count_is_required(tmp_path):
    _write_tiny(tmp_path, _tiny_files(), packed=False)  # 3 classes where the real set has 200
    with pytest.raises(DatasetFormatError, match=r"tiny-imagenet-200: wnids.txt lists 3 wnids; expected 200"):
        data.load_dataset("tiny_imagenet", "test", data_dir=tmp_path)


def test_tiny_imagenet_not_found_says_what_to_download_and_where(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("tiny_imagenet", "train", data_dir=tmp_path)
    message, root = str(info.value), tmp_path.resolve()
    assert isinstance(info.value, FileNotFoundError)
    assert "download http://cs231n.stanford.edu/tiny-imagenet-200.zip (md5 90528d7ca1a48142e341f4ef8d21d0de)" in message
    assert f"save it as {root / 'tiny-imagenet-200.zip'}" in message
    assert f"{root / 'tiny-imagenet-200'}/  (Tiny-ImageNet-200, the official zip extracted)" in message
    assert "download=True" in message


def test_tiny_imagenet_download_then_read(tmp_path, three_classes, monkeypatch):
    mirror = tmp_path / "mirror"
    _write_tiny(mirror, _tiny_files(), packed=True)
    zip_path = mirror / "tiny-imagenet-200.zip"
    monkeypatch.setattr(tiny_imagenet, "URL", zip_path.as_uri())
    monkeypatch.setattr(tiny_imagenet, "MD5", hashlib.md5(zip_path.read_bytes()).hexdigest())
    root = tmp_path / "data"
    ds = data.load_dataset("tiny_imagenet", "test", data_dir=root, download=True)
    np.testing.assert_array_equal(ds.images, data.load_dataset("tiny_imagenet", "test", data_dir=mirror).images)
    assert sorted(os.listdir(root)) == ["tiny-imagenet-200.test.cache.npz", "tiny-imagenet-200.zip"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="tiny_imagenet", split="train", class_order="alphabetical"), "sorted, wnids"),
        (dict(name="cifar10", split="train", class_order="wnids"), "tiny_imagenet only"),
        (dict(name="tiny_imagenet", split="train", source="tfds"), "valid: auto$"),
        (dict(name="svhn", split="train", source="pickle"), "auto, mat, tfds"),
        (dict(name="svhn", split="train", source="tfds", download=True), "source='mat'"),
    ],
)
def test_new_datasets_reject_invalid_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_dataset(**kwargs)


def test_datasets_list_and_class_orders():
    assert {"tiny_imagenet", "svhn"} <= set(data.DATASETS)
    assert data.CLASS_ORDERS == ("sorted", "wnids") and tiny_imagenet.DEFAULT_CLASS_ORDER == "sorted"


def test_augment_at_64x64_with_padding_8():
    """SAAD's Tiny-ImageNet crop (RandomCrop(64, padding=8)) through the on-device augmentation: a NumPy reference."""
    from mmard_jax.data.augment import crop_flip_params

    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    rng, padding = jax.random.key(9), 8
    params = jax.jit(crop_flip_params, static_argnames=("batch_size", "padding", "flip"))
    offsets, flips = params(rng, len(images), padding=padding, flip=True)
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    expected = []
    for image, (dy, dx), flip in zip(padded, np.asarray(offsets), np.asarray(flips)):
        crop = image[dy : dy + 64, dx : dx + 64]
        expected.append(crop[:, ::-1] if flip else crop)
    expected = np.stack(expected).astype(np.float32) / np.float32(255)
    augment = jax.jit(data.augment, static_argnames=("padding", "flip"))
    np.testing.assert_array_equal(augment(rng, images, padding=padding), expected)


# ---------------------------------------------------------------- SVHN: official .mat files and a tfds copy


def _svhn_arrays(n: int, seed: int):
    """X [32,32,3,N] uint8 and y [N,1] uint8 in 1..10 (every digit, 10 = the digit 0), the official layout."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8)[:, None]
    return x, y


def _write_svhn(root, split: str, n: int = 12, seed: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    x, y = _svhn_arrays(n, seed)
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return x, y


@pytest.mark.parametrize("split", ["train", "test"])
def test_svhn_mat_images_and_labels(tmp_path, split):
    x, y = _write_svhn(tmp_path, split)
    ds = data.load_dataset("svhn", split, data_dir=tmp_path)
    assert ds.images.shape == (12, 32, 32, 3) and ds.num_classes == 10 and len(ds) == 12
    for i in range(12):
        np.testing.assert_array_equal(ds.images[i], x[:, :, :, i])
    digits = [0 if label == 10 else int(label) for label in y[:, 0]]
    np.testing.assert_array_equal(ds.labels, digits)
    assert ds.labels.dtype == np.int32 and set(ds.labels.tolist()) == set(range(10))


def test_svhn_not_found_says_what_to_download_and_where(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("svhn", "test", data_dir=tmp_path)
    message, root = str(info.value), tmp_path.resolve()
    assert "download http://ufldl.stanford.edu/housenumbers/test_32x32.mat (md5 eb5a983be6a315427106f1b164d9cef3)" \
        in message
    assert f"save it as {root / 'test_32x32.mat'}" in message
    assert f"{root / 'svhn_cropped'}/<version>/" in message and "tfds.builder('svhn_cropped'" in message
    with pytest.raises(data.DatasetNotFoundError, match="e26dedcc434d2e4c54c9b2d4a06d8373"):
        data.load_dataset("svhn", "train", data_dir=tmp_path, source="mat")


@pytest.mark.parametrize(
    "content, match",
    [
        ({"y": np.ones((3, 1), np.uint8)}, r"missing variable 'X' \(expected uint8 images \[32,32,3,N\]"),
        ({"X": np.zeros((32, 32, 3, 3), np.uint8)}, r"missing variable 'y'"),
        ({"X": np.zeros((32, 32, 3, 3), np.float64), "y": np.ones((3, 1))}, r"'X' is float64 .* expected uint8"),
        ({"X": np.zeros((32, 32, 3, 3), np.uint8), "y": np.ones((2, 1))}, r"expected 3 labels"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]])}, r"labels in \[0, 3\]"),
    ],
)
def test_svhn_damaged_mat_names_file_and_variable(tmp_path, content, match):
    scipy.io.savemat(tmp_path / "train_32x32.mat", content)
    with pytest.raises(DatasetFormatError, match=match) as info:
        data.load_dataset("svhn", "train", data_dir=tmp_path)
    assert str(tmp_path.resolve() / "train_32x32.mat") in str(info.value) and "\n" not in str(info.value)


def test_svhn_unreadable_mat(tmp_path):
    (tmp_path / "test_32x32.mat").write_bytes(b"not a MATLAB file at all")
    with pytest.raises(DatasetFormatError, match=r"test_32x32.mat: not a readable MATLAB v5 file"):
        data.load_dataset("svhn", "test", data_dir=tmp_path)


def test_svhn_download_then_read(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    x, _ = _write_svhn(mirror, "test")
    md5 = hashlib.md5((mirror / "test_32x32.mat").read_bytes()).hexdigest()
    monkeypatch.setattr(svhn, "URL_BASE", mirror.as_uri() + "/")
    monkeypatch.setitem(svhn.FILES, "test", svhn.SvhnFile("test_32x32.mat", md5))
    ds = data.load_dataset("svhn", "test", data_dir=tmp_path / "data", download=True)
    np.testing.assert_array_equal(ds.images, x.transpose(3, 0, 1, 2))
    assert os.listdir(tmp_path / "data") == ["test_32x32.mat"]


def _prepare_tfds_svhn(root, mats):
    """Prepares a real array_record `svhn_cropped` copy with tfds's own builder code (its `label % 10`), fed our
    .mat files instead of downloads. TensorFlow is absent here: its file API is replaced by `open`, and the image
    arrays go to tfds as PIL images (which tfds encodes to PNG without TensorFlow)."""
    import tensorflow_datasets as tfds

    builder_cls = tfds.builder_cls("svhn_cropped")
    module = __import__(builder_cls.__module__, fromlist=["_"])

    class OfflineSvhn(builder_cls, skip_registration=True):
        name = "svhn_cropped"

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(f"{split}_", path) for split, path in mats.items()}

        def _generate_examples(self, split_prefix, filepath):
            for key, record in super()._generate_examples(split_prefix, filepath):
                yield key, {**record, "image": PIL.Image.fromarray(record["image"])}

    shim = types.SimpleNamespace(io=types.SimpleNamespace(gfile=types.SimpleNamespace(GFile=open)))
    original = module.tf
    module.tf = shim
    try:
        OfflineSvhn(data_dir=str(root), file_format="array_record").download_and_prepare()
    finally:
        module.tf = original


def test_svhn_tfds_copy_is_found_and_read(tmp_path):
    mats = tmp_path / "mats"
    x, y = _write_svhn(mats, "train", n=10, seed=1)
    _write_svhn(mats, "test", n=4, seed=2)
    root = tmp_path / "data"
    _prepare_tfds_svhn(root, {"train": str(mats / "train_32x32.mat"), "test": str(mats / "test_32x32.mat")})
    ds = data.load_dataset("svhn", "train", data_dir=root)  # auto: no .mat files there, so the tfds copy
    reference = data.load_dataset("svhn", "train", data_dir=mats)
    # tfds shuffles the records when it prepares a copy: match them by their pixels (PNG in tfds is lossless)
    label_of = {image.tobytes(): label for image, label in zip(reference.images, reference.labels)}
    assert len(ds) == len(reference) == 10 and ds.num_classes == 10
    assert {image.tobytes(): label for image, label in zip(ds.images, ds.labels)} == label_of
    assert sorted(ds.labels.tolist()) == list(range(10))  # the 10s came back as digit 0


# ---------------------------------------------------------------- the config key and the CLIs


def test_config_class_order_reaches_the_loader(tmp_path, three_classes):
    from mmard_jax import config_lib, train

    _write_tiny(tmp_path, _tiny_files(), packed=True)
    config = config_lib.base_config()
    config.dataset.update(name="tiny_imagenet", data_dir=str(tmp_path), class_order="wnids")
    train_split, test_split = train.load_data(config)
    _, wnids = _expected(_tiny_files(), "test")
    np.testing.assert_array_equal(test_split.labels, [WNIDS.index(w) for w in wnids])
    config.dataset.class_order = ""  # the default: sorted
    np.testing.assert_array_equal(train.load_data(config)[1].labels, [sorted(WNIDS).index(w) for w in wnids])
    assert len(train_split) == len(WNIDS) * PER_CLASS


def test_config_class_order_is_checked():
    from mmard_jax import config_lib, train

    config = config_lib.base_config()
    assert config.dataset.class_order == ""
    config.dataset.class_order = "alphabetical"
    with pytest.raises(UserError, match=r"class_order='alphabetical' is not one of: , sorted, wnids"):
        train.check_config(config)


def test_data_loading_benchmark_runs_on_a_small_synthetic_copy(tmp_path):
    """scripts/bench_data_loading.py's work (mmard_jax.tools.bench_data), 200 classes x 1 image: rows, no numbers."""
    from mmard_jax.tools import bench_data

    rows = bench_data.run(tmp_path, per_class=1)
    assert [(r.source, r.split, r.images) for r in rows] == [("zip", "train", 200), ("zip", "test", 20),
                                                             ("folder", "train", 200)]
    assert bench_data.table(rows).count("\n") == 4 and all(r.real()[0] > 0 for r in rows)
    ds = data.load_dataset("tiny_imagenet", "test", data_dir=tmp_path, class_order="wnids")
    np.testing.assert_array_equal(ds.labels, np.arange(20) % 200)  # val_j is class j of wnids.txt
