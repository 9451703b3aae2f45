"""The trainer's input by `config.dataset.pipeline`: the resident split (`device`) or the grain stream (`stream`),
`auto` choosing by the decoded split's size (`data.stream.AUTO_STREAM_BYTES`); the sources a config names.

    config.dataset.pipeline    'device' (default) | 'stream' | 'auto'
    config.dataset.source      as load_dataset's, plus 'folder' (DATA_DIR/<split>/<class>/*.JPEG) and, for a name
                               load_dataset does not know (imagenet2012, imagenet_resized/64x64), 'tfds'
    config.dataset.augment     'pad_crop' (crop_padding, flip) | 'random_resized_crop' (stream only; flip)
    config.dataset.image_size  the training images' side (0: as stored); test images are centre-cropped to it
    config.dataset.test_split  the evaluated split's name for folder and tfds sources ('validation' for imagenet2012)
    config.dataset.workers     grain worker processes (0: read in the trainer's process, by threads)
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Optional

import numpy as np

from mmard_jax import cli, data
from mmard_jax.data import eval_transforms, host_augment, sources, stream, svhn
from mmard_jax.errors import ConfigError

PIPELINES = ("device", "stream", "auto")
STREAM_SOURCES = ("folder", "tfds")  # sources of any data set name (read by data.sources)
TFDS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "svhn": svhn.TFDS_NAME, "imagenet": "imagenet2012"}
DEFAULTS = {"pipeline": "device", "workers": 0, "augment": "pad_crop", "image_size": 0, "test_split": "test"}
STATE_KEY = "stream_state"  # the grain iterator's state in the latest checkpoint's metadata


def setting(ds, key: str) -> Any:
    """`config.dataset[key]`, or its default for configs written before the key existed."""
    return ds.get(key, DEFAULTS[key])


def by_name(ds) -> bool:
    """Whether the split is read by `data.load_dataset` (a known name and one of its sources)."""
    return ds.name in data.DATASETS and not (ds.source in STREAM_SOURCES and ds.name not in TFDS_NAMES
                                             or ds.source == "folder")


def check(config) -> None:
    """The dataset block's pipeline settings: one-line ConfigErrors naming the key."""
    ds = config.dataset
    pipeline = cli.choice("config.dataset.pipeline", setting(ds, "pipeline"), PIPELINES)
    augment = cli.choice("config.dataset.augment", setting(ds, "augment"), host_augment.KINDS)
    workers, size = setting(ds, "workers"), setting(ds, "image_size")
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"--config.dataset.workers={workers!r}: give 0 (read in this process) or a number of grain "
                          "worker processes")
    chunk = config.eval.get("chunk_size", 0)
    if not isinstance(chunk, int) or chunk < 0:
        raise ConfigError(f"--config.eval.chunk_size={chunk!r}: give 0 (the test split resident) or a number of test "
                          "examples to evaluate at a time")
    if not isinstance(size, int) or size < 0:
        raise ConfigError(f"--config.dataset.image_size={size!r}: give 0 (as stored) or a positive side in pixels")
    cli.choice("config.dataset.source", ds.source, data.SOURCES + ("folder",))
    if ds.source not in STREAM_SOURCES:  # load_dataset's sources know its data sets only
        cli.choice("config.dataset.name", ds.name, data.DATASETS)
    if ds.source == "folder" and not ds.data_dir:
        raise ConfigError("--config.dataset.source=folder needs --config.dataset.data_dir (holding <split>/<class>/)")
    if augment == "random_resized_crop":
        if pipeline == "device":
            raise ConfigError("--config.dataset.augment=random_resized_crop runs on the CPU: it needs "
                              "--config.dataset.pipeline=stream (or auto)")
        if size <= 0:
            raise ConfigError("--config.dataset.augment=random_resized_crop needs --config.dataset.image_size > 0")
    if pipeline != "device" and "swa" in config and config.swa.enabled and config.swa.bn_recompute:
        raise ConfigError("config.swa.bn_recompute reads the resident split: with --config.dataset.pipeline="
                          f"{pipeline} set --config.swa.bn_recompute=false (or use the device pipeline)")


def _data_dir(ds) -> pathlib.Path:
    return pathlib.Path(ds.data_dir).expanduser() if ds.data_dir else data.default_data_dir()


def open_source(ds, split: str):
    """The source of one split (`split`: 'train' or the config's test split) for the streamed pipeline."""
    root = _data_dir(ds)
    if ds.source == "folder":
        return sources.image_folder(root / split)
    if ds.source == "tfds":
        return sources.tfds(TFDS_NAMES.get(ds.name, ds.name), split, root)
    loaded = data.load_dataset(ds.name, "train" if split == "train" else "test", data_dir=ds.data_dir or None,
                               source=ds.source, download=ds.download, class_order=ds.get("class_order") or None)
    return stream.ArraySource(loaded.images, loaded.labels, loaded.num_classes)


def eval_view(ds) -> Callable[[np.ndarray], np.ndarray]:
    """The test images' transform: ImageNet's resize + centre crop for a random-resized-crop recipe
    (`eval_transforms.imagenet_view`: RobustBench's Res256Crop224 at 224), the central square resized for another
    `image_size`, the image as stored otherwise. Picklable (grain's workers run it)."""
    size = setting(ds, "image_size")
    if setting(ds, "augment") == "random_resized_crop":
        return eval_transforms.imagenet_view(size)
    return functools.partial(host_augment.center_crop_resize, size=size) if size else eval_transforms.identity


