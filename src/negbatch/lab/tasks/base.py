"""The interface between a kind of data and the run skeleton: :class:`Task`.

(In a module of its own so that the tasks import it without importing the
package that imports them: no import circle.)
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ...momentum import MomentumEncoder
from ..config import TrainConfig
from ..objective import loss_parameter_groups

__all__ = ["Task"]


class Task:
    """The interface between a kind of data and the run skeleton.

    The skeleton calls, in order: the constructor (loads the data; sets
    :attr:`data_identity`), :meth:`build` (after seeding torch), then either
    :meth:`load_state_dict` (resuming) or :meth:`before_training`, then per
    epoch :meth:`start_epoch` and per batch of :attr:`sampler` :meth:`batch`,
    :meth:`step`, (the optimizer's step) :meth:`after_step` and
    :meth:`step_metrics`; at the end :meth:`evaluate` and :meth:`summarize`.

    Attributes
    ----------
    data_identity : dict
        What identifies the data (name, source, sizes, content fingerprint).
    model : nn.Module
        The trained encoder (and head); its ``state_dict`` is checkpointed.
    net : nn.Module
        What a training step calls: ``model``, or its DDP / compiled wrapper
        (set by the skeleton after :meth:`build`).
    sampler : negbatch.sampling.EpochBatchSampler
        The batches: the skeleton calls ``set_epoch`` and saves its
        ``state_dict``; :meth:`batches` iterates it.
    precision : negbatch.lab.precision.Precision
        Autocast and loss scaling for :meth:`step` (set by the skeleton).
    world_size_invariant : bool
        True when training draws no random number per process (so a resumed
        run may continue on another number of processes).
    key_encoder : negbatch.MomentumEncoder or None
        With ``cfg.key_momentum``: MoCo's momentum encoder of :attr:`model`,
        which encodes the keys (set by :meth:`build_key_encoder`).
    """

    data_identity: dict[str, Any]
    model: nn.Module
    net: nn.Module
    sampler: Any
    precision: Any
    world_size_invariant: bool = True
    key_encoder: MomentumEncoder | None = None

    def __init__(self, cfg: TrainConfig, device: torch.device, data: Any = None) -> None:
        self.cfg, self.device = cfg, device

    def build(self) -> None:
        """Build the model, the objective and the sampler (torch is seeded)."""
        raise NotImplementedError

    def earlier_data_identity(self, saved: dict[str, Any]) -> dict[str, Any] | None:
        """The identity an earlier version of negbatch recorded for this run's data when it
        differs from :attr:`data_identity` (``saved``: the folder's record), else None: the
        folder check then accepts that record too (see :meth:`negbatch.lab.folder.RunFolder.check`)."""
        return None

    def build_key_encoder(self) -> None:
        """MoCo's momentum encoder, a copy of the freshly built :attr:`model`
        (``cfg.key_momentum``; none when it is 0)."""
        self.key_encoder = MomentumEncoder(self.model, self.cfg.key_momentum) if self.cfg.key_momentum else None

    def after_step(self) -> None:
        """Work after each optimizer step: the momentum encoder follows the model."""
        if self.key_encoder is not None:
            self.key_encoder.update()

    def key_encoder_state(self) -> dict[str, Any]:
        """The momentum encoder's part of :meth:`state_dict` (tensors only)."""
        return {"key_encoder": self.key_encoder.state_dict()} if self.key_encoder is not None else {}

    def load_key_encoder_state(self, state: dict[str, Any]) -> None:
        if self.key_encoder is not None:
            if "key_encoder" not in state:
                raise ValueError("the checkpoint holds no momentum encoder (key_encoder) though key_momentum is set")
            self.key_encoder.load_state_dict(state["key_encoder"])

    def parameters(self) -> Iterator[nn.Parameter] | list[dict]:
        """What the optimizer updates: the model's parameters and the loss's
        own (a learnable temperature, SigLIP's bias; without weight decay)."""
        loss = getattr(self, "loss_fn", None)
        return loss_parameter_groups(self.model, loss) if loss is not None else self.model.parameters()

    def before_training(self) -> None:
        """Work on the untrained model, once (not on resume)."""

    def start_epoch(self, epoch: int) -> dict[str, float]:
        """Diagnostics of the epoch's batches before its first step (logged with it)."""
        return {}

    def batches(self, streams) -> Iterator[Any]:
        """The rest of the epoch's batches, each ready for :meth:`step`."""
        for index in self.sampler:
            yield self.batch(index, streams)

    def batch(self, index: list[int], streams) -> Any:
        """The training inputs of the samples ``index`` (this process's share of a global batch)."""
        raise NotImplementedError

    def step(self, batch: Any, streams) -> Tensor:
        """Forward, loss and backward of one batch; returns the detached loss."""
        raise NotImplementedError

    def step_metrics(self) -> dict[str, float]:
        """Extra values of the last step for its metrics row."""
        return {}

    def evaluate(self) -> dict[str, Any]:
        """Metrics of the trained model."""
        raise NotImplementedError

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Summary entries computed from the metric rows."""
        return {"final_loss": rows[-1]["loss"] if rows else None}

    def state_dict(self) -> dict[str, Any]:
        """Task state a resumed run needs (besides model, optimizer, sampler, random streams)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
