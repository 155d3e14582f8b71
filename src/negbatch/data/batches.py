"""Whole batches of images through a torch DataLoader, and their conversion on the device.

:class:`ImageBatches` implements torch's batched-fetch hook ``__getitems__``:
given a list of indices it returns the whole batch ``(images, labels,
indices)`` in one call — one tensor index for in-memory images, no per-item
Python work — and for :class:`~negbatch.data.ImageFiles` it decodes the files
(in the DataLoader's worker processes when there are any). Give the DataLoader
a ``batch_sampler`` (any of negbatch's samplers) and :func:`keep_batch` as
``collate_fn``; :func:`image_batch_loader` does both.

Images travel as they are stored (uint8 for CIFAR/STL/files: a quarter of
float32's bytes) and become float32 in [0, 1] on the device with
:func:`to_float_images`.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .._checks import is_int
from .images import Images, _is_files

__all__ = ["ImageBatches", "keep_batch", "image_batch_loader", "to_float_images"]


class ImageBatches(Dataset):
    """A Dataset whose batched fetch returns ``(images, labels, indices)``.

    Parameters
    ----------
    images : Tensor (N, C, H, W) or ImageFiles
        float32 or uint8 tensors are indexed in memory; files are decoded.
    labels : int64 Tensor (N,), optional
        None: every label is -1 (unlabeled images).

    Examples
    --------
    >>> import torch
    >>> from negbatch.data import ImageBatches
    >>> x = torch.arange(5, dtype=torch.uint8).reshape(5, 1, 1, 1)
    >>> images, labels, idx = ImageBatches(x, torch.tensor([0, 1, 0, 1, 0])).__getitems__([4, 1])
    >>> images.flatten().tolist(), labels.tolist(), idx.tolist()
    ([4, 1], [0, 1], [4, 1])
    """

    def __init__(self, images: Images, labels: Tensor | None = None) -> None:
        if not (_is_files(images) or (isinstance(images, Tensor) and images.ndim == 4)):
            raise TypeError(f"images must be a tensor (N, C, H, W) or ImageFiles, got {getattr(images, 'shape', type(images))}")
        n = len(images)
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.int64)
        if not isinstance(labels, Tensor) or labels.shape != (n,):
            raise ValueError(f"labels must be a tensor of shape ({n},) (one per image), got {getattr(labels, 'shape', type(labels))}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self.images.read(idx) if _is_files(self.images) else self.images[idx]
        return images, self.labels[idx], idx

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        images, labels, idx = self.__getitems__([index])
        return images[0], labels[0], idx[0]


def keep_batch(batch: Any) -> Any:
    """A DataLoader ``collate_fn`` that passes :meth:`ImageBatches.__getitems__`'s
    batch through unchanged (module-level, so worker processes can pickle it)."""
    return batch


def image_batch_loader(
    images: Images,
    labels: Tensor | None,
    batch_sampler: Iterable[Sequence[int]],
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader yielding ``(images, labels, indices)`` for each batch of
    ``batch_sampler`` (lists of indices), in its order.

    Decoding and indexing happen in ``num_workers`` processes; the order and
    content of batches do not depend on the number of workers.

    Examples
    --------
    >>> import torch
    >>> from negbatch.data import image_batch_loader
    >>> x = torch.rand(10, 3, 4, 4)
    >>> batches = [[0, 1, 2], [9, 8, 7]]
    >>> [idx.tolist() for _, _, idx in image_batch_loader(x, None, batches)]
    [[0, 1, 2], [9, 8, 7]]
    """
    if not is_int(num_workers) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    num_workers = int(num_workers)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        ImageBatches(images, labels),
        batch_sampler=batch_sampler,
        collate_fn=keep_batch,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Every iterator draws a base seed for its workers: from its own generator, not torch's
        # global one, which a resumed epoch (a new iterator) would otherwise advance once more.
        # Decoding draws no random numbers, so a fixed seed changes nothing else.
        generator=torch.Generator().manual_seed(0),
        **extra,
    )


def to_float_images(x: Tensor, device: torch.device | str | None = None, *, non_blocking: bool = False) -> Tensor:
    """Images as float32 in [0, 1] on ``device``: uint8 is moved first (a quarter
    of the bytes), then divided by 255 there; float32 is only moved.

    Examples
    --------
    >>> import torch
    >>> from negbatch.data import to_float_images
    >>> to_float_images(torch.tensor([0, 51, 255], dtype=torch.uint8)).tolist()
    [0.0, 0.20000000298023224, 1.0]
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        return x.to(device, non_blocking=non_blocking).float().div_(255.0)
    if x.dtype == torch.float32:
        return x.to(device, non_blocking=non_blocking)
    raise TypeError(f"x must be uint8 in [0, 255] or float32 in [0, 1], got {x.dtype}")
