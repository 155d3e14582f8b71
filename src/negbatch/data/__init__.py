"""Data sets (greyscale and RGB images; text pairs in :mod:`negbatch.data.text`),
streaming them in batches, and batched two-view augmentations."""

from ._files import DatasetDamagedError, DatasetNotFoundError
from .arrays import load_arrays
from .augment import Augment, two_views
from .batches import ImageBatches, image_batch_loader, keep_batch, to_float_images
from .cifar import load_cifar10, load_cifar100, read_cifar_pickle
from .image_files import ImageFiles
from .image_folder import load_image_folder
from .images import (
    FASHION_MNIST_DIR,
    ImageDataset,
    from_arrays,
    load_digits,
    load_fashion_mnist,
    load_mnist5k,
    read_idx,
)
from .registry import DATASETS, load_dataset
from .simclr_augment import CHANNEL_STATS, SimCLRAugment, channel_stats, normalize_images
from .stl10 import load_stl10

__all__ = [
    "Augment",
    "two_views",
    "SimCLRAugment",
    "CHANNEL_STATS",
    "channel_stats",
    "normalize_images",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "ImageDataset",
    "ImageFiles",
    "ImageBatches",
    "image_batch_loader",
    "keep_batch",
    "to_float_images",
    "DatasetNotFoundError",
    "DatasetDamagedError",
    "from_arrays",
    "load_arrays",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_image_folder",
    "load_mnist5k",
    "load_stl10",
    "read_cifar_pickle",
    "read_idx",
]