def read_split(source, n: int, view: Callable[[np.ndarray], np.ndarray], name: str, split: str) -> data.Dataset:
    """The first `n` examples of a source (n <= 0: all) in memory, each through `view`."""
    n = len(source) if n <= 0 else min(n, len(source))
    if isinstance(source, stream.ArraySource) and view is eval_transforms.identity:
        images, labels = source.images[:n], source.labels[:n]
    else:
        records = [source[i] for i in range(n)]
        images = np.stack([view(np.asarray(r["image"], np.uint8)) for r in records])
        labels = np.asarray([r["label"] for r in records], np.int32)
    return data.Dataset(np.ascontiguousarray(images), np.asarray(labels, np.int32), source.num_classes, name, split)


@dataclasses.dataclass
class Inputs:
    """What the trainer reads: the test split in memory, and either the whole training split (`train`, resident)
    or its source (`train_source`, streamed) with `n_train` examples and the training images' shape."""

    pipeline: str
    test: data.Dataset
    n_train: int
    input_shape: tuple
    num_classes: int
    train: Optional[data.Dataset] = None
    train_source: Any = None
    test_source: Any = None  # where the evaluation streams (config.eval.chunk_size > 0): `test` is its first chunk
    test_view: Callable[[np.ndarray], np.ndarray] = eval_transforms.identity


def split_bytes(source, n: int, size: int) -> int:
    """The decoded split's size in bytes (from its first image's shape, or `size` x `size` x 3)."""
    shape = (size, size, 3) if size else np.shape(source[0]["image"])
    return int(n) * int(np.prod(shape))


def load(config) -> Inputs:
    """The data of a run, the pipeline resolved ('auto': stream above AUTO_STREAM_BYTES, or for an augmentation the
    device does not have)."""
    ds = config.dataset
    choice, size = setting(ds, "pipeline"), setting(ds, "image_size")
    chunk = config.eval.get("chunk_size", 0)
    if choice == "device" and by_name(ds):
        train, test = load_by_name(config)
        streamed_test = {}
        if chunk > 0:  # the loaded split evaluated chunk by chunk, as a source
            streamed_test = dict(test_source=stream.ArraySource(test.images, test.labels, test.num_classes))
            test = dataclasses.replace(test, images=test.images[:chunk], labels=test.labels[:chunk])
        return Inputs("device", test, len(train), train.images.shape[1:], train.num_classes, train=train,
                      **streamed_test)
    test_split = "test" if by_name(ds) else setting(ds, "test_split")
    source = open_source(ds, "train")
    n = len(source) if ds.n_train <= 0 else min(ds.n_train, len(source))
    pipeline = ("stream" if setting(ds, "augment") != "pad_crop" else
                stream.resolve_pipeline(choice, split_bytes(source, n, size)))
    view, n_test = eval_view(ds), config.eval.n_examples
    test_source = open_source(ds, test_split)
    # A streamed evaluation holds one chunk at a time; `test` is the first, which shapes the evaluator's programs.
    first = n_test if chunk <= 0 else chunk if n_test <= 0 else min(chunk, n_test)
    test = read_split(test_source, first, view, ds.name, test_split)
    streamed_test = dict(test_source=test_source, test_view=view) if chunk > 0 else {}
    if pipeline == "device":
        train = read_split(source, n, view, ds.name, "train")  # pad_crop: the test images' view (image_size)
        return Inputs("device", test, n, train.images.shape[1:], source.num_classes, train=train, **streamed_test)
    shape = (size, size, 3) if size else tuple(np.shape(source[0]["image"]))
    return Inputs("stream", test, n, shape, source.num_classes, train_source=source, **streamed_test)


def load_by_name(config):
    """The resident path's splits from `data.load_dataset` (optionally their first examples only)."""
    ds = config.dataset
    kw = dict(data_dir=ds.data_dir or None, source=ds.source, download=ds.download,
              class_order=ds.get("class_order") or None)
    train, test = data.load_dataset(ds.name, "train", **kw), data.load_dataset(ds.name, "test", **kw)
    if ds.n_train > 0:
        train = dataclasses.replace(train, images=train.images[: ds.n_train], labels=train.labels[: ds.n_train])
    if config.eval.n_examples > 0:
        n = config.eval.n_examples
        test = dataclasses.replace(test, images=test.images[:n], labels=test.labels[:n])
    return train, test


def augmentation(ds, size: int) -> host_augment.Augment:
    return host_augment.Augment(setting(ds, "augment"), int(ds.crop_padding), bool(ds.flip), size)


def open_stream(config, inputs: Inputs, rows: slice) -> stream.Stream:
    """This process's grain stream (`rows` of every global batch) for the run's epochs."""
    ds = config.dataset
    dataset = stream.make_dataset(
        inputs.train_source, augmentation(ds, setting(ds, "image_size")), seed=config.seed, n=inputs.n_train,
        global_batch=config.batch_size, rows=rows, num_epochs=config.num_epochs,
        settings=stream.StreamSettings(workers=setting(ds, "workers")))
    return stream.Stream(dataset, data.num_train_steps(inputs.n_train, config.batch_size))
