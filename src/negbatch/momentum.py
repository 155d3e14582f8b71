"""A momentum encoder: MoCo's slowly moving copy of the trained encoder.

He et al. ("Momentum Contrast", 2020) encode the keys that fill the queue
with a copy of the encoder whose parameters follow the trained ones as an
exponential moving average, ``θ_k ← m θ_k + (1 - m) θ_q`` after every step
(m = 0.999): the queue's keys, encoded over the last steps, then come from
nearly the same function. :class:`MomentumEncoder` is that copy; it pairs
with a loss's queue (``InfoNCE(form="query_document", queue_size=N)``: the
queries from the encoder, the documents, i.e. the keys, from this copy).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["MomentumEncoder"]


class MomentumEncoder(nn.Module):
    """An exponential moving average of an encoder's parameters (MoCo).

    Parameters
    ----------
    encoder : nn.Module
        The trained encoder (a DDP wrapper is unwrapped). It is copied once;
        the copy takes no gradient. The encoder itself is not part of this
        module (nor of its ``state_dict``).
    momentum : float in [0, 1), default 0.999
        ``m`` of ``θ_k ← m θ_k + (1 - m) θ_q``.

    Attributes
    ----------
    encoder : nn.Module
        The copy. It runs in the trained encoder's mode, module by module,
        read at every call: while the encoder trains, a BatchNorm of the copy
        normalises the keys by their batch and its running statistics evolve
        through the copy's own forward passes, as MoCo's key encoder's do
        (trained beside the query encoder); after ``encoder.eval()`` it uses
        them. ``eval()`` on the MomentumEncoder itself runs the copy in eval
        mode whatever the encoder's mode. The copy is not wrapped
        in DDP: under ``torch.distributed`` a BatchNorm in training mode
        normalises each rank's keys by that rank's batch alone (the ranks'
        running statistics drift apart, and a checkpoint saved on rank 0
        holds rank 0's). MoCo shuffles the keys across ranks for that reason
        (and because batch statistics leak which keys are in the batch);
        here convert the copy with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``,
        or use GroupNorm/LayerNorm. A warning says so when the copy has
        BatchNorm under ``torch.distributed``.
    num_updates : Tensor
        EMA updates so far (saved with the state).

    Call :meth:`update` after each optimizer step; calling the module runs
    the copy without a graph. An encoder whose parameters changed after the
    copy was made (a layer added, removed or reshaped) is refused by
    :meth:`update`: build a new MomentumEncoder from it. ``state_dict`` holds the copy and the count
    (tensors only: ``torch.load(..., weights_only=True)`` reads it).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from negbatch import InfoNCE, MomentumEncoder
    >>> encoder = nn.Linear(8, 4)
    >>> keys = MomentumEncoder(encoder, momentum=0.99)
    >>> loss_fn = InfoNCE(temperature=0.2, form="query_document", queue_size=64)
    >>> optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    >>> x1, x2, idx = torch.randn(16, 8), torch.randn(16, 8), torch.arange(16)
    >>> loss = loss_fn(encoder(x1), keys(x2), indices=idx)   # queries vs keys and the queued keys
    >>> loss.backward(); optimizer.step(); keys.update()
    >>> int(keys.num_updates), len(loss_fn.queue)
    (1, 16)
    """

    num_updates: Tensor

    def __init__(self, encoder: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
            math.isfinite(momentum) and 0.0 <= momentum < 1.0
        ):
            raise ValueError(f"momentum must be a float in [0, 1) (MoCo: 0.999), got {momentum!r}")
        online = encoder.module if isinstance(encoder, DistributedDataParallel) else encoder
        self.encoder = copy.deepcopy(online).requires_grad_(False)
        if dist.is_available() and dist.is_initialized() and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
            for m in self.encoder.modules()
        ):
            warnings.warn(
                "MomentumEncoder: the key encoder has BatchNorm under torch.distributed; each rank normalises its "
                "keys by its own batch (MoCo shuffles BN for this). Use "
                "torch.nn.SyncBatchNorm.convert_sync_batchnorm on the encoder, or GroupNorm/LayerNorm",
                stacklevel=2,
            )
        self.momentum = float(momentum)
        # A plain attribute, not a submodule: the trained encoder stays out of this state_dict.
        self._online = [online]
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step: ``θ_k ← m θ_k + (1 - m) θ_q`` for every parameter."""
        online = dict(self._online[0].named_parameters())
        copied = dict(self.encoder.named_parameters())
        rebuild = ("(the encoder changed after the MomentumEncoder was built); build a new MomentumEncoder from "
                   "the changed encoder")
        for name, p in copied.items():
            if name not in online or online[name].shape != p.shape:
                raise RuntimeError(f"the encoder no longer has a parameter {name!r} of shape {tuple(p.shape)} {rebuild}")
        added = [name for name in online if name not in copied]
        if added:
            # The copy would go on without them: keys from the old architecture, silently.
            raise RuntimeError(f"the encoder has parameters its momentum copy lacks: {added} {rebuild}")
        for name, p in copied.items():
            p.mul_(self.momentum).add_(online[name].detach().to(p.dtype), alpha=1.0 - self.momentum)
        self.num_updates += 1

    def _follow_mode(self) -> None:
        """The copy in the trained encoder's mode, module by module (eval
        throughout when this module is in eval mode).

        The copy kept the mode the encoder had when it was copied: built
        from an encoder in eval mode (a pretrained model just evaluated), it
        stayed there once training began, and its BatchNorm never saw a key
        batch's statistics (nor updated its own), unlike MoCo's key encoder.
        """
        online = dict(self._online[0].named_modules())
        default = self._online[0].training
        for name, module in self.encoder.named_modules():
            source = online.get(name)
            module.training = self.training and (source.training if source is not None else default)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._follow_mode()
        with torch.no_grad():
            return self.encoder(*args, **kwargs)
