"""Representations of a whole data split, computed batch by batch."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._checks import check_positive_int

__all__ = ["extract_features"]


@torch.no_grad()
def extract_features(
    model_fn: Callable[[Tensor], Tensor],
    images,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    *,
    preprocess: Callable[[Tensor], Tensor] | None = None,
    num_workers: int = 0,
    out_device: torch.device | str = "cpu",
) -> Tensor:
    """``model_fn`` applied to every image, streamed in batches; float32 (N, d).

    Only one batch of images is on ``device`` at a time, and the features are
    collected on ``out_device`` (the CPU by default), so neither the images nor
    the features have to fit on the accelerator.

    Parameters
    ----------
    model_fn : callable
        Float images (b, C, H, W) in [0, 1] (after ``preprocess``) on
        ``device`` -> features (b, d). Put a module in eval mode first.
    images : Tensor (N, C, H, W) or ImageFiles
        float32 in [0, 1] or uint8 (converted on the device), or files
        (decoded in ``num_workers`` processes).
    batch_size : int, default 512
    device : device, optional
        Where ``model_fn`` runs; None: where ``images`` are.
    preprocess : callable, optional
        Applied to each float batch on the device before ``model_fn``
        (normalisation, say: ``lambda x: normalize_images(x, "cifar10")``).
    num_workers : int, default 0
        DataLoader workers reading the batches.
    out_device : device, default "cpu"

    Examples
    --------
    >>> import torch
    >>> from negbatch.evaluation import extract_features
    >>> x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    >>> f = extract_features(lambda b: b.mean(dim=(2, 3)), x, batch_size=3)
    >>> f.shape, torch.allclose(f, x.float().div(255).mean(dim=(2, 3)))
    (torch.Size([10, 3]), True)
    """
    from ..data.batches import image_batch_loader, to_float_images
    from ..data.images import _check_images

    _check_images(images, "images")
    batch_size = check_positive_int(batch_size, "batch_size")
    if device is None:
        device = images.device if isinstance(images, Tensor) else "cpu"
    n = len(images)
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    pin = torch.device(device).type == "cuda" and not (isinstance(images, Tensor) and images.is_cuda)
    out: list[Tensor] = []
    loader = image_batch_loader(images, None, batches, num_workers=num_workers, pin_memory=pin and num_workers > 0)
    for x, _, _ in loader:
        x = to_float_images(x, device, non_blocking=pin)
        if preprocess is not None:
            x = preprocess(x)
        f = model_fn(x)
        if not isinstance(f, Tensor) or f.ndim != 2 or f.shape[0] != x.shape[0]:
            raise ValueError(f"model_fn must return features (batch, d), got {getattr(f, 'shape', type(f))}")
        out.append(f.float().to(out_device))
    if not out:
        raise ValueError("images is empty; there is nothing to extract")
    return torch.cat(out)
