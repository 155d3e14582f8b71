"""Data sets (small greyscale images; text pairs in :mod:`negbatch.data.text`) and batched
two-view augmentations."""

from .augment import Augment, two_views
from .images import (
    DATASETS,
    FASHION_MNIST_DIR,
    ImageDataset,
    from_arrays,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist5k,
    read_idx,
)

__all__ = [
    "Augment",
    "two_views",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "ImageDataset",
    "from_arrays",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist5k",
    "read_idx",
]
