"""ResNet-18 and ResNet-50 (He et al., 2016), written for negbatch.

The encoder's output is the globally average-pooled feature (512 for ResNet-18,
2048 for ResNet-50): the representation evaluation probes; the projection head
sits on top (no classification layer here).

Two stems:

* ``"standard"``: 7x7 convolution with stride 2 and a 3x3 max-pool with stride
  2 (ImageNet-sized inputs);
* ``"cifar"``: one 3x3 convolution with stride 1 and no max-pool, the usual
  change for 32x32 images (SimCLR's CIFAR-10 experiments).

The bottleneck block puts its stride on the 3x3 convolution (the variant
torchvision's ``resnet50`` builds, often called ResNet v1.5). Convolutions are
initialised He-normal (fan-out), BatchNorm to weight 1 / bias 0; with
``zero_init_residual`` the last BatchNorm of every block starts at 0 (each block
starts as the identity; Goyal et al., 2017).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .._checks import check_positive_int, is_int

__all__ = ["ResNet", "resnet18", "resnet50", "BasicBlock", "Bottleneck"]


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1, self.bn1 = _conv(c_in, width, 3, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, c_out, 3), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, and a shortcut (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1, self.bn1 = _conv(c_in, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, c_out, 1), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """A ResNet trunk ending in global average pooling.

    Parameters
    ----------
    block : {"basic", "bottleneck"}
    depths : sequence of 4 ints
        Blocks per stage: (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-50.
    widths : sequence of 4 ints, default (64, 128, 256, 512)
        Each stage's width (a bottleneck stage outputs 4x its width); smaller
        widths give the same architecture at test size.
    in_channels : int, default 3
        1 for greyscale images.
    stem : {"standard", "cifar"}, default "standard"
    zero_init_residual : bool, default False

    Attributes
    ----------
    out_dim : int
        The representation's width (``widths[-1] * expansion``).
    """

    def __init__(
        self,
        block: str,
        depths: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        *,
        in_channels: int = 3,
        stem: str = "standard",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        depths, widths = tuple(depths), tuple(widths)
        for name, v in (("depths", depths), ("widths", widths)):
            if len(v) != 4 or any(not is_int(d) or d < 1 for d in v):
                raise ValueError(f"{name} must be 4 positive ints (one per stage), got {v!r}")
        depths, widths = tuple(int(d) for d in depths), tuple(int(w) for w in widths)
        in_channels = check_positive_int(in_channels, "in_channels")
        if stem not in ("standard", "cifar"):
            raise ValueError(f"stem must be 'standard' (7x7 stride 2 + max-pool) or 'cifar' (3x3 stride 1), got {stem!r}")
        cls = _BLOCKS[block]
        c = widths[0]
        if stem == "standard":
            self.stem = nn.Sequential(
                _conv(in_channels, c, 7, 2), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
            )
        else:
            self.stem = nn.Sequential(_conv(in_channels, c, 3, 1), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        stages = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(cls(c, width, 2 if (j == 0 and i > 0) else 1))
                c = width * cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = c
        self.stem_kind = stem
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.stages(self.stem(x)))


def resnet18(in_channels: int = 3, stem: str = "standard", widths: Sequence[int] = (64, 128, 256, 512),
             **kwargs) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2); 512-d representation
    (11,176,512 parameters with the standard stem and 3 input channels).

    Examples
    --------
    >>> import torch
    >>> from negbatch.models import resnet18
    >>> net = resnet18(stem="cifar", widths=(8, 16, 32, 64))
    >>> net(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 64])
    """
    return ResNet("basic", (2, 2, 2, 2), widths, in_channels=in_channels, stem=stem, **kwargs)


def resnet50(in_channels: int = 3, stem: str = "standard", widths: Sequence[int] = (64, 128, 256, 512),
             **kwargs) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3); 2048-d representation
    (23,508,032 parameters with the standard stem and 3 input channels).

    Examples
    --------
    >>> import torch
    >>> from negbatch.models import resnet50
    >>> net = resnet50(in_channels=1, stem="cifar", widths=(4, 8, 16, 32))
    >>> net(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 128])
    """
    return ResNet("bottleneck", (3, 4, 6, 3), widths, in_channels=in_channels, stem=stem, **kwargs)
