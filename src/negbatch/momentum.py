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

from ._checks import is_real

__all__ = ["MomentumEncoder"]

#: Parameter dtypes whose moving average runs on a float32 master copy.
_HALF = (torch.float16, torch.bfloat16)
#: State-dict prefix of the float32 masters.
_MASTER = "master."


def _stamp(p: Tensor) -> tuple[int, int]:
    """What changes when a tensor is written: its storage (an assignment, a
    device move) or its version counter (every in-place write)."""
    return p.data_ptr(), p._version


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

    Parameters of the copy in bfloat16 or float16 are averaged in float32:
    at m = 0.999 a step ``(1 - m)(θ_q - θ_k)`` lies below half a unit in
    the last place of a bfloat16 ``θ_k`` unless the two differ by some two
    to four times ``|θ_k|`` (float16: a quarter to a half), so the copy
    stood still or moved by rounding alone. The average runs on a float32
    master of each such parameter, and the copy holds its rounding; a
    parameter written since the last update (``load_state_dict``, an
    assignment) keeps its master if the master still rounds to it, and
    gives it a new one otherwise.

    Call :meth:`update` after each optimizer step; calling the module runs
    the copy without a graph. An encoder whose parameters changed after the
    copy was made (a layer added, removed or reshaped) is refused by
    :meth:`update`: build a new MomentumEncoder from it. ``state_dict`` holds the copy, the count
    and the float32 masters of half-precision parameters (``master.<name>``;
    a state without them, saved before, loads too: the masters start from
    the loaded parameters) as tensors only: ``torch.load(..., weights_only=True)``
    reads it.

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
        if not is_real(momentum) or not (math.isfinite(momentum) and 0.0 <= momentum < 1.0):
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
        # The float32 averages of the copy's half-precision parameters, by
        # name, with the stamp of the parameter when it was last written from
        # its master (None: not yet checked against the parameter).
        self._masters: dict[str, tuple[Tensor, tuple[int, int] | None]] = {}

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
        m = self.momentum
        for name, p in copied.items():
            target = online[name].detach()
            if p.dtype not in _HALF:
                self._masters.pop(name, None)  # a copy converted to full precision
                p.mul_(m).add_(target.to(p.dtype), alpha=1.0 - m)
                continue
            master = self._master(name, p)
            master.mul_(m).add_(target.to(device=master.device, dtype=master.dtype), alpha=1.0 - m)
            p.copy_(master)
            self._masters[name] = (master, _stamp(p))
        self.num_updates += 1

    def _master(self, name: str, p: Tensor) -> Tensor:
        """The float32 average behind the copy's half-precision parameter ``name``.

        Trusted while the parameter is as the last update left it (the same
        storage, its version counter unchanged); otherwise (loaded, assigned,
        moved to another device) kept only if it still rounds to the
        parameter, and taken from the parameter if not: a copy loaded from
        another state must not be overwritten by an average of the old one.
        """
        entry = self._masters.get(name)
        if entry is not None:
            master, stamp = entry
            if stamp == _stamp(p) and master.device == p.device:
                return master
            master = master.to(p.device)
            if master.shape == p.shape and torch.equal(master.to(p.dtype), p):
                return master
        return p.detach().to(torch.float32, copy=True)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, (master, _) in self._masters.items():
            destination[prefix + _MASTER + name] = master

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        # The masters are taken as saved and checked against the loaded
        # parameters at the next update (_master); a state without them (saved
        # before they existed, or by a full-precision copy) leaves each to
        # start from its parameter.
        start = prefix + _MASTER
        saved = {key[len(start):]: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(start)]}
        names = dict(self.encoder.named_parameters())
        for name in saved:
            if name not in names and strict:
                unexpected_keys.append(start + name)
        self._masters = {name: (value.detach().to(torch.float32, copy=True), None) for name, value in saved.items()
                         if name in names and isinstance(value, Tensor)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
