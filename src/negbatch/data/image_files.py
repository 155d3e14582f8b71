"""Image files as a split of an :class:`~negbatch.data.ImageDataset`:
:class:`ImageFiles` decodes its images with Pillow, batch by batch (in a
DataLoader's workers), at a fixed size. :mod:`negbatch.data.image_folder`
reads ImageFolder trees into it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .._checks import is_int
from ._files import DatasetDamagedError

__all__ = ["ImageFiles", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_CACHE_VERSION = 1


def _pillow():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("decoding image files needs Pillow: pip install 'negbatch[vision]' (or pip install Pillow)") from err
    return Image


def _side_pair(size: int | Sequence[int] | None, arg: str) -> tuple[int, int] | None:
    if size is None:
        return None
    if is_int(size):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or any(not is_int(s) or s < 1 for s in size):
        raise ValueError(f"{arg} must be a positive int or a (height, width) pair, got {size!r}")
    return int(size[0]), int(size[1])


class ImageFiles:
    """Image files read lazily: batched reads return uint8 tensors (b, C, H, W).

    Parameters
    ----------
    root : path
        Paths are relative to it (so the identity does not depend on where the
        folder is mounted).
    paths : sequence of str
        Relative paths, in index order.
    size : int or (height, width), optional
        Every image is resized to it when decoded. None: the first image's own
        size, which every other image must then have.
    channels : {3, 1}, default 3
        RGB, or greyscale.
    file_sizes : sequence of int, optional
        The files' sizes in bytes (for :meth:`fingerprint`); read from disk
        when not given.

    Examples
    --------
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from negbatch.data import ImageFiles
    >>> root = Path(tempfile.mkdtemp())
    >>> for i in range(3):
    ...     Image.new("RGB", (12, 10), (i, 2 * i, 3 * i)).save(root / f"{i}.png")
    >>> files = ImageFiles(root, ["0.png", "1.png", "2.png"], size=8)
    >>> files.shape, files[torch.tensor([2, 0])].shape, files[1:].shape
    ((3, 3, 8, 8), torch.Size([2, 3, 8, 8]), (2, 3, 8, 8))
    >>> files[torch.tensor([2])][0, :, 0, 0].tolist()
    [2, 4, 6]
    """

    def __init__(
        self,
        root: str | os.PathLike,
        paths: Sequence[str],
        *,
        size: int | Sequence[int] | None = None,
        channels: int = 3,
        file_sizes: Sequence[int] | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 3 (RGB) or 1 (greyscale), got {channels!r}")
        self.root = Path(root)
        self.paths = [str(p) for p in paths]
        if file_sizes is not None and len(file_sizes) != len(self.paths):
            raise ValueError(f"file_sizes has {len(file_sizes)} entries for {len(self.paths)} paths")
        self.file_sizes = None if file_sizes is None else [int(s) for s in file_sizes]
        self.channels = channels
        hw = _side_pair(size, "size")
        self.resize = hw is not None
        if hw is None:
            if not self.paths:
                raise ValueError("size is needed for an empty ImageFiles (no image to take it from)")
            first = self.root / self.paths[0]
            try:
                with _pillow().open(first) as im:
                    hw = (im.height, im.width)
            except (OSError, ValueError, SyntaxError) as err:  # Pillow's UnidentifiedImageError is an OSError
                raise DatasetDamagedError(f"{first} cannot be decoded as an image: {err}") from None
        self.size: tuple[int, int] = hw

    # -------------------------------------------------------------- shape
    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.channels, *self.size)

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files under {self.root}, decoded to {self.shape[1:]})"

    def _like(self, paths: list[str], sizes: list[int] | None) -> "ImageFiles":
        new = object.__new__(ImageFiles)
        new.root, new.paths, new.file_sizes = self.root, paths, sizes
        new.channels, new.size, new.resize = self.channels, self.size, self.resize
        return new

    # ------------------------------------------------------------ reading
    def __getitem__(self, key):
        """An int: one image (C, H, W). A slice: a lazy ImageFiles. Indices
        (a LongTensor, list or array): :meth:`read`."""
        if isinstance(key, slice):
            sizes = None if self.file_sizes is None else self.file_sizes[key]
            return self._like(self.paths[key], sizes)
        if is_int(key):
            return self.read(torch.tensor([key]))[0]
        return self.read(key)

    def read(self, indices) -> Tensor:
        """Decode the images at ``indices`` into a uint8 tensor (b, C, H, W)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(self.paths)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"indices must lie in [0, {n}), got {idx.min().item()}..{idx.max().item()}")
        h, w = self.size
        out = np.empty((idx.numel(), h, w, self.channels), dtype=np.uint8)
        for row, i in enumerate(idx.tolist()):
            out[row] = self.decode(i)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def decode(self, i: int) -> np.ndarray:
        """One image as a uint8 array (H, W, C)."""
        Image = _pillow()
        path = self.root / self.paths[i]
        h, w = self.size
        try:
            with Image.open(path) as im:
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                    # Pillow's conversion to 8 bits clips these (a 16-bit 40000 becomes 255) instead of scaling.
                    raise ValueError(f"it has {im.mode} pixels (16-bit or float), which decode to 8 bits only by "
                                     "clipping; convert the data set to 8-bit images first")
                if self.resize and im.size != (w, h):
                    # JPEG: decode at the smallest DCT scale still >= the target (much faster)
                    im.draft("RGB" if self.channels == 3 else "L", (w, h))
                im = im.convert("RGB" if self.channels == 3 else "L")
                if im.size != (w, h):
                    if not self.resize:
                        raise ValueError(
                            f"it is {im.width}x{im.height} but the first image is {w}x{h}; images of different "
                            "sizes need a decode size (decode_size=, or size= to resize once; in the lab --decode-size "
                            "or --image-size)")
                    shrink = im.width >= w and im.height >= h
                    im = im.resize((w, h), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as err:
            raise DatasetDamagedError(f"{path} cannot be decoded as an image: {err}") from None
        return a if a.ndim == 3 else a[:, :, None]

    # ------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """sha256 over the relative paths, the files' sizes and the decoding
        (not their modification times: a copy of the same files is the same
        data set, and a run on it resumes)."""
        sizes = self.file_sizes
        if sizes is None:
            sizes = [(self.root / p).stat().st_size for p in self.paths]
        h = hashlib.sha256(f"negbatch.ImageFiles v1 {self.channels} {self.size} {self.resize}\0".encode())
        for p, s in zip(self.paths, sizes):
            h.update(f"{p}\0{s}\n".encode())
        return h.hexdigest()

    def concat(self, other: "ImageFiles") -> "ImageFiles":
        """These files followed by ``other``'s (same channels and size)."""
        if (other.channels, other.size, other.resize) != (self.channels, self.size, self.resize):
            raise ValueError("cannot join ImageFiles decoded to different shapes")
        root = Path(os.path.commonpath([self.root.resolve(), other.root.resolve()]))

        def rel(files: ImageFiles) -> list[str]:
            base = files.root.resolve().relative_to(root)
            return [(base / p).as_posix() for p in files.paths]

        sizes = None
        if self.file_sizes is not None and other.file_sizes is not None:
            sizes = self.file_sizes + other.file_sizes
        new = self._like(rel(self) + rel(other), sizes)
        new.root = root
        return new


# ---------------------------------------------------------------- ImageFolder
