"""Two-view augmentations for small greyscale images, batched in torch.

One call transforms a whole batch (N, 1, H, W): the geometric part (random
resized crop, shift, optional horizontal flip) is one ``affine_grid`` +
``grid_sample``; brightness/contrast, Gaussian noise and random erasing are
broadcast tensor operations. There is no per-image Python loop.

``strength`` in [0, 1] scales every augmentation together (0: identity), so a
study can sweep one number. Randomness comes only from the ``generator``
passed to the call, so a seeded generator gives the same views on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augment", "two_views"]


@dataclass(frozen=True)
class Augment:
    """Random augmentation of a batch of greyscale images.

    Parameters
    ----------
    strength : float in [0, 1], default 0.5
        Global scale of every augmentation below.
    min_scale : float in (0, 1], default 0.5
        Smallest crop side (fraction of the image) at ``strength=1``.
    max_shift : float, default 0.15
        Largest translation (fraction of the image side) at ``strength=1``.
    hflip : bool, default False
        Random horizontal flips (sensible for clothes, not for digits).
    brightness, contrast : float, default 0.4
        Largest additive brightness change and multiplicative contrast change
        at ``strength=1``.
    noise : float, default 0.05
        Standard deviation of additive Gaussian noise at ``strength=1``.
    erase_prob : float, default 0.25
        Probability (at ``strength=1``) of erasing a random rectangle of up to
        a quarter of each side.

    Examples
    --------
    >>> import torch
    >>> from negbatch.data import Augment
    >>> x = torch.rand(16, 1, 28, 28)
    >>> aug = Augment(strength=0.5)
    >>> v = aug(x, generator=torch.Generator().manual_seed(0))
    >>> v.shape, bool((v >= 0).all() and (v <= 1).all())
    (torch.Size([16, 1, 28, 28]), True)
    """

    strength: float = 0.5
    min_scale: float = 0.5
    max_shift: float = 0.15
    hflip: bool = False
    brightness: float = 0.4
    contrast: float = 0.4
    noise: float = 0.05
    erase_prob: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1], got {self.strength!r}")
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"min_scale must lie in (0, 1], got {self.min_scale!r}")
        for name in ("max_shift", "brightness", "contrast", "noise", "erase_prob"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None, *,
                 part: tuple[int, int] | None = None) -> Tensor:
        """Augment the batch ``x`` with random numbers from ``generator``.

        ``part=(start, total)`` says that ``x`` holds rows ``start .. start + len(x)``
        of a batch of ``total`` rows (this process's share under DDP): the
        random numbers are drawn for all ``total`` rows and ``x`` gets its
        rows' share, so every process sees the views a single process would.
        """
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"x must have shape (N, 1, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be float images in [0, 1], got {x.dtype} (divide uint8 images by 255)")
        n = x.shape[0]
        start, total = part if part is not None else (0, n)
        if not (0 <= start and start + n <= total):
            raise ValueError(f"part=({start}, {total}) does not hold the {n} rows of x; expected 0 <= start and "
                             f"start + len(x) <= total")
        if self.strength == 0:
            return x.clone()
        dev, s = x.device, self.strength

        def draw(sample, *shape: int) -> Tensor:
            return sample((total, *shape), generator=generator, device="cpu")[start : start + n].to(dev)

        def uniform(n_rows: int, *shape: int) -> Tensor:
            return draw(torch.rand, *shape)

        x = self.geometric(x, uniform, s)
        x = self.photometric(x, uniform, s, lambda: draw(torch.randn, *x.shape[1:]))
        x = self.erase(x, uniform, s)
        return x.clamp_(0.0, 1.0)

    def geometric(self, x: Tensor, uniform, s: float) -> Tensor:
        n = x.shape[0]
        # Crop side a in [1 - s(1 - min_scale), 1]: zooming in by 1/a is a
        # sampling grid scaled by a; the shift keeps the crop mostly inside.
        scale = 1.0 - s * (1.0 - self.min_scale) * uniform(n)
        shift = (uniform(n, 2) * 2 - 1) * (s * self.max_shift * 2 + (1 - scale)[:, None])
        sx = scale.clone()
        if self.hflip:
            sx = torch.where(uniform(n) < 0.5, -sx, sx)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = sx
        theta[:, 1, 1] = scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def photometric(self, x: Tensor, uniform, s: float, normal) -> Tensor:
        n = x.shape[0]
        # At contrast > 1 the factor could go negative and invert the image (torchvision clamps at 0 too).
        c = (1.0 + s * self.contrast * (uniform(n, 1, 1, 1) * 2 - 1)).clamp_min(0.0)
        b = s * self.brightness * (uniform(n, 1, 1, 1) * 2 - 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean + b
        if self.noise > 0:
            x = x + s * self.noise * normal()
        return x

    def erase(self, x: Tensor, uniform, s: float) -> Tensor:
        if self.erase_prob == 0:
            return x
        n, _, h, w = x.shape
        eh = (uniform(n) * 0.25 * h).ceil()
        ew = (uniform(n) * 0.25 * w).ceil()
        top = uniform(n) * (h - eh)
        left = uniform(n) * (w - ew)
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
        box = in_rows[:, :, None] & in_cols[:, None, :]
        apply = (uniform(n) < s * self.erase_prob)[:, None, None]
        return x.masked_fill((box & apply)[:, None], 0.0)


def two_views(x: Tensor, augment: Augment, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Two independent augmentations of the same batch (the positive pairs)."""
    return augment(x, generator), augment(x, generator)
