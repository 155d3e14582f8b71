"""Projection heads and the encoder+head pair trained by contrastive losses."""

from __future__ import annotations

from torch import Tensor, nn

from .._checks import is_int
from .encoders import _check_widths

__all__ = ["ProjectionHead", "ContrastiveModel", "HEAD_PRESETS"]

HEAD_PRESETS: dict[str, tuple[int, ...]] = {
    # SimCLR (Chen et al., 2020): one hidden layer as wide as ResNet-50's 2048, 128-d output.
    "simclr": (2048, 128),
    # Mitrovic et al.'s ReLIC critic: hidden 4092, 2048, 1024, 512, output 128 (4092 as the paper writes it).
    "relic": (4092, 2048, 1024, 512, 128),
}


class ProjectionHead(nn.Module):
    """MLP head: Linear-BatchNorm-ReLU for every width but the last, then Linear.

    Parameters
    ----------
    in_dim : int
    widths : sequence of int or str, default (2048, 128)
        Hidden widths then the embedding dimension, or a :data:`HEAD_PRESETS`
        name: ``"simclr"`` = (2048, 128), ``"relic"`` = (4092, 2048, 1024,
        512, 128), as the papers give them.
    batch_norm : bool, default True
        BatchNorm after each hidden Linear (before its ReLU); False: Linear-ReLU.

    Examples
    --------
    >>> import torch
    >>> from negbatch.models import ProjectionHead
    >>> ProjectionHead(32, (64, 16))(torch.rand(5, 32)).shape
    torch.Size([5, 16])
    >>> [m.out_features for m in ProjectionHead(2048, "relic").modules() if isinstance(m, torch.nn.Linear)]
    [4092, 2048, 1024, 512, 128]
    """

    def __init__(self, in_dim: int, widths=(2048, 128), *, batch_norm: bool = True) -> None:
        super().__init__()
        if isinstance(widths, str):
            if widths not in HEAD_PRESETS:
                raise ValueError(f"head widths must be a sequence of ints or one of {sorted(HEAD_PRESETS)}, got {widths!r}")
            widths = HEAD_PRESETS[widths]
        widths = _check_widths(widths, "head widths")
        if not is_int(in_dim) or in_dim < 1:
            raise ValueError(f"in_dim must be a positive int (the encoder's out_dim), got {in_dim!r}")
        layers: list[nn.Module] = []
        d = int(in_dim)
        for width in widths[:-1]:
            layers.append(nn.Linear(d, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            d = width
        layers.append(nn.Linear(d, widths[-1]))
        self.net = nn.Sequential(*layers)
        self.out_dim = widths[-1]

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class ContrastiveModel(nn.Module):
    """An encoder followed by a projection head.

    ``forward`` gives the embeddings the loss sees; :meth:`representation`
    gives the encoder output (before the head), which evaluation uses.

    Examples
    --------
    >>> import torch
    >>> from negbatch.models import ContrastiveModel, MLPEncoder, ProjectionHead
    >>> enc = MLPEncoder((1, 8, 8), (32,))
    >>> model = ContrastiveModel(enc, ProjectionHead(enc.out_dim, (16, 8)))
    >>> x = torch.rand(6, 1, 8, 8)
    >>> model(x).shape, model.representation(x).shape
    (torch.Size([6, 8]), torch.Size([6, 32]))
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def representation(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))
