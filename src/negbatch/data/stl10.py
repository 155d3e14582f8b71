"""STL-10 from its binary files.

The official archive (``stl10_binary.tar.gz``) unpacks to ``stl10_binary/``
with ``train_X.bin`` / ``train_y.bin`` (5,000 labeled images),
``test_X.bin`` / ``test_y.bin`` (8,000) and ``unlabeled_X.bin`` (100,000),
plus ``class_names.txt``. Each image is 3 x 96 x 96 bytes: the red, green and
blue planes, each stored column by column (column-major, as MATLAB writes
arrays). Labels are one byte each, 1 to 10.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ._files import find_folder, missing_files
from .images import ImageDataset

__all__ = ["load_stl10", "STL10_URL"]

STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
_SIDE = 96
_IMAGE_BYTES = 3 * _SIDE * _SIDE
_FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"]


def _read_images(path: Path, folder: Path, chunk: int = 4096) -> np.ndarray:
    size = path.stat().st_size
    if size % _IMAGE_BYTES:
        raise missing_files(folder, "stl10", _FILES, STL10_URL,
                            damaged=f"{path.name} holds {size} bytes, not a whole number of {_IMAGE_BYTES}-byte images")
    n = size // _IMAGE_BYTES
    if n == 0:
        raise missing_files(folder, "stl10", _FILES, STL10_URL, damaged=f"{path.name} is empty")
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 3, _SIDE, _SIDE))
    out = np.empty((n, 3, _SIDE, _SIDE), dtype=np.uint8)
    # Column-major planes: the file's third axis is the column, the fourth the
    # row; swap them into (row, column). Chunked so that the 100,000 unlabeled
    # images are never held twice.
    for start in range(0, n, chunk):
        out[start : start + chunk] = raw[start : start + chunk].transpose(0, 1, 3, 2)
    del raw
    return out


def _read_labels(path: Path, folder: Path, n: int) -> np.ndarray:
    y = np.fromfile(path, dtype=np.uint8)
    if len(y) != n or (n and (y.min() < 1 or y.max() > 10)):
        held = f"{len(y)}" if len(y) != n else f"{n} in {int(y.min())}..{int(y.max())}"
        raise missing_files(folder, "stl10", _FILES, STL10_URL,
                            damaged=f"{path.name} should hold {n} labels in 1..10 (one byte per image), "
                                    f"holds {held}")
    return y.astype(np.int64) - 1


def load_stl10(root: str | os.PathLike, unlabeled: bool = True) -> ImageDataset:
    """STL-10: uint8 (N, 3, 96, 96) images, 5,000 train / 8,000 test, and the
    100,000 unlabeled images as ``x_unlabeled``.

    Parameters
    ----------
    root : path
        The folder holding ``train_X.bin`` and the other binary files — or its
        parent, where the official archive unpacked ``stl10_binary``.
    unlabeled : bool, default True
        Read ``unlabeled_X.bin`` (2.8 GB in memory) too.

    Raises
    ------
    DatasetNotFoundError
        A file is missing (names the folder, the files and the download URL).
    DatasetDamagedError
        A file's size does not fit the format.

    Examples
    --------
    See docs/images.md, which writes tiny STL-10 files and loads them.
    """
    if not isinstance(unlabeled, bool):
        raise TypeError(f"unlabeled must be True or False, got {unlabeled!r}")
    folder = find_folder(root, "stl10_binary", "train_X.bin")
    needed = _FILES if unlabeled else _FILES[:4]
    if any(not (folder / f).is_file() for f in needed):
        raise missing_files(folder, "stl10", needed, STL10_URL)
    x_train = _read_images(folder / "train_X.bin", folder)
    x_test = _read_images(folder / "test_X.bin", folder)
    y_train = _read_labels(folder / "train_y.bin", folder, len(x_train))
    y_test = _read_labels(folder / "test_y.bin", folder, len(x_test))
    x_unl = torch.from_numpy(_read_images(folder / "unlabeled_X.bin", folder)) if unlabeled else None
    names = folder / "class_names.txt"
    classes = None
    if names.is_file():
        lines = [line.strip() for line in names.read_text(errors="replace").splitlines() if line.strip()]
        classes = tuple(lines) if len(lines) == 10 else None
    return ImageDataset(
        "stl10",
        torch.from_numpy(x_train),
        torch.from_numpy(y_train),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
        x_unl,
        source=str(folder),
        classes=classes,
    )
