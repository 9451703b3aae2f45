"""The streamed input pipeline: sources on files the tests write (JPEG/PNG folders, a prepared tfds array_record
copy), the grain stream's epochs, shards, reproducibility and resume state, the CPU augmentation against the device
formula and torchvision's random-resized-crop rules, the streamed step against the resident one, config errors."""

import json
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from fast_compile import FastCompiled
from mmard_jax import config_lib, input_pipeline, methods, parallel, train, train_step
from mmard_jax.data import host_augment, pipeline, sources, stream
from mmard_jax.data.augment import crop_and_flip
from mmard_jax.errors import DatasetNotFoundError, UserError
from mmard_jax.models import store
from test_data import _prepare_tfds_cifar10
from test_train_step import SmallNet

# ---------------------------------------------------------------- sources


def _write_folder(root, sizes, suffixes=(".JPEG", ".png")):
    """root/<class>/<file> with random images of `sizes` (one class per size, written in reverse name order); returns
    {path: pixels as Pillow decodes them back}."""
    rng, written = np.random.default_rng(0), {}
    for c, (h, w) in enumerate(sizes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for k in reversed(range(3)):
            path = folder / f"img_{k}{suffixes[k % len(suffixes)]}"
            PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            written[path] = np.asarray(PIL.Image.open(path).convert("RGB"))
    (root / "class_0" / "notes.txt").write_text("not an image")
    return written


def test_image_folder_orders_classes_and_files_and_decodes_rgb(tmp_path):
    written = _write_folder(tmp_path, [(12, 10), (9, 14)])
    source = sources.image_folder(tmp_path)
    assert len(source) == 6 and source.num_classes == 2 and source.class_names == ("class_0", "class_1")
    for i, (c, k) in enumerate((c, k) for c in range(2) for k in range(3)):
        suffix = (".JPEG", ".png")[k % 2]
        record = source[i]
        assert record["label"] == c and record["image"].dtype == np.uint8
        np.testing.assert_array_equal(record["image"], written[tmp_path / f"class_{c}" / f"img_{k}{suffix}"])
    again = pickle.loads(pickle.dumps(source))  # grain's workers get a pickled copy
    np.testing.assert_array_equal(again[4]["image"], source[4]["image"])


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no such image folder"):
        sources.image_folder(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path} holds no images"):
        sources.image_folder(tmp_path)


def test_tfds_source_reads_a_prepared_cifar_copy(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    _prepare_tfds_cifar10(tmp_path, images)  # a real array_record copy written by tfds' own builder
    source = sources.tfds("cifar10", "train", tmp_path)
    assert len(source) == 10 and source.num_classes == 10
    labels = [source[i]["label"] for i in range(10)]
    assert sorted(labels) == list(range(10))
    for i in range(10):  # label i was image i; PNG is lossless
        np.testing.assert_array_equal(source[i]["image"], images[labels[i]])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(source))[3]["image"], source[3]["image"])
    with pytest.raises(DatasetNotFoundError, match="'cifar10' split 'validation'"):
        sources.tfds("cifar10", "validation", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="not prepared"):
        sources.tfds("cifar10", "train", tmp_path / "elsewhere")


# ---------------------------------------------------------------- the stream

N, B = 48, 8


