"""Tests for mmard_jax.data: CIFAR pickles/tarballs/tfds, the missing-data message, digits, augmentation, order."""

import dataclasses
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from mmard_jax import data
from mmard_jax.data import cifar, digits
from mmard_jax.data.augment import crop_flip_params

# ---------------------------------------------------------------- CIFAR in its own pickle format


def _cifar_batch(seed, n, label_key, num_classes, extra=None):
    """A batch dict exactly as CIFAR ships it: bytes keys, uint8 [n, 3072] channel-major rows, list labels."""
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": f"batch {seed}".encode(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }
    batch.update(extra or {})
    return batch


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be changed
    """Protocol 2 as Python 2's cPickle wrote CIFAR: every string a py2 `str` (BINSTRING), numpy.core names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _write_pickle(path, obj, py2=False):
    """Pickles with protocol 2, the protocol of the original files; `py2` mimics their Python 2 encoding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    if py2:
        _Py2Pickler(buffer, protocol=2).dump(obj)
        payload = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    else:
        pickle.dump(obj, buffer, protocol=2)
        payload = buffer.getvalue()
    path.write_bytes(payload)


CIFAR10_SIZES = {
    "data_batch_1": 3, "data_batch_2": 2, "data_batch_3": 4, "data_batch_4": 1, "data_batch_5": 2, "test_batch": 3,
}


def _write_cifar10(root, py2=False):
    """Writes a tiny `cifar-10-batches-py/` and returns {filename: batch dict}."""
    batches = {}
    for seed, (filename, n) in enumerate(CIFAR10_SIZES.items()):
        batches[filename] = _cifar_batch(seed, n, b"labels", 10)
        _write_pickle(root / "cifar-10-batches-py" / filename, batches[filename], py2=py2)
    return batches


def _write_cifar100(root):
    """Writes a tiny `cifar-100-python/` (fine and coarse labels) and returns {filename: batch dict}."""
    batches = {}
    for seed, (filename, n) in enumerate({"train": 6, "test": 4}.items()):
        coarse = {b"coarse_labels": list(range(n))}
        batches[filename] = _cifar_batch(100 + seed, n, b"fine_labels", 100, coarse)
        _write_pickle(root / "cifar-100-python" / filename, batches[filename])
    return batches


def _row_to_hwc(row):
    """Independent reference: CIFAR's row is 1024 red, 1024 green, 1024 blue values, each 32x32 row-major."""
    return np.stack([row[c * 1024 : (c + 1) * 1024].reshape(32, 32) for c in range(3)], axis=-1)


def _tar_folder(root, folder, tarball):
    """Packs root/folder into root/tarball (as CIFAR's archive is laid out) and removes the folder."""
    with tarfile.open(root / tarball, "w:gz") as tar:
        tar.add(root / folder, arcname=folder)
    for path in (root / folder).iterdir():
        path.unlink()
    (root / folder).rmdir()


def _check_cifar10(ds, batches, split):
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    rows = np.concatenate([batches[f][b"data"] for f in files])
    labels = np.concatenate([batches[f][b"labels"] for f in files])
    assert (ds.name, ds.split, ds.num_classes, len(ds)) == ("cifar10", split, 10, len(rows))
    assert ds.images.dtype == np.uint8 and ds.images.shape == (len(rows), 32, 32, 3)
    assert ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.labels, labels)
    k = len(rows) - 1  # an image from the last file, so file order is checked too
    np.testing.assert_array_equal(ds.images[k], _row_to_hwc(rows[k]))
    assert ds.images[k, 3, 17, 2] == rows[k][2 * 1024 + 3 * 32 + 17]  # (h=3, w=17, blue)
    np.testing.assert_array_equal(ds.images, np.stack([_row_to_hwc(r) for r in rows]))


