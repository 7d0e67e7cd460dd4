"""Datasets and batches: IDX files, Fashion-MNIST and MNIST, downloads, mini-batches."""

from scratchnn.data.batches import iterate_minibatches, minibatch_rows
from scratchnn.data.datasets import (
    FASHION_MNIST_CLASSES,
    find_dataset_files,
    load_fashion_mnist,
    load_mnist,
)
from scratchnn.data.download import DATASET_NAMES, default_cache_dir, download_dataset
from scratchnn.data.idx import read_idx

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "default_cache_dir",
    "download_dataset",
    "find_dataset_files",
    "iterate_minibatches",
    "load_fashion_mnist",
    "load_mnist",
    "minibatch_rows",
    "read_idx",
]
