"""SimCLR's augmentations (Chen et al., 2020), batched on the images' device.

One call transforms a whole batch (N, C, H, W), C = 3 or 1, on whatever device
it lives: random resized crop and horizontal flip (one ``affine_grid`` +
``grid_sample``), colour jitter with probability 0.8 in a random order per
image, greyscale with probability 0.2, Gaussian blur with probability 0.5 for
images larger than 32x32, and an optional per-channel normalisation. The
photometric operations are kornia's functional ones (torchvision's formulas,
pure PyTorch; kornia is the optional extra ``vision``).

Reproducible: every random number of a call is drawn up front, in one fixed
draw of fixed size, from the ``torch.Generator`` passed in (a CPU generator);
nothing reads torch's global RNG (kornia's augmentation *classes* do, which is
why only its functional operations are used). The same generator state gives
the same views, so a run that saves and restores the generator's state resumes
with the same views; the draw does not depend on the images, so the generator
advances by the same amount for every batch of the same size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import is_int
from .batches import to_float_images
from .images import Images, _is_files

__all__ = ["SimCLRAugment", "AugmentParams", "CHANNEL_STATS", "channel_stats", "normalize_images", "resized_crop"]

CHANNEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # Commonly published per-channel means and standard deviations of the
    # training images in [0, 1]; channel_stats() computes them for any data.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_ATTEMPTS = 10  # random-resized-crop tries per image before the centre-crop fallback, as torchvision


def _kornia():
    try:
        import kornia  # noqa: F401
        from kornia.color import rgb_to_grayscale
        from kornia.enhance import (
            adjust_brightness_accumulative,
            adjust_contrast_with_mean_subtraction,
            adjust_hue,
            adjust_saturation_with_gray_subtraction,
        )
        from kornia.filters import gaussian_blur2d
    except ImportError as err:
        raise ImportError(
            "SimCLRAugment needs kornia (pure PyTorch): pip install 'negbatch[vision]' (or pip install kornia)"
        ) from err
    return {
        "brightness": adjust_brightness_accumulative,
        "contrast": adjust_contrast_with_mean_subtraction,
        "saturation": adjust_saturation_with_gray_subtraction,
        "hue": lambda x, f: adjust_hue(x, f * (2 * math.pi)),  # torchvision's hue factor is in turns
        "gray": rgb_to_grayscale,
        "blur": gaussian_blur2d,
    }


def _stats(normalize, channels: int | None = None) -> tuple[Tensor, Tensor] | None:
    if normalize is None:
        return None
    if isinstance(normalize, str):
        if normalize not in CHANNEL_STATS:
            raise ValueError(f"normalize must be one of {sorted(CHANNEL_STATS)}, a (mean, std) pair or None, "
                             f"got {normalize!r}")
        normalize = CHANNEL_STATS[normalize]
    try:
        mean, std = (torch.tensor([float(v) for v in s], dtype=torch.float32) for s in normalize)
    except (TypeError, ValueError):
        raise ValueError(f"normalize must be a preset name or a (mean, std) pair of per-channel sequences, "
                         f"got {normalize!r}") from None
    if mean.shape != std.shape or mean.ndim != 1 or not bool((std > 0).all()):
        raise ValueError(f"normalize needs one mean and one positive std per channel, got {normalize!r}")
    if channels is not None and len(mean) != channels:
        raise ValueError(f"normalize has {len(mean)} channels but the images have {channels}")
    return mean, std


def normalize_images(x: Tensor, normalize) -> Tensor:
    """``(x - mean) / std`` per channel, for float images in [0, 1]; ``normalize``
    is a :data:`CHANNEL_STATS` name or a ``(mean, std)`` pair (None: ``x``).

    Evaluation must see the same normalisation as training: apply this to the
    un-augmented images whose representations are probed.

    Examples
    --------
    >>> import torch
    >>> from negbatch.data import normalize_images
    >>> normalize_images(torch.full((1, 3, 1, 1), 0.5), ((0.5, 0.25, 0.0), (0.5, 0.5, 0.5))).flatten().tolist()
    [0.0, 0.5, 1.0]
    """
    stats = _stats(normalize, x.shape[1] if x.ndim == 4 else None)
    if stats is None:
        return x
    mean, std = (s.to(x.device, x.dtype)[:, None, None] for s in stats)
    return (x - mean) / std


@torch.no_grad()
def channel_stats(images: Images, batch_size: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of images in [0, 1], streamed in
    batches (float64 sums), for ``SimCLRAugment(normalize=...)``.

    Examples
    --------
    >>> import torch
    >>> from negbatch.data import channel_stats
    >>> x = torch.tensor([0, 255], dtype=torch.uint8).reshape(2, 1, 1, 1).repeat(1, 3, 2, 2)
    >>> channel_stats(x)
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    """
    n = len(images)
    if n == 0:
        raise ValueError("images is empty; channel statistics need at least one image")
    total = total_sq = None
    count = 0
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        x = images.read(idx) if _is_files(images) else images[start : start + batch_size]
        x = to_float_images(x).double()
        s, sq = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