@pytest.mark.parametrize("py2", [False, True], ids=["py3-pickle", "py2-pickle"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_pickle_folder(tmp_path, split, py2):
    batches = _write_cifar10(tmp_path, py2=py2)
    _check_cifar10(data.load_dataset("cifar10", split, data_dir=tmp_path, source="pickle"), batches, split)


def test_cifar10_tarball_read_without_extracting(tmp_path):
    batches = _write_cifar10(tmp_path)
    _tar_folder(tmp_path, "cifar-10-batches-py", "cifar-10-python.tar.gz")
    for split in ("train", "test"):
        _check_cifar10(data.load_dataset("cifar10", split, data_dir=tmp_path, source="pickle"), batches, split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize("packed", [False, True])
def test_cifar100_fine_labels(tmp_path, packed):
    batches = _write_cifar100(tmp_path)
    if packed:
        _tar_folder(tmp_path, "cifar-100-python", "cifar-100-python.tar.gz")
    for split in ("train", "test"):
        ds = data.load_dataset("cifar100", split, data_dir=tmp_path)  # auto finds the pickles first
        batch = batches[split]
        assert ds.num_classes == 100 and ds.images.shape == (len(batch[b"data"]), 32, 32, 3)
        np.testing.assert_array_equal(ds.labels, batch[b"fine_labels"])
        np.testing.assert_array_equal(ds.images[1], _row_to_hwc(batch[b"data"][1]))


def test_dataset_arrays_are_read_only(tmp_path):
    _write_cifar10(tmp_path)
    ds = data.load_dataset("cifar10", "test", data_dir=tmp_path)
    with pytest.raises(ValueError):
        ds.images[0, 0, 0, 0] = 1


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda b: b.pop(b"data"), "b'data'"),
        (lambda b: b.update({b"data": b[b"data"][:, :3000]}), "b'data'"),
        (lambda b: b.pop(b"labels"), "b'labels'"),
        (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "b'labels'"),
        (lambda b: b.update({b"labels": [99] * len(b[b"labels"])}), "b'labels'"),
    ],
    ids=["missing-data", "row-length", "missing-labels", "label-count", "label-range"],
)
@pytest.mark.parametrize("packed", [False, True])
def test_corrupted_batch_names_file_and_key(tmp_path, change, key, packed):
    batches = _write_cifar10(tmp_path)
    change(batches["data_batch_3"])
    _write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3", batches["data_batch_3"])
    if packed:
        _tar_folder(tmp_path, "cifar-10-batches-py", "cifar-10-python.tar.gz")
    with pytest.raises(data.DatasetFormatError) as info:
        data.load_dataset("cifar10", "train", data_dir=tmp_path, source="pickle")
    assert "data_batch_3" in str(info.value) and key in str(info.value)


class _Payload:
    """A pickle that would call a function on load: CIFAR files never contain one."""

    def __reduce__(self):
        return (print, ("this must not run",))


def test_pickle_with_foreign_global_is_refused(tmp_path, capsys):
    batches = _write_cifar10(tmp_path)
    batches["test_batch"][b"extra"] = _Payload()
    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", batches["test_batch"])
    with pytest.raises(data.DatasetFormatError, match=r"test_batch.*refers to .*print"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path)
    assert "must not run" not in capsys.readouterr().out


def test_missing_file_in_folder_is_named(tmp_path):
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        data.load_dataset("cifar10", "train", data_dir=tmp_path)


# ---------------------------------------------------------------- missing data, download


def test_missing_data_says_what_to_download_and_where(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("cifar10", "train", data_dir=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert str(tmp_path.resolve() / "cifar-10-python.tar.gz") in message
    assert str(tmp_path.resolve() / "cifar-10-batches-py") in message
    assert "pip install tensorflow" in message and "download_and_prepare" in message


@pytest.mark.parametrize("source", ["pickle", "tfds"])
def test_missing_data_for_one_source(tmp_path, source):
    with pytest.raises(data.DatasetNotFoundError, match="cifar-100-python.tar.gz"):
        data.load_dataset("cifar100", "test", data_dir=tmp_path, source=source)


def test_default_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MMARD_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path.resolve()
    with pytest.raises(data.DatasetNotFoundError, match=str(tmp_path.resolve())):
        data.load_dataset("cifar10", "test")
    monkeypatch.delenv("MMARD_DATA_DIR")
    assert str(data.default_data_dir()).endswith(".cache/mmard_jax/data")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="cifar11", split="train"), "cifar10, cifar100, digits"),
        (dict(name="cifar10", split="valid"), "train, test"),
        (dict(name="cifar10", split="train", source="web"), "auto, pickle, tfds"),
    ],
)
def test_unknown_choices_list_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_dataset(**kwargs)


