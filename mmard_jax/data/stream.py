"""The streamed training input: a grain pipeline that reads, augments and batches this process's share of every
global batch on the CPU, ahead of the step, for splits too large to hold on the device.

The example order is the resident path's (`pipeline.train_batch_indices`: a permutation keyed by (seed, epoch), full
batches only), so both paths put the same examples in the same global batches; each process takes its block of rows
of every global batch (`epoch_shard`, a pure function), the block its devices hold under the 'data' sharding. An
example's augmentation draws from a NumPy Generator keyed by (seed, epoch, step, position in the global batch), so a
batch does not depend on the process count, grain's worker count or thread timing. grain does the rest (nothing here
reads ahead, spawns or batches by hand): `MapDataset.range` over this process's positions of the whole run, `map`
(read + decode + augment), `to_iter_dataset` (`ReadOptions`: threads reading ahead), `batch`, and `mp_prefetch`
(worker processes) when `workers` > 0. Its iterator's `get_state()` is JSON the trainer saves in the checkpoint;
`set_state()` puts a resumed run exactly where the killed one stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import numpy as np

from mmard_jax.data import host_augment, pipeline

# Splits larger than this (decoded uint8 bytes) stream under `config.dataset.pipeline='auto'` (docs/design.md,
# "Streamed input pipeline"): every device holds the resident split whole, next to the step's activations.
AUTO_STREAM_BYTES = 4 * 2**30
_STREAM = 0x5EED  # the augmentation's stream tag in the key (epoch_permutation's keys have two words, these five)


class ArraySource:
    """An in-memory split (uint8 NHWC images, int labels) as a source: small sets streamed through the same path."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
        self.images, self.labels, self.num_classes = images, np.asarray(labels, np.int32), int(num_classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return {"image": self.images[index], "label": int(self.labels[index])}


def epoch_shard(seed: int, epoch: int, n: int, global_batch: int, rows: slice) -> np.ndarray:
    """The example indices int32 [steps, rows] one process reads in `epoch`: its block `rows` of each global batch of
    `pipeline.train_batch_indices` (the processes' blocks tile the batch, so the epoch is read once across them)."""
    return pipeline.train_batch_indices(seed, epoch, n, global_batch)[:, rows]


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    """The rows of every global batch a process reads when each holds an equal block, in process order (what
    `parallel.local_rows` gives for the 'data' mesh over equal processes)."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} does not divide by {process_count} processes")
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


def example_rng(seed: int, epoch: int, step: int, position: int) -> np.random.Generator:
    """The augmentation draws of the example at `position` of the global batch of (`epoch`, `step`)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), int(step),
                                                                       int(position), _STREAM])))


class ReadAugment:
    """grain's map: a position in this process's stream -> {"image": augmented uint8 HWC, "label": int32}.

    Position p is epoch p // per_epoch, step (p % per_epoch) // local, row p % local of this process's block; the
    epoch's shard is computed once per epoch per worker (a permutation of the split)."""

    def __init__(self, source, augment: host_augment.Augment, seed: int, n: int, global_batch: int, rows: slice):
        self.source, self.augment, self.seed, self.n, self.global_batch = source, augment, seed, n, global_batch
        self.rows = slice(rows.start, rows.stop)
        self.local = rows.stop - rows.start
        self.per_epoch = pipeline.num_train_steps(n, global_batch) * self.local
        self._cached: Tuple[int, Any] = (-1, None)

    def shard(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            self._cached = (epoch, epoch_shard(self.seed, epoch, self.n, self.global_batch, self.rows))
        return self._cached[1]

    def __call__(self, position: int) -> Dict[str, np.ndarray]:
        epoch, rest = divmod(int(position), self.per_epoch)
        step, row = divmod(rest, self.local)
        record = self.source[int(self.shard(epoch)[step, row])]
        rng = example_rng(self.seed, epoch, step, self.rows.start + row)
        return {"image": self.augment(np.asarray(record["image"], np.uint8), rng),
                "label": np.int32(record["label"])}

    def __getstate__(self):  # the shard cache stays behind (a worker computes its own)
        return {**self.__dict__, "_cached": (-1, None)}


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """How the stream reads: grain worker processes (0: none, reading in this process) and reading threads."""

    workers: int = 0
    read_threads: int = 16  # grain.ReadOptions' default
    prefetch: int = 2  # batches read ahead: by the threads (grain.ReadOptions.prefetch_buffer_size, at least one per
    # thread) and by each worker (grain.MultiprocessingOptions.per_worker_buffer_size)


def make_dataset(source, augment: host_augment.Augment, *, seed: int, n: int, global_batch: int, rows: slice,
                 num_epochs: int, settings: StreamSettings = StreamSettings()):
    """The grain IterDataset of this process's batches for epochs [0, num_epochs): {"image": uint8 [local, H, W, C],
    "label": int32 [local]}, full batches only."""
    import grain

    read = ReadAugment(source, augment, seed, n, global_batch, rows)
    local = read.local
    options = grain.ReadOptions(num_threads=settings.read_threads,
                                prefetch_buffer_size=max(settings.read_threads, settings.prefetch, 1))
    # Batched as a MapDataset (batch j = positions [j*local, (j+1)*local)) before it becomes an iterator: grain's
    # workers then take whole batches in turn, so a batch's content does not depend on the worker count.
    ds = (grain.MapDataset.range(num_epochs * read.per_epoch).map(read).batch(local, drop_remainder=True)
          .to_iter_dataset(options))
    if settings.workers > 0:
        from absl import flags  # grain's workers read its absl flags: their defaults where no program parsed them

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=settings.workers,
                                                         per_worker_buffer_size=settings.prefetch))
    return ds


class Stream:
    """This process's batches in order: `next()` -> (uint8 images [local, ...], int32 labels [local]); `state()` /
    `restore(state)` are grain's iterator state (JSON)."""

    def __init__(self, dataset, steps_per_epoch: int):
        self._iter = iter(dataset)
        self.steps_per_epoch = steps_per_epoch

    def next(self) -> Tuple[np.ndarray, np.ndarray]:
        batch = next(self._iter)
        return batch["image"], batch["label"]

    def state(self) -> Dict[str, Any]:
        return self._iter.get_state()

    def restore(self, state: Dict[str, Any]) -> None:
        self._iter.set_state(state)

    def close(self) -> None:
        """Stops grain's reading threads and worker processes."""
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


def resolve_pipeline(choice: str, split_bytes: int) -> str:
    """'device' or 'stream' for the config's choice ('auto': stream above AUTO_STREAM_BYTES of decoded split)."""
    if choice == "auto":
        return "stream" if split_bytes > AUTO_STREAM_BYTES else "device"
    return choice