@dataclass(frozen=True)
class SimCLRAugment:
    """SimCLR's random augmentation of a batch of images, on the batch's device.

    Parameters
    ----------
    size : int, optional
        Side of the output crops. None: the input's own (H, W).
    scale : (float, float), default (0.08, 1.0)
        Range of the crop's area as a fraction of the image's.
    ratio : (float, float), default (3/4, 4/3)
        Range of the crop's aspect ratio (drawn log-uniformly).
    hflip : float, default 0.5
        Probability of a horizontal flip.
    strength : float, default 0.5
        Colour-distortion strength s of SimCLR: brightness, contrast and
        saturation factors within 1 +- 0.8 s, hue shift within +- 0.2 s turns.
        SimCLR used s = 1 on ImageNet and s = 0.5 on CIFAR (0.4, 0.4, 0.4, 0.1).
    jitter : float, default 0.8
        Probability of colour jitter (its four operations in a random order per
        image).
    grayscale : float, default 0.2
        Probability of converting to greyscale (kept 3-channel).
    blur : bool, optional
        Gaussian blur with probability ``blur_p``, sigma uniform in
        ``blur_sigma``, kernel side ~10% of the image's (odd). None: only for
        output images larger than 32x32, as SimCLR.
    blur_p : float, default 0.5
    blur_sigma : (float, float), default (0.1, 2.0)
    normalize : str or (mean, std), optional
        Per-channel normalisation after augmenting: a :data:`CHANNEL_STATS`
        name ("cifar10", "cifar100", "imagenet") or explicit values.

    Examples
    --------
    >>> import torch
    >>> from negbatch.data import SimCLRAugment
    >>> x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    >>> aug = SimCLRAugment()
    >>> v1 = aug(x, torch.Generator().manual_seed(0))
    >>> v2 = aug(x, torch.Generator().manual_seed(0))
    >>> v1.shape, v1.dtype, torch.equal(v1, v2)
    (torch.Size([8, 3, 32, 32]), torch.float32, True)
    >>> SimCLRAugment(size=24)(x, torch.Generator().manual_seed(1)).shape
    torch.Size([8, 3, 24, 24])
    """

    size: int | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    strength: float = 0.5
    jitter: float = 0.8
    grayscale: float = 0.2
    blur: bool | None = None
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    normalize: str | tuple[Sequence[float], Sequence[float]] | None = None

    def __post_init__(self) -> None:
        if self.size is not None:
            if not is_int(self.size) or self.size < 1:
                raise ValueError(f"size must be a positive int or None, got {self.size!r}")
            object.__setattr__(self, "size", int(self.size))  # frozen: numpy's int kept as a Python int
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {self.scale!r}")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {self.ratio!r}")
        for name in ("hflip", "jitter", "grayscale", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability and must lie in [0, 1], got {getattr(self, name)!r}")
        if not 0 <= self.strength <= 2.5:  # hue's 0.2 s must stay within torchvision's 0.5 turns
            raise ValueError(f"strength must lie in [0, 2.5], got {self.strength!r}")
        if self.blur not in (None, True, False):
            raise ValueError(f"blur must be True, False or None (only for images larger than 32x32), got {self.blur!r}")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(f"blur_sigma must be (low, high) with 0 < low <= high, got {self.blur_sigma!r}")
        _stats(self.normalize)
        _kornia()  # fail at construction, not in the middle of training

    # ------------------------------------------------------------------ call
    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One random view of each image of ``x`` (uint8 or float, (N, C, H, W)),
        float32 on ``x``'s device: ``apply(x, draw(N, H, W, generator))``.
        ``generator`` must be a CPU generator (None: torch's global one, not
        reproducible across resumes)."""
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"x must be a batch of images (N, C, H, W) with C = 3 or 1, got {getattr(x, 'shape', type(x))}")
        return self.apply(x, self.draw(x.shape[0], x.shape[2], x.shape[3], generator))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return (h, w) if self.size is None else (self.size, self.size)

    def blurs(self, h: int, w: int) -> bool:
        """Whether images of input size (h, w) are blurred (with probability ``blur_p``)."""
        out = self.output_size(h, w)
        return self.blur is True or (self.blur is None and min(out) > 32)

    def draw(self, n: int, h: int, w: int, generator: torch.Generator | None = None) -> "AugmentParams":
        """Every random choice for ``n`` images of size (h, w), from one draw of
        ``n x 35`` uniforms from ``generator`` (CPU tensors)."""
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (its state is what a resumed run restores)")
        u = torch.rand(n, 2 * _ATTEMPTS + 15, generator=generator, dtype=torch.float64)
        (u_area, u_ratio, u_pos, u_flip, u_jit, u_fac, u_order, u_gray, u_blur, u_sigma) = torch.split(
            u, [_ATTEMPTS, _ATTEMPTS, 2, 1, 1, 4, 4, 1, 1, 1], dim=1)
        s = self.strength
        b = 0.8 * s
        low = max(0.0, 1.0 - b)
        factors = torch.empty(n, 4, dtype=torch.float64)
        factors[:, :3] = low + (1.0 + b - low) * u_fac[:, :3]  # brightness, contrast, saturation
        factors[:, 3] = 0.2 * s * (2 * u_fac[:, 3] - 1)  # hue, in turns
        lo, hi = self.blur_sigma
        return AugmentParams(
            boxes=self.crop_boxes(h, w, u_area, u_ratio, u_pos),
            flip=u_flip[:, 0] < self.hflip,
            jitter=(u_jit[:, 0] < self.jitter) & (s > 0),
            factors=factors.float(),
            order=u_order.argsort(dim=1),  # a uniformly random permutation per image
            gray=u_gray[:, 0] < self.grayscale,
            blur=(u_blur[:, 0] < self.blur_p) & self.blurs(h, w),
            sigma=(lo + (hi - lo) * u_sigma[:, 0]).float(),
        )

    def apply(self, x: Tensor, params: "AugmentParams") -> Tensor:
        """The views of ``x`` under the drawn ``params`` (deterministic)."""
        ops = _kornia()
        n, c, h, w = x.shape
        if len(params.flip) != n:
            raise ValueError(f"params were drawn for {len(params.flip)} images, x has {n}")
        out_hw = self.output_size(h, w)
        if x.dtype != torch.uint8 and x.device.type == "cpu" and x.numel() and float(x.max()) > 1.0 + 1e-3:
            # Float images on a 0-255 scale would saturate in the colour ops (a GPU tensor is not
            # checked: the check would synchronise every batch).
            raise ValueError(f"float images must lie in [0, 1] (got values up to {float(x.max()):.4g}); divide by "
                             f"255, or pass uint8 images")
        x = to_float_images(x) if x.dtype == torch.uint8 else x.float()
        if n == 0:
            return x.new_zeros((0, c, *out_hw))
        x = resized_crop(x, params.boxes, out_hw, params.flip)
        names = ["brightness", "contrast", "saturation", "hue"] if c == 3 else ["brightness", "contrast"]
        for position in range(4):
            for op, name in enumerate(names):
                chosen = params.jitter & (params.order[:, position] == op)
                x = _apply_rows(x, chosen, lambda sub, i, op=op, name=name: ops[name](sub, params.factors[i, op].to(sub.device)))
        if c == 3:
            x = _apply_rows(x, params.gray, lambda sub, i: ops["gray"](sub).expand(-1, 3, -1, -1))
        k = tuple(2 * (int(0.1 * side) // 2) + 1 for side in out_hw)  # SimCLR: ~10% of the side, odd
        if max(k) > 1:
            x = _apply_rows(x, params.blur, lambda sub, i: ops["blur"](
                sub, k, params.sigma[i, None].expand(-1, 2).to(sub.device), border_type="reflect"))
        return normalize_images(x, self.normalize)

    def crop_boxes(self, h: int, w: int, u_area: Tensor, u_ratio: Tensor, u_pos: Tensor) -> Tensor:
        """The crop boxes (top, left, height, width) in pixels, one row per image,
        from uniform draws: torchvision's RandomResizedCrop rule (``_ATTEMPTS``
        tries of area and log-aspect; the first that fits, else the centre crop
        of the whole image clamped to ``ratio``)."""
        area = h * w
        lo, hi = self.scale
        target = area * (lo + (hi - lo) * u_area)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
        cw = torch.round(torch.sqrt(target * aspect))
        ch = torch.round(torch.sqrt(target / aspect))
        fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits
        found = fits.any(dim=1)
        cw = cw.gather(1, first)[:, 0]
        ch = ch.gather(1, first)[:, 0]
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            fw, fh = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fw, fh = int(round(h * self.ratio[1])), h
        else:
            fw, fh = w, h
        cw = torch.where(found, cw, torch.full_like(cw, fw))
        ch = torch.where(found, ch, torch.full_like(ch, fh))
        top = torch.floor(u_pos[:, 0] * (h - ch + 1)).clamp(max=h - ch)
        left = torch.floor(u_pos[:, 1] * (w - cw + 1)).clamp(max=w - cw)
        top = torch.where(found, top, torch.div(h - ch, 2, rounding_mode="floor"))
        left = torch.where(found, left, torch.div(w - cw, 2, rounding_mode="floor"))
        return torch.stack([top, left, ch, cw], dim=1).long()


@dataclass(frozen=True)
class AugmentParams:
    """The random choices of one :class:`SimCLRAugment` call, per image (CPU tensors).

    Attributes
    ----------
    boxes : LongTensor (n, 4)
        Crop (top, left, height, width) in input pixels.
    flip : BoolTensor (n,)
    jitter : BoolTensor (n,)
        Whether colour jitter applies.
    factors : Tensor (n, 4)
        Brightness, contrast and saturation factors, hue shift in turns.
    order : LongTensor (n, 4)
        ``order[i, p]``: the jitter operation (0 brightness, 1 contrast, 2
        saturation, 3 hue) applied p-th to image i.
    gray, blur : BoolTensor (n,)
    sigma : Tensor (n,)
        The blur's standard deviation in pixels.
    """

    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    factors: Tensor
    order: Tensor
    gray: Tensor
    blur: Tensor
    sigma: Tensor


def resized_crop(x: Tensor, boxes: Tensor, out_hw: tuple[int, int], flip: Tensor | None = None) -> Tensor:
    """Crop each image to its box (top, left, height, width) and resize it
    bilinearly to ``out_hw``, mirrored where ``flip``: one ``grid_sample``.

    Samples sit where ``F.interpolate(..., align_corners=False)`` puts them
    (output pixel k of a crop of width cw at left + (k + 0.5) cw / out - 0.5);
    near the crop's edge the neighbours inside the image are used, beyond the
    image's edge its border pixels. No antialiasing: a crop much larger than
    the output is subsampled.

    Examples
    --------
    >>> import torch
    >>> from negbatch.data.simclr_augment import resized_crop
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> resized_crop(x, torch.tensor([[1, 2, 2, 2]]), (2, 2))[0, 0].tolist()
    [[6.0, 7.0], [10.0, 11.0]]
    """
    n, c, h, w = x.shape
    top, left, ch, cw = boxes.to(torch.float64).unbind(1)
    # align_corners=False coordinates: [-1, 1] spans the pixel edges, so the box
    # [left, left + cw] is centred at (2 left + cw) / w - 1 with half-width cw / w.
    sx = cw / w
    if flip is not None:
        sx = torch.where(flip.cpu(), -sx, sx)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, [n, c, *out_hw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _apply_rows(x: Tensor, chosen: Tensor, fn) -> Tensor:
    # The chosen rows are known on the CPU (they come from the generator), so
    # selecting them never waits for the device. In place: x is always the
    # crop's fresh output, never the caller's tensor.
    idx = chosen.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    dev_idx = idx.to(x.device)
    return x.index_copy_(0, dev_idx, fn(x.index_select(0, dev_idx), idx).to(x.dtype))
