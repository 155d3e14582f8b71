"""Every image data set by name: :func:`load_dataset` and :data:`DATASETS`.

(Above the loaders, which import :class:`~negbatch.data.ImageDataset` from
:mod:`negbatch.data.images`: a registry there would close an import circle.)
"""

from __future__ import annotations

import os
from typing import Any

from .images import ImageDataset, load_digits, load_fashion_mnist, load_mnist5k

__all__ = ["DATASETS", "load_dataset"]

DATASETS = ("digits", "fashion-mnist", "mnist5k", "cifar10", "cifar100", "stl10", "imagefolder", "npz")
"""Names :func:`load_dataset` accepts."""


def _needs_dir(name: str, data_dir: object, what: str) -> None:
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir (--data-dir): {what}")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **options: Any) -> ImageDataset:
    """Load a data set by name: one of :data:`DATASETS`.

    Parameters
    ----------
    name : str
        ``digits``, ``fashion-mnist``, ``mnist5k`` (built in or installed);
        ``cifar10``, ``cifar100``, ``stl10``, ``imagefolder`` (a folder in the
        data set's standard format, see :func:`~negbatch.data.load_cifar10`,
        :func:`~negbatch.data.load_cifar100`, :func:`~negbatch.data.load_stl10`,
        :func:`~negbatch.data.load_image_folder`); ``npz``: the user's arrays,
        ``data_dir`` being the ``.npz`` or ``.npy`` file (see
        :func:`~negbatch.data.load_arrays`).
    data_dir : path, optional
        The folder (or, for ``npz``, the file). Needed by all but digits and
        mnist5k; Fashion-MNIST defaults to Debian's install folder.
    **options
        Passed to the loader: ``labels="coarse"`` for cifar100,
        ``unlabeled=False`` for stl10, ``size=64`` / ``decode_size`` /
        ``cache_dir`` / ``num_workers`` for imagefolder, ``test_fraction`` for npz.

    Examples
    --------
    >>> from negbatch.data import load_dataset
    >>> ds = load_dataset("digits")
    >>> ds.x_train.shape, ds.x_test.shape
    (torch.Size([1258, 1, 8, 8]), torch.Size([539, 1, 8, 8]))
    """
    if options and name in ("digits", "fashion-mnist", "mnist5k"):
        raise TypeError(f"dataset {name!r} takes no options, got {sorted(options)}")
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "mnist5k":
        return load_mnist5k()
    if name in ("cifar10", "cifar100"):
        from .cifar import CIFAR_URLS, load_cifar10, load_cifar100

        _needs_dir(name, data_dir, f"the folder holding the python batches (download {CIFAR_URLS[name]} and unpack it)")
        return load_cifar10(data_dir, **options) if name == "cifar10" else load_cifar100(data_dir, **options)
    if name == "stl10":
        from .stl10 import STL10_URL, load_stl10

        _needs_dir(name, data_dir, f"the folder holding train_X.bin and the other binary files (download {STL10_URL})")
        return load_stl10(data_dir, **options)
    if name == "imagefolder":
        from .image_folder import load_image_folder

        _needs_dir(name, data_dir, "the root folder holding train/ and val/ with one sub-folder per class")
        return load_image_folder(data_dir, **options)
    if name == "npz":
        from .arrays import load_arrays

        _needs_dir(name, data_dir, "the .npz or .npy file of images (and labels)")
        return load_arrays(data_dir, **options)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
