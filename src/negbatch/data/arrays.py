"""A user's images from ``.npz`` / ``.npy`` files (``load_dataset("npz", path)``,
``--dataset npz --data-dir path``).

* ``.npz`` with labeled images: ``x_train`` and ``y_train``, and optionally
  ``x_test`` and ``y_test`` (without them a seeded, stratified ``test_fraction``
  of the training images is held out) and ``x_unlabeled`` (images for
  pre-training only). ``images`` / ``labels`` / ``unlabeled`` are accepted as
  other names for ``x_train`` / ``y_train`` / ``x_unlabeled``.
* ``.npz`` with only ``x_unlabeled`` (or ``images`` without ``labels``), or a
  ``.npy`` file of images: unlabeled images only. Pre-training works; the
  linear and kNN probes need labels, so a run without them reports none.

Images: (N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 or 3 (a 4-D array
whose second axis is 1 or 3 is read as channels-first). uint8 stays uint8 in
memory; other integer arrays must lie in [0, 255]; float arrays must lie in
[0, 1] and become float32. Labels: non-negative integers. Files are read
with ``allow_pickle=False``: an object array (which could run code) is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._files import DatasetDamagedError, DatasetNotFoundError
from .images import ImageDataset, _stratified_indices

__all__ = ["load_arrays"]

_ALIASES = {"images": "x_train", "labels": "y_train", "unlabeled": "x_unlabeled"}
_KEYS = ("x_train", "y_train", "x_test", "y_test", "x_unlabeled")


def _images(a: np.ndarray, where: str) -> Tensor:
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[1] not in (1, 3) and a.shape[3] in (1, 3):
        a = a.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ValueError(f"{where} must be images (N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 or 3, got {a.shape}")
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a))
    if a.dtype == np.bool_:  # binary images: True is white (as 1.0 is in a float image)
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8) * np.uint8(255))
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{where}: integer images must lie in [0, 255], got {a.min()}..{a.max()}")
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))
    if np.issubdtype(a.dtype, np.floating):
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise ValueError(f"{where}: float images must be finite and lie in [0, 1] (store uint8, or divide by 255)")
        return torch.from_numpy(a)
    raise TypeError(f"{where} must be an integer or float array, got dtype {a.dtype}")


def _labels(a: np.ndarray, n: int, where: str) -> Tensor:
    # uint64 labels past int64's range would turn negative in the cast below.
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer) or (n and (a.min() < 0 or
                                                                       a.max() > np.iinfo(np.int64).max)):
        raise ValueError(f"{where} must be {n} non-negative integer labels (one per image), got shape {a.shape} dtype {a.dtype}")
    return torch.from_numpy(a.astype(np.int64))


def load_arrays(path: str | os.PathLike, *, test_fraction: float = 0.2, name: str | None = None) -> ImageDataset:
    """Load a user's images (and labels) from a ``.npz`` or ``.npy`` file.

    See the module docstring for the keys and shapes accepted.

    Parameters
    ----------
    path : path to a ``.npz`` or ``.npy`` file
    test_fraction : float in (0, 1), default 0.2
        Held out (seeded, stratified) when the file has no ``x_test``.
    name : str, optional
        Default: the file name without its suffix.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from negbatch.data import load_arrays
    >>> path = Path(tempfile.mkdtemp()) / "mine.npz"
    >>> rng = np.random.default_rng(0)
    >>> np.savez(path, images=rng.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8), labels=np.arange(20) % 2)
    >>> ds = load_arrays(path)
    >>> ds.name, ds.x_train.dtype, tuple(ds.x_train.shape), tuple(ds.x_test.shape)
    ('mine', torch.uint8, (16, 3, 8, 8), (4, 3, 8, 8))
    >>> np.save(path.with_suffix(".npy"), rng.random((5, 8, 8)))
    >>> unl = load_arrays(path.with_suffix(".npy"))
    >>> unl.has_labels, tuple(unl.x_unlabeled.shape)
    (False, (5, 1, 8, 8))
    """
    path = Path(path).expanduser()
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DatasetNotFoundError(f"{path} {what}; expected a .npz file (x_train, y_train, optional x_test, "
                                   "y_test, x_unlabeled) or a .npy file of images")
    if path.suffix not in (".npz", ".npy"):
        raise ValueError(f"{path} must be a .npz or .npy file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and magic[:4] != b"PK\x03\x04":
        raise DatasetDamagedError(f"{path} cannot be read as numpy arrays: it is neither a .npy nor a .npz file "
                                  "(write it with numpy.save / numpy.savez)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raw = [("x_unlabeled", loaded)]
        else:
            with loaded:
                raw = [(key, loaded[key]) for key in loaded.files]
    except ValueError as err:
        if "Object arrays" in str(err) or "allow_pickle" in str(err):
            raise DatasetDamagedError(f"{path} holds an object array (a pickle); store plain numeric arrays") from None
        raise DatasetDamagedError(f"{path} cannot be read as numpy arrays: {err}") from None
    except Exception as err:  # a damaged zip or header fails in many ways; each is reported the same
        raise DatasetDamagedError(f"{path} cannot be read as numpy arrays: {err}") from None
    arrays: dict[str, np.ndarray] = {}
    for key, a in raw:
        k = _ALIASES.get(key, key)
        if k in arrays:
            raise ValueError(f"{path} holds both {key!r} and {k!r}; keep one")
        arrays[k] = a
    unknown = sorted(set(arrays) - set(_KEYS))
    if unknown:
        raise ValueError(f"{path} holds unknown arrays {unknown}; expected x_train, y_train, x_test, y_test, "
                         "x_unlabeled (or images, labels, unlabeled)")
    if "y_train" in arrays and "x_train" not in arrays:
        raise ValueError(f"{path} holds labels but no images (x_train / images)")
    if "x_train" in arrays and "y_train" not in arrays:
        if "x_unlabeled" in arrays:
            raise ValueError(f"{path}: x_train has no y_train; without labels store the images as x_unlabeled")
        arrays["x_unlabeled"] = arrays.pop("x_train")
    if ("x_test" in arrays) != ("y_test" in arrays) or ("x_test" in arrays and "x_train" not in arrays):
        raise ValueError(f"{path}: x_test and y_test go together, and with x_train and y_train")
    if "x_train" not in arrays and "x_unlabeled" not in arrays:
        raise ValueError(f"{path} holds no images; expected x_train and y_train, or x_unlabeled")

    unl = _images(arrays["x_unlabeled"], f"{path}:x_unlabeled") if "x_unlabeled" in arrays else None
    if "x_train" in arrays:
        xtr = _images(arrays["x_train"], f"{path}:x_train")
        if len(xtr) == 0:
            raise ValueError(f"{path}:x_train holds no images; store labelled images there, or leave x_train out and "
                             f"give only x_unlabeled")
        ytr = _labels(arrays["y_train"], len(xtr), f"{path}:y_train")
        if "x_test" in arrays:
            xte = _images(arrays["x_test"], f"{path}:x_test")
            yte = _labels(arrays["y_test"], len(xte), f"{path}:y_test")
        else:
            train, test = _stratified_indices(ytr.numpy(), test_fraction)
            if len(train) == 0 or len(test) == 0:
                raise ValueError(
                    f"{path}: test_fraction={test_fraction} of {len(ytr)} labelled images (rounded per class) leaves "
                    f"{len(train)} training and {len(test)} test images; store x_test and y_test, or use more images "
                    "or another test_fraction"
                )
            train_t, test_t = torch.from_numpy(train), torch.from_numpy(test)
            xtr, ytr, xte, yte = xtr[train_t], ytr[train_t], xtr[test_t], ytr[test_t]
        for arg, x in (("x_test", xte), ("x_unlabeled", unl)):
            if x is not None and (x.dtype != xtr.dtype or x.shape[1:] != xtr.shape[1:]):
                raise ValueError(f"{path}: {arg} is {x.dtype} {tuple(x.shape[1:])} but x_train is "
                                 f"{xtr.dtype} {tuple(xtr.shape[1:])}; store them alike")
    else:
        empty = unl.new_zeros((0, *unl.shape[1:]))
        xtr, xte = empty, empty.clone()
        ytr, yte = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return ImageDataset(name or path.stem, xtr, ytr, xte, yte, unl, source=str(path))
