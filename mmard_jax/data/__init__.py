"""Data for mmard_jax: whole splits of CIFAR-10/100 (CIFAR's python pickles or a prepared tensorflow-datasets
copy, neither needing TensorFlow), SVHN (the official .mat files or a tfds copy), Tiny-ImageNet-200 (the official
zip or its folder, decoded once and cached) or scikit-learn's bundled digits, loaded into memory as uint8 NHWC so the
trainer can put them on the device once; on-device augmentation (random crop after zero padding, horizontal
flip) as a pure jittable function; and the example order: a deterministic shuffle keyed by (seed, epoch)
that drops the last partial training batch.
"""

from mmard_jax.data.augment import augment, to_float
from mmard_jax.data.cifar import DatasetFormatError
from mmard_jax.data.datasets import (
    CLASS_ORDERS,
    DATASET_SOURCES,
    DATASETS,
    SOURCES,
    SPLITS,
    Dataset,
    DatasetNotFoundError,
    default_data_dir,
    load_dataset,
)
from mmard_jax.data.pipeline import (
    epoch_permutation,
    num_train_steps,
    train_batch_indices,
)

__all__ = [
    "CLASS_ORDERS",
    "DATASET_SOURCES",
    "DATASETS",
    "SOURCES",
    "SPLITS",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "augment",
    "default_data_dir",
    "epoch_permutation",
    "load_dataset",
    "num_train_steps",
    "to_float",
    "train_batch_indices",
]