def _indexed_source(n=N, size=6):
    """Image i holds the value i everywhere (so a batch says which examples it holds), label i % 10."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3)).copy()
    return stream.ArraySource(images, np.arange(n) % 10, 10)


def _batches(source, aug, rows, epochs=2, seed=3, steps=None, state=None):
    ds = stream.make_dataset(source, aug, seed=seed, n=len(source), global_batch=B, rows=rows, num_epochs=epochs,
                             settings=stream.StreamSettings(read_threads=2))
    feed = stream.Stream(ds, len(source) // B)
    if state is not None:
        feed.restore(state)
    out = [feed.next() for _ in range(steps if steps is not None else epochs * len(source) // B)]
    return out, feed


def test_epochs_hold_every_example_once_in_the_resident_order():
    """Without augmentation the stream's batches are the resident path's: `train_batch_indices(seed, epoch)`."""
    out, _ = _batches(_indexed_source(), host_augment.Augment("pad_crop", 0, False), slice(0, B))
    for epoch in range(2):
        held = np.stack([images[:, 0, 0, 0] for images, _ in out[epoch * 6:(epoch + 1) * 6]])
        np.testing.assert_array_equal(held, pipeline.train_batch_indices(3, epoch, N, B))
        assert sorted(held.ravel()) == list(range(N))
        labels = np.stack([lab for _, lab in out[epoch * 6:(epoch + 1) * 6]])
        np.testing.assert_array_equal(labels, held % 10)
        assert labels.dtype == np.int32
    assert not np.array_equal(out[0][0], out[6][0])  # a fresh order each epoch


def test_two_process_shards_tile_each_global_batch():
    """process_count=2, computed in-process (the shard is a pure function): the processes' blocks are disjoint, their
    union is every example of the epoch, and each process's augmented rows are the single process's same rows."""
    halves = [stream.process_rows(B, p, 2) for p in range(2)]
    assert halves == [slice(0, 4), slice(4, 8)]
    for epoch in range(3):
        shards = [stream.epoch_shard(5, epoch, N, B, rows) for rows in halves]
        assert not set(shards[0].ravel()) & set(shards[1].ravel())
        assert sorted(np.concatenate([s.ravel() for s in shards])) == list(range(N))
        np.testing.assert_array_equal(np.concatenate(shards, axis=1), pipeline.train_batch_indices(5, epoch, N, B))
    aug = host_augment.Augment("pad_crop", 2, True)
    source = stream.ArraySource(np.random.default_rng(0).integers(0, 256, (N, 6, 6, 3), dtype=np.uint8),
                                np.arange(N) % 10, 10)
    whole, _ = _batches(source, aug, slice(0, B), epochs=1)
    parts = [_batches(source, aug, rows, epochs=1)[0] for rows in halves]
    for k in range(N // B):
        np.testing.assert_array_equal(np.concatenate([parts[0][k][0], parts[1][k][0]]), whole[k][0])
    with pytest.raises(ValueError, match="does not divide by 3 processes"):
        stream.process_rows(B, 0, 3)


def test_batches_are_a_function_of_seed_and_epoch_and_resume_from_grain_state():
    source, aug = _indexed_source(), host_augment.Augment("pad_crop", 2, True)
    first, _ = _batches(source, aug, slice(0, B))
    again, _ = _batches(source, aug, slice(0, B))
    for (a, la), (b, lb) in zip(first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    other, _ = _batches(source, aug, slice(0, B), seed=4)
    assert not all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, other))
    # Stopped mid-epoch 0 after 4 batches: grain's state (JSON, as checkpointed) resumes exactly there.
    _, stopped = _batches(source, aug, slice(0, B), steps=4)
    state = pickle.loads(pickle.dumps(stopped.state()))
    resumed, _ = _batches(source, aug, slice(0, B), steps=len(first) - 4, state=state)
    for (a, la), (b, lb) in zip(first[4:], resumed):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


# ---------------------------------------------------------------- CPU augmentation


def test_pad_crop_flip_equals_the_device_formula():
    """The grain side's crop and flip for given offsets/flips = a NumPy transcription of augment.crop_and_flip and
    the device function itself; its draws cover every offset in 0..2p and both flips."""
    rng = np.random.default_rng(0)
    images, padding = rng.integers(0, 256, (12, 7, 5, 3), dtype=np.uint8), 3
    offsets = rng.integers(0, 2 * padding + 1, (12, 2))
    flips = rng.random(12) < 0.5
    device = np.asarray(crop_and_flip(images, offsets.astype(np.int32), flips, padding=padding))
    for image, offset, flip, on_device in zip(images, offsets, flips, device):
        padded = np.zeros((7 + 2 * padding, 5 + 2 * padding, 3), np.uint8)
        padded[padding:padding + 7, padding:padding + 5] = image
        expected = padded[offset[0]:offset[0] + 7, offset[1]:offset[1] + 5]
        expected = expected[:, ::-1] if flip else expected
        got = host_augment.pad_crop_flip(image, offset, bool(flip), padding)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got, on_device)
    draws = [host_augment.pad_crop_params(np.random.default_rng(s), 2, True) for s in range(200)]
    assert {tuple(o) for o, _ in draws} == {(a, b) for a in range(5) for b in range(5)}
    assert {f for _, f in draws} == {True, False}
    assert not any(host_augment.pad_crop_params(np.random.default_rng(s), 2, False)[1] for s in range(20))


@pytest.mark.parametrize("shape", [(64, 48), (30, 200), (200, 30), (5, 5)])
def test_random_resized_crop_stays_in_bounds_and_sized(shape):
    """torchvision's rules (transforms.py:941-968): a box inside the image, area in scale x image area and aspect in
    the ratio range where drawn; else the central fallback at the nearest allowed aspect; output size x size."""
    height, width = shape
    lo, hi = host_augment.RRC_RATIO
    for seed in range(150):
        top, left, h, w = host_augment.resized_crop_params(np.random.default_rng(seed), height, width)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        central = (top, left) == ((height - h) // 2, (width - w) // 2)
        if not central:  # a drawn box (rounding moves area and aspect by at most half a pixel per side)
            assert 0.08 * height * width * 0.5 <= h * w and lo * 0.6 <= w / h <= hi / 0.6
    if width / height > 4 / 3 * 2:  # a very wide image: draws rarely fit, the fallback keeps the full height
        box = host_augment.resized_crop_params(np.random.default_rng(0), height, width, scale=(0.99, 1.0))
        assert box == (0, (width - round(height * hi)) // 2, height, round(height * hi))
    aug = host_augment.Augment("random_resized_crop", size=16)
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = aug(image, np.random.default_rng(1))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_evaluation_views():
    """A small set at another side: the central square resized; ImageNet's view (random-resized-crop recipes): the
    shorter side to size / 0.875 and a centre crop, RobustBench's Res256Crop224 at 224."""
    from mmard_jax.data import eval_transforms

    image = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(host_augment.center_crop_resize(image, 40), image[:, 12:52])
    assert host_augment.center_crop_resize(image, 20).shape == (20, 20, 3)
    photo = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    np.testing.assert_array_equal(eval_transforms.imagenet_view(224)(photo), eval_transforms.res256_crop224(photo))
    np.testing.assert_array_equal(eval_transforms.imagenet_view(32)(photo),
                                  eval_transforms.center_crop(eval_transforms.resize_shorter(photo, 37), 32))
    assert pickle.loads(pickle.dumps(eval_transforms.imagenet_view(32)))(photo).shape == (32, 32, 3)


