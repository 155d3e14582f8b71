"""CIFAR-10 and CIFAR-100 from their "python version" batches.

The official archives (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``)
unpack to a folder of pickles written by Python 2: each batch is a dict whose
``data`` is a uint8 array (n, 3072) — the red, green and blue 32x32 planes of
each image, row-major — and whose labels are a list of ints.

Pickles can run code when loaded, so these files are read with a restricted
unpickler that admits only what the format holds: dicts, lists, strings,
bytes, ints and numpy arrays (the numpy globals that rebuild an array, at
any protocol, and ``_codecs.encode`` for latin-1 only, as a fresh function
per use, so that a file's BUILD opcode cannot change it for the next file).
A planted file naming any other global (``os.system``, say) is refused with a
:class:`~negbatch.data.DatasetDamagedError` naming the file, before anything
runs.
"""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._files import DatasetDamagedError, find_folder, missing_files
from .images import ImageDataset

__all__ = ["load_cifar10", "load_cifar100", "read_cifar_pickle", "CIFAR_URLS"]

CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
_CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
_CIFAR100_FILES = ["train", "test", "meta"]


def _numpy_reconstruct():
    core = getattr(np, "_core", None)  # numpy >= 2; numpy.core before (deprecated alias after)
    return (core if core is not None else np.core).multiarray


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(str, 'latin1');
    # admitting only that codec keeps the global harmless.
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _frombuffer():
    core = getattr(np, "_core", None)
    return (core if core is not None else np.core).numeric._frombuffer


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled numpy array needs (protocol 5
    rebuilds one from its buffer with ``_frombuffer``)."""

    _multiarray = _numpy_reconstruct()
    ALLOWED = {
        ("numpy.core.numeric", "_frombuffer"): _frombuffer(),
        ("numpy._core.numeric", "_frombuffer"): _frombuffer(),
        ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
        ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            # A fresh function for each use: a BUILD opcode can set a function's attributes
            # (its defaults), which on a shared one would outlive this file.
            def encode(text: str, encoding: str = "latin1") -> bytes:
                return _latin1_encode(text, encoding)

            return encode
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it names the global {module}.{name}, which a CIFAR batch never holds (only numpy arrays, "
                "lists, dicts, strings and ints); refused without running it"
            ) from None


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Read one CIFAR python batch safely; keys come back as ``str``.

    Python 2 strings are decoded as latin-1 (so the original files' keys are
    ``str``); keys stored as ``bytes`` are decoded too.

    Raises
    ------
    DatasetDamagedError
        The file is not a pickled dict, is cut short, or names a global outside
        the allowed numpy ones (message names the file).

    Examples
    --------
    >>> import pickle, tempfile, numpy as np
    >>> from pathlib import Path
    >>> from negbatch.data import read_cifar_pickle
    >>> p = Path(tempfile.mkdtemp()) / "batch"
    >>> _ = p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 5]}, protocol=2))
    >>> d = read_cifar_pickle(p)
    >>> sorted(d), d["data"].shape
    (['data', 'labels'], (2, 3072))
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except Exception as err:  # a damaged pickle fails in many ways; each is reported the same
        raise DatasetDamagedError(f"{path} cannot be read as a CIFAR python batch: {err}") from None
    if not isinstance(obj, dict):
        raise DatasetDamagedError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR python batch")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_batch(path: Path, label_key: str, dataset: str, expected: list[str],
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    url = CIFAR_URLS[dataset]
    try:
        d = read_cifar_pickle(path)
    except DatasetDamagedError as err:
        raise missing_files(path.parent, dataset, expected, url, damaged=str(err)) from None
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise missing_files(path.parent, dataset, expected, url,
                            damaged=f"{path.name}'s 'data' should be a uint8 array (n, 3072), got {got}")
    labels = np.asarray(labels) if labels is not None else None
    if labels is None or labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer) \
            or (len(labels) and (labels.min() < 0 or labels.max() >= num_classes)):
        raise missing_files(path.parent, dataset, expected, url,
                            damaged=f"{path.name}'s {label_key!r} should hold {len(data)} int labels in "
                                    f"0..{num_classes - 1}")
    # Each row is the R, G and B planes of a 32x32 image, each plane row-major.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _names(folder: Path, meta: str, key: str, dataset: str, expected: list[str]) -> tuple[str, ...] | None:
    path = folder / meta
    if not path.exists():
        return None
    try:
        names = read_cifar_pickle(path).get(key)
    except DatasetDamagedError as err:
        raise missing_files(folder, dataset, expected, CIFAR_URLS[dataset], damaged=str(err)) from None
    if not isinstance(names, list):
        return None
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


def _assemble(name: str, folder: Path, train: list, test: tuple, classes) -> ImageDataset:
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    if classes is not None and max(int(y_train.max(initial=0)), int(test[1].max(initial=0))) >= len(classes):
        classes = None  # labels outside the names: do not pretend to know them
    return ImageDataset(
        name,
        torch.from_numpy(np.ascontiguousarray(x_train)),
        torch.from_numpy(y_train),
        torch.from_numpy(np.ascontiguousarray(test[0])),
        torch.from_numpy(test[1]),
        source=str(folder),
        classes=classes,
    )


def load_cifar10(root: str | os.PathLike) -> ImageDataset:
    """CIFAR-10 (50,000 train / 10,000 test images, uint8 (N, 3, 32, 32)).

    Parameters
    ----------
    root : path
        The folder holding ``data_batch_1`` ... ``data_batch_5``, ``test_batch``
        and ``batches.meta`` — or its parent, where the official archive
        unpacked ``cifar-10-batches-py``.

    Raises
    ------
    DatasetNotFoundError
        A file is missing (names the folder, the files and the download URL).
    DatasetDamagedError
        A file cannot be read, or is refused as unsafe.

    Examples
    --------
    See docs/images.md, which writes a tiny CIFAR folder and loads it.
    """
    folder = find_folder(root, "cifar-10-batches-py", "test_batch")
    needed = [f for f in _CIFAR10_FILES if f != "batches.meta"]
    if any(not (folder / f).is_file() for f in needed):
        raise missing_files(folder, "cifar10", _CIFAR10_FILES, CIFAR_URLS["cifar10"])
    train = [_read_batch(folder / f, "labels", "cifar10", _CIFAR10_FILES, 10) for f in needed[:-1]]
    test = _read_batch(folder / "test_batch", "labels", "cifar10", _CIFAR10_FILES, 10)
    classes = _names(folder, "batches.meta", "label_names", "cifar10", _CIFAR10_FILES)
    return _assemble("cifar10", folder, train, test, classes)


def load_cifar100(root: str | os.PathLike, labels: str = "fine") -> ImageDataset:
    """CIFAR-100 (50,000 train / 10,000 test images, uint8 (N, 3, 32, 32)).

    Parameters
    ----------
    root : path
        The folder holding ``train``, ``test`` and ``meta`` — or its parent,
        where the official archive unpacked ``cifar-100-python``.
    labels : {"fine", "coarse"}, default "fine"
        The 100 classes, or the 20 superclasses.

    Raises
    ------
    DatasetNotFoundError, DatasetDamagedError
        As :func:`load_cifar10`.

    Examples
    --------
    See docs/images.md.
    """
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' (100 classes) or 'coarse' (20 superclasses), got {labels!r}")
    folder = find_folder(root, "cifar-100-python", "test")
    if any(not (folder / f).is_file() for f in ("train", "test")):
        raise missing_files(folder, "cifar100", _CIFAR100_FILES, CIFAR_URLS["cifar100"])
    key = f"{labels}_labels"
    count = 100 if labels == "fine" else 20
    train = [_read_batch(folder / "train", key, "cifar100", _CIFAR100_FILES, count)]
    test = _read_batch(folder / "test", key, "cifar100", _CIFAR100_FILES, count)
    classes = _names(folder, "meta", f"{labels}_label_names", "cifar100", _CIFAR100_FILES)
    return _assemble("cifar100" if labels == "fine" else "cifar100-coarse", folder, train, test, classes)
