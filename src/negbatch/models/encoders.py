"""Encoders for images; their output is the representation used for evaluation
(the projection head sits on top, see ``heads.py``): an MLP and a small ResNet
for small greyscale images here, ResNet-18/50 in ``resnet.py``."""

from __future__ import annotations

from torch import Tensor, nn

from .._checks import is_int

__all__ = ["MLPEncoder", "ConvEncoder", "build_encoder", "ENCODERS"]


def _check_widths(widths, name: str) -> tuple[int, ...]:
    widths = tuple(widths)
    if not widths or any(not is_int(w) or w < 1 for w in widths):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {widths!r}")
    return tuple(int(w) for w in widths)


class MLPEncoder(nn.Module):
    """Flatten, then Linear-BatchNorm-ReLU blocks.

    Parameters
    ----------
    image_shape : (C, H, W)
    widths : sequence of int, default (256, 128)
        Hidden widths; the last is the representation dimension.

    Examples
    --------
    >>> import torch
    >>> from negbatch.models import MLPEncoder
    >>> MLPEncoder((1, 8, 8), widths=(64, 32))(torch.rand(5, 1, 8, 8)).shape
    torch.Size([5, 32])
    """

    def __init__(self, image_shape: tuple[int, int, int], widths=(256, 128)) -> None:
        super().__init__()
        widths = _check_widths(widths, "widths")
        c, h, w = image_shape
        layers: list[nn.Module] = [nn.Flatten()]
        d = c * h * w
        for width in widths:
            layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            d = width
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Block(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet basic block)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.skip(x))


class ConvEncoder(nn.Module):
    """A small ResNet: a 3x3 stem, one residual block per stage (stride 2
    after the first), global average pooling.

    Works for 28x28 and for 8x8 images (global pooling makes it size-agnostic).

    Parameters
    ----------
    in_channels : int, default 1
    channels : sequence of int, default (32, 64, 128)
        Channels of each stage; the last is the representation dimension.

    Examples
    --------
    >>> import torch
    >>> from negbatch.models import ConvEncoder
    >>> enc = ConvEncoder(channels=(8, 16))
    >>> enc(torch.rand(4, 1, 28, 28)).shape, enc(torch.rand(4, 1, 8, 8)).shape
    (torch.Size([4, 16]), torch.Size([4, 16]))
    """

    def __init__(self, in_channels: int = 1, channels=(32, 64, 128)) -> None:
        super().__init__()
        channels = _check_widths(channels, "channels")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)
        )
        stages = []
        c = channels[0]
        for i, c_out in enumerate(channels):
            stages.append(_Block(c, c_out, stride=1 if i == 0 else 2))
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = c

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.stages(self.stem(x)))


ENCODERS = ("mlp", "conv", "resnet18", "resnet50")
"""Names :func:`build_encoder` accepts."""


def build_encoder(kind: str, image_shape: tuple[int, int, int], widths=None, *, stem: str | None = None) -> nn.Module:
    """An encoder by name; its ``out_dim`` is the representation's width.

    Parameters
    ----------
    kind : {"mlp", "conv", "resnet18", "resnet50"}
    image_shape : (C, H, W)
    widths : sequence of int
        MLP hidden widths, conv stage channels, or a ResNet's four stage
        widths (None: the standard (64, 128, 256, 512)).
    stem : {"cifar", "standard"}, optional
        ResNets only. None: "cifar" (3x3, stride 1, no max-pool) for images of
        at most 32x32, "standard" (7x7 stride 2 + max-pool) for larger ones.

    Examples
    --------
    >>> from negbatch.models import build_encoder
    >>> enc = build_encoder("resnet18", (3, 32, 32), (8, 16, 32, 64))
    >>> enc.stem_kind, enc.out_dim
    ('cifar', 64)
    >>> build_encoder("resnet50", (3, 64, 64), None).stem_kind
    'standard'
    """
    if kind in ("resnet18", "resnet50"):
        from .resnet import resnet18, resnet50

        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
        c, h, w = image_shape
        if stem is None:
            stem = "cifar" if max(h, w) <= 32 else "standard"
        widths = (64, 128, 256, 512) if widths is None else tuple(widths)
        if len(widths) != 4:
            raise ValueError(f"a ResNet's widths are its 4 stage widths, e.g. 64,128,256,512 (or None for those), "
                             f"got {widths!r}")
        return (resnet18 if kind == "resnet18" else resnet50)(in_channels=c, stem=stem, widths=widths)
    if stem is not None:
        raise ValueError(f"stem applies to the ResNets only, not to encoder {kind!r}")
    if kind == "mlp":
        return MLPEncoder(image_shape) if widths is None else MLPEncoder(image_shape, widths)
    if kind == "conv":
        return ConvEncoder(image_shape[0]) if widths is None else ConvEncoder(image_shape[0], widths)
    raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {kind!r}")