# ---------------------------------------------------------------- the streamed step and the trainer's config


def test_streamed_step_equals_the_resident_step_on_the_same_batch():
    """Without augmentation (padding 0, no flip) the streamed step on the stream's uint8 batch gives bitwise the state
    and metrics of the resident step on the same examples by index (the attack's keys are the same)."""
    mesh = parallel.data_mesh(jax.devices()[:1])
    method = config_lib.resolve_method(config_lib.method_block("sat"))
    schedule = train_step.make_lr_schedule(0.1, 4, 2)
    nets = train_step.Networks(SmallNet(width=4, bn_axis_name=parallel.AXIS))
    txs = {"student": train_step.make_optimizer(schedule)}
    settings = train_step.StepSettings(steps=1, crop_padding=0, flip=False, unroll=1, **methods.attack_defaults("sat"))
    state = parallel.put_replicated(train_step.init_state(nets, method, txs, jax.random.key(1, impl="rbg"),
                                                          (8, 8, 3)), mesh)
    source = stream.ArraySource(np.random.default_rng(0).integers(0, 256, (N, 8, 8, 3), dtype=np.uint8),
                                np.arange(N) % 10, 10)
    (images, labels), = _batches(source, host_augment.Augment("pad_crop", 0, False), slice(0, B), epochs=1,
                                 steps=1)[0]
    idx = pipeline.train_batch_indices(3, 0, N, B)[0]
    make = lambda streamed: FastCompiled(train_step.make_train_step(  # noqa: E731
        nets, method, "main", txs, schedule, settings, mesh, seed=0, streamed=streamed))
    resident = make(False)(jax.tree.map(np.copy, jax.device_get(state)), {}, *parallel.put_replicated(
        (source.images, source.labels), mesh), parallel.put_batch(idx, mesh), np.int32(0))
    streamed = make(True)(jax.tree.map(np.copy, jax.device_get(state)), {},
                          parallel.put_process_batch(images, mesh, B), parallel.put_process_batch(labels, mesh, B),
                          np.int32(0))
    chex.assert_trees_all_equal(jax.device_get(resident), jax.device_get(streamed))


def _tiny(**dataset):
    config = config_lib.base_config("sat", "resnet18", "digits")
    config.dataset.update(dataset)
    return config


@pytest.mark.parametrize("dataset, match", [
    (dict(pipeline="fast"), "config.dataset.pipeline='fast' is not one of: device, stream, auto"),
    (dict(augment="random_resized_crop", image_size=32), "random_resized_crop runs on the CPU"),
    (dict(pipeline="stream", augment="random_resized_crop"), "needs --config.dataset.image_size > 0"),
    (dict(pipeline="stream", workers=-1), "config.dataset.workers=-1"),
    (dict(pipeline="stream", source="folder"), "source=folder needs --config.dataset.data_dir"),
    (dict(pipeline="stream", source="folder", data_dir="/x", name="anything", crop_padding=4), None),
    (dict(pipeline="stream", name="imagenet2012"), "config.dataset.name='imagenet2012' is not one of"),
])
def test_pipeline_settings_are_checked_in_one_line(dataset, match):
    config = _tiny(**dataset)
    config.swa.bn_recompute = False
    if match is None:
        input_pipeline.check(config)
        return
    with pytest.raises(UserError, match=match.replace("(", r"\(").replace(")", r"\)")):
        train.check_config(config)


