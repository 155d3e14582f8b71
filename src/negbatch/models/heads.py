"""Projection heads and the encoder+head pair trained by contrastive losses."""

from __future__ import annotations

from torch import Tensor, nn

from .encoders import _check_widths

__all__ = ["ProjectionHead", "ContrastiveModel"]


class ProjectionHead(nn.Module):
    """MLP head: Linear-BatchNorm-ReLU for every width but the last, then Linear.

    Parameters
    ----------
    in_dim : int
    widths : sequence of int, default (2048, 128)
        The paper uses (2048, 128) for SimCLR and (4092, 2048, 1024, 512, 128)
        for ReLIC; the last entry is the embedding dimension.

    Examples
    --------
    >>> import torch
    >>> from negbatch.models import ProjectionHead
    >>> ProjectionHead(32, (64, 16))(torch.rand(5, 32)).shape
    torch.Size([5, 16])
    """

    def __init__(self, in_dim: int, widths=(2048, 128)) -> None:
        super().__init__()
        widths = _check_widths(widths, "head widths")
        layers: list[nn.Module] = []
        d = in_dim
        for width in widths[:-1]:
            layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
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