def _local_tarball_server(tmp_path, monkeypatch):
    """Makes CIFAR-10's download URL a local file:// one (no network) and returns the source batches."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    batches = _write_cifar10(mirror)
    _tar_folder(mirror, "cifar-10-batches-py", "cifar-10-python.tar.gz")
    md5 = hashlib.md5((mirror / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setattr(cifar, "CIFAR_URL_BASE", mirror.as_uri() + "/")
    monkeypatch.setitem(cifar.CIFAR_SPECS, "cifar10", dataclasses.replace(cifar.CIFAR_SPECS["cifar10"], md5=md5))
    return batches


def test_download_then_read(tmp_path, monkeypatch):
    batches = _local_tarball_server(tmp_path, monkeypatch)
    root = tmp_path / "data"
    ds = data.load_dataset("cifar10", "train", data_dir=root, download=True)
    _check_cifar10(ds, batches, "train")
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]  # no temp file left


def test_download_with_wrong_md5_leaves_nothing(tmp_path, monkeypatch):
    _local_tarball_server(tmp_path, monkeypatch)
    spec = dataclasses.replace(cifar.CIFAR_SPECS["cifar10"], md5="0" * 32)
    monkeypatch.setitem(cifar.CIFAR_SPECS, "cifar10", spec)
    root = tmp_path / "data"
    with pytest.raises(data.DatasetNotFoundError, match="Download failed.*md5"):
        data.load_dataset("cifar10", "train", data_dir=root, download=True)
    assert list(root.iterdir()) == []


# ---------------------------------------------------------------- tensorflow-datasets


def _mock_source_with_bound_getitems():
    """tfds 4.9.10's mock stores `__getitems__` as a plain MagicMock attribute, so it is called without `self`
    (TypeError: missing 'record_keys'); this mock binds it to the instance, as a method would be."""
    import tensorflow_datasets as tfds

    class BoundGetitemsMock(tfds.testing.PickableDataSourceMock):
        def __setattr__(self, name, value):
            if name == "__getitems__" and callable(value):
                unbound = value
                value = lambda keys, _self=self: unbound(_self, keys)  # noqa: E731
            super().__setattr__(name, value)

    return BoundGetitemsMock()


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_tfds_mock_data(name, num_classes):
    import tensorflow_datasets as tfds

    # USE_CODE: the wheel ships no metadata files for USE_FILES (AUTO falls back to USE_CODE anyway).
    with tfds.testing.mock_data(
        num_examples=12,
        policy=tfds.testing.MockPolicy.USE_CODE,
        mock_array_record_data_source=_mock_source_with_bound_getitems(),
    ):
        ds = data.load_dataset(name, "train", source="tfds")
    assert ds.images.shape == (12, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (12,) and ds.labels.dtype == np.int32
    assert ds.num_classes == num_classes and 0 <= ds.labels.min() and ds.labels.max() < num_classes


def _prepare_tfds_cifar10(root, images):
    """Prepares a real array_record tfds copy of 'cifar10' without TensorFlow (PIL encodes the PNGs)."""
    import PIL.Image
    import tensorflow_datasets as tfds

    class TinyCifar10(tfds.image_classification.Cifar10, skip_registration=True):
        name = "cifar10"

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(), "test": self._generate_examples()}

        def _generate_examples(self):
            for i, image in enumerate(images):
                yield i, {"id": f"train_{i}", "image": PIL.Image.fromarray(image), "label": i}

    TinyCifar10(data_dir=str(root), file_format="array_record").download_and_prepare()


def test_tfds_prepared_copy_is_found_and_read(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    _prepare_tfds_cifar10(tmp_path, images)
    ds = data.load_dataset("cifar10", "train", data_dir=tmp_path)  # auto: no pickles, so the tfds copy
    assert ds.images.shape == (10, 32, 32, 3) and sorted(ds.labels) == list(range(10))
    np.testing.assert_array_equal(ds.images, images[ds.labels])  # label i was image i; PNG is lossless


# ---------------------------------------------------------------- digits


def test_digits_shapes_classes_and_fixed_split():
    train, test = data.load_dataset("digits", "train"), data.load_dataset("digits", "test")
    assert (len(train), len(test)) == (digits.TRAIN_SIZE, digits.TEST_SIZE) == (1442, 355)
    for ds in (train, test):
        assert ds.images.shape == (len(ds), 16, 16, 3) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int32 and ds.num_classes == 10
        assert set(ds.labels.tolist()) == set(range(10))
        assert ds.images.max() == 255 and ds.images.min() == 0
    again = data.load_dataset("digits", "train")
    np.testing.assert_array_equal(again.images, train.images)
    np.testing.assert_array_equal(again.labels, train.labels)
    train_keys = {img.tobytes() for img in train.images}
    test_keys = {img.tobytes() for img in test.images}
    assert not train_keys & test_keys  # the 1797 source images are all distinct, so this is disjointness
    assert len(train_keys | test_keys) == 1797
    from sklearn.datasets import load_digits

    target = load_digits().target
    is_test = digits.is_test_example(target.astype(np.int32))
    np.testing.assert_array_equal(train.labels, target[~is_test])
    np.testing.assert_array_equal(test.labels, target[is_test])


def test_digits_pixel_mapping():
    from sklearn.datasets import load_digits

    raw = load_digits().images[0]  # example 0 is the 1st of class 0, so it is in train
    image = data.load_dataset("digits", "train").images[0]
    expected = np.floor((raw * 255 + 8) / 16).astype(np.uint8)
    np.testing.assert_array_equal(image[::2, ::2, 0], expected)
    np.testing.assert_array_equal(image[1::2, 1::2, 0], expected)  # 2x nearest neighbour
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grey in all channels
    levels = np.array([[[0, 1, 8, 15, 16, 0, 0, 0]] * 8], np.float64)
    np.testing.assert_array_equal(digits.digits_images(levels)[0, 0, ::2, 0], [0, 16, 128, 239, 255, 0, 0, 0])


def test_digits_read_without_scikit_learn_equal_its_loader(monkeypatch):
    code = ("import sys; from mmard_jax.data import digits; images, target = digits.load_raw(); "
            "print(images.shape, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "False", out  # read from the file, scikit-learn not imported
    from sklearn.datasets import load_digits

    reference = load_digits()
    images, target = digits.load_raw()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(target, reference.target)
    monkeypatch.setattr(digits, "bundled_file", lambda: None)  # another wheel layout: scikit-learn's loader
    np.testing.assert_array_equal(digits.load_raw()[0], reference.images)


def test_digits_rejects_other_sources():
    with pytest.raises(ValueError, match="scikit-learn"):
        data.load_dataset("digits", "train", source="tfds")


# ---------------------------------------------------------------- augmentation


# Jitted once per shape: eager dispatch compiles every primitive separately and is several times slower.
_augment = jax.jit(data.augment, static_argnames=("padding", "flip"))
_params = jax.jit(crop_flip_params, static_argnames=("batch_size", "padding", "flip"))


def _batch(shape=(6, 8, 8, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_augment_range_dtype_shape():
    images = _batch((16, 32, 32, 3))
    out = _augment(jax.random.key(0), images)
    assert out.shape == images.shape and out.dtype == np.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_augment_identity_and_to_float():
    images = _batch()
    expected = images.astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(_augment(jax.random.key(1), images, padding=0, flip=False), expected)
    np.testing.assert_array_equal(data.to_float(images), expected)
    np.testing.assert_array_equal(data.to_float(np.array([0, 255], np.uint8)), [0.0, 1.0])


def test_augment_matches_numpy_reference():
    images, padding, rng = _batch((32, 8, 8, 3)), 3, jax.random.key(2)
    offsets, flips = _params(rng, len(images), padding=padding, flip=True)
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    expected = []
    for image, (dy, dx), f in zip(padded, np.asarray(offsets), np.asarray(flips)):
        crop = image[dy : dy + 8, dx : dx + 8]
        expected.append(crop[:, ::-1] if f else crop)
    expected = np.stack(expected).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(_augment(rng, images, padding=padding), expected)


def test_augment_outputs_are_crops_or_flipped_crops():
    images, padding = _batch((4, 6, 6, 3)), 2
    out = np.asarray(_augment(jax.random.key(3), images, padding=padding))
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0))).astype(np.float32) / 255
    for image, result in zip(padded, out):
        candidates = [image[dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        candidates += [c[:, ::-1] for c in candidates]
        assert len(candidates) == (2 * padding + 1) ** 2 * 2
        assert any(np.array_equal(result, c) for c in candidates)


def test_augment_randomness_covers_offsets_and_flips():
    offsets, flips = _params(jax.random.key(4), 512, padding=4, flip=True)
    assert set(np.asarray(offsets).ravel().tolist()) == set(range(9))
    assert 0.4 < float(np.mean(flips)) < 0.6
    _, no_flips = _params(jax.random.key(4), 512, padding=4, flip=False)
    assert not np.any(no_flips)


def test_augment_jit_and_determinism():
    images = _batch((8, 16, 16, 3))
    a = _augment(jax.random.key(5), images)
    np.testing.assert_array_equal(a, data.augment(jax.random.key(5), images))  # eager == jitted
    np.testing.assert_array_equal(a, _augment(jax.random.key(5), images))
    assert not np.array_equal(a, _augment(jax.random.key(6), images))


def test_to_float_rejects_non_uint8():
    with pytest.raises(TypeError, match="uint8"):
        data.to_float(np.zeros((2, 2), np.float32))


# ---------------------------------------------------------------- order


def test_epoch_permutation():
    p = data.epoch_permutation(0, 3, 1000)
    assert p.dtype == np.int32 and np.array_equal(np.sort(p), np.arange(1000))
    np.testing.assert_array_equal(p, data.epoch_permutation(0, 3, 1000))
    assert not np.array_equal(p, data.epoch_permutation(0, 4, 1000))
    assert not np.array_equal(p, data.epoch_permutation(1, 3, 1000))


def test_train_steps_drop_last_partial_batch():
    assert data.num_train_steps(1000, 128) == 7
    assert data.num_train_steps(1024, 128) == 8
    with pytest.raises(ValueError):
        data.num_train_steps(100, 128)
    batches = data.train_batch_indices(0, 1, 1000, 128)
    assert batches.shape == (7, 128) and len(set(batches.ravel().tolist())) == 7 * 128
    np.testing.assert_array_equal(batches.ravel(), data.epoch_permutation(0, 1, 1000)[: 7 * 128])