def test_swa_bn_recompute_needs_the_resident_split():
    config = _tiny(pipeline="stream")
    config.swa.enabled = True
    with pytest.raises(UserError, match="swa.bn_recompute=false"):
        input_pipeline.check(config)


def test_auto_streams_large_splits_only(tmp_path):
    _write_folder(tmp_path / "train", [(12, 12)] * 2, suffixes=(".png",))
    _write_folder(tmp_path / "test", [(12, 12)] * 2, suffixes=(".png",))
    config = _tiny(pipeline="auto", source="folder", data_dir=str(tmp_path), name="pngs")
    config.eval.n_examples = -1
    small = input_pipeline.load(config)
    assert small.pipeline == "device" and small.train.images.shape == (6, 12, 12, 3) and small.n_train == 6
    assert small.test.images.shape == (6, 12, 12, 3) and small.num_classes == 2
    assert stream.resolve_pipeline("auto", stream.AUTO_STREAM_BYTES + 1) == "stream"
    assert stream.resolve_pipeline("auto", stream.AUTO_STREAM_BYTES) == "device"
    config.dataset.update(augment="random_resized_crop", image_size=8)  # the device has no random-resized crop
    big = input_pipeline.load(config)
    assert big.pipeline == "stream" and big.input_shape == (8, 8, 3) and big.test.images.shape == (6, 8, 8, 3)


# ---------------------------------------------------------------- configs/imagenet.py end to end, tiny


def _write_imagenet_folder(root, classes=4, train_per_class=50, val_per_class=8, side=64):
    """root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG: smooth random 64x64 images (ImageNet's folder layout)."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n0{c:07d}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # upsampled: JPEG-friendly, like photographs
                image = PIL.Image.fromarray(coarse).resize((side, side), PIL.Image.Resampling.BILINEAR)
                image.save(folder / f"n0{c:07d}_{k}.JPEG", quality=90)


def test_imagenet_config_trains_and_evaluates_a_jpeg_folder_end_to_end(tmp_path):
    """configs/imagenet.py through the real trainer on 200 64x64 JPEGs (random-resized crops to 32 read, decoded and
    batched by grain), a tiny student and teacher in place of the ResNets; the test split streamed in two chunks. The
    streamed per-epoch evaluation equals a resident evaluation of the saved student on the same view of the same
    images, and the checkpoint holds the stream's position."""
    from mmard_jax import checkpoints, robustness
    from test_configs import load_config_file

    root = tmp_path / "imagenet"
    _write_imagenet_folder(root)
    spec = store.model_spec("wide_resnet", 4, {"depth": 10, "width": 1})
    teacher = store.build_module(spec)
    store.save_model(tmp_path / "teacher", spec, jax.jit(lambda k: teacher.init(k, jnp.zeros((1, 32, 32, 3)),
                                                                                 train=False))(jax.random.key(0)))
    config = load_config_file("imagenet").get_config("method=rslad,source=folder,workers=0,batch_size=32,gpus=1")
    config.dataset.update(data_dir=str(root), image_size=32)
    config.student.update(arch="wide_resnet", kwargs={"depth": 10, "width": 1})
    config.teacher.checkpoint = str(tmp_path / "teacher")
    config.num_epochs, config.attack.steps, config.attack.unroll, config.eval.unroll = 1, 1, "1", "1"
    config.eval.update(n_examples=24, chunk_size=16, batch_size=16, attacks=("clean",), final_attacks=("clean",))
    config.best_metric = "clean"  # the attacks' chunked forms: tests/test_eval_stream.py
    train.check_config(config)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, workdir, progress=False)

    (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 200 // 32
    student, variables = checkpoints.load_model(workdir, input_shape=(32, 32, 3))  # the best (only) epoch's student
    view = input_pipeline.eval_view(config.dataset)  # ImageNet's view at 32: resize 37, centre crop 32
    test = input_pipeline.read_split(sources.image_folder(root / "val"), 24, view, "imagenet", "val")
    assert test.images.shape == (24, 32, 32, 3) and sorted(set(test.labels.tolist())) == [0, 1, 2]
    ev = robustness.make_evaluator(student, test.images, test.labels, eps=config.eval.eps, batch_size=16,
                                   progress=False)
    resident = robustness.run(ev, variables, ("clean",), seed=train.eval_seed(config, 1), checks=False)
    assert record["test_clean"] == resident.accuracy["clean"] and record["per_class_test"] == resident.per_class
    meta = json.loads((workdir / checkpoints.LATEST / str(200 // 32) / "meta" / "metadata").read_text())
    assert meta[input_pipeline.STATE_KEY] == {"next_index": 200 // 32}  # grain's position: batches read
