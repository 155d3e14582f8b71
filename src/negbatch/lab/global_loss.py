"""The bias-corrected global loss in the trainer: ``loss="global"``.

:class:`GlobalPairLoss` adapts :class:`negbatch.GlobalInfoNCE` to the
trainer's call ``loss(z1, z2, batch, generator)``: the batch's data-set
indices (``batch.index``) select the samples' running normalisers ``nu``,
which live in the module's buffers and so travel with the checkpoint. The
value back-propagated is the M-step surrogate; :meth:`GlobalPairLoss.log_values`
gives the true batch InfoNCE for the metrics, separately.

:class:`GammaSchedule` is the E-step rate as a function of the number of
E-steps done (the loss's saved ``num_updates``), so a resumed run continues
the schedule where it stopped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..losses import GlobalInfoNCE
from ..negatives import Negatives

__all__ = ["GammaSchedule", "GlobalPairLoss"]

SCHEDULES = ("constant", "linear", "cosine")


class GammaSchedule:
    """E-step rate ``gamma(step)``: constant, or decaying from 1 at the first
    step to ``final`` at step ``total_steps - 1`` (then constant).

    A large rate early lets ``nu`` follow a model that moves fast; a small rate
    late averages out the batch estimate's noise once the model moves slowly.
    Picklable (a plain object, no lambda).

    Parameters
    ----------
    final : float in (0, 1]
    kind : {"constant", "linear", "cosine"}
    total_steps : int >= 1

    Examples
    --------
    >>> from negbatch.lab.global_loss import GammaSchedule
    >>> g = GammaSchedule(0.5, "linear", 3)
    >>> [g(0), g(1), g(2), g(9)]
    [1.0, 0.75, 0.5, 0.5]
    """

    def __init__(self, final: float, kind: str = "constant", total_steps: int = 1) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"gamma_schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
        if isinstance(final, bool) or not isinstance(final, (int, float)) or not 0 < final <= 1:
            raise ValueError(f"gamma must be a float in (0, 1], got {final!r}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        self.final, self.kind, self.total_steps = float(final), kind, total_steps

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.final
        progress = min(step / max(self.total_steps - 1, 1), 1.0)
        if self.kind == "linear":
            weight = 1.0 - progress
        else:
            weight = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final + (1.0 - self.final) * weight

    def __repr__(self) -> str:
        return f"GammaSchedule(final={self.final}, kind={self.kind!r}, total_steps={self.total_steps})"


class GlobalPairLoss(nn.Module):
    """:class:`negbatch.GlobalInfoNCE` (two views) behind the trainer's call.

    Parameters
    ----------
    num_samples : int
        Size of the training set; ``batch.index`` must index it.
    temperature : float
    gamma : float or callable
        E-step rate (see :class:`GammaSchedule`).
    negatives : "all" or int
        Negatives per anchor, among the 2B - 2 other views of the batch.
    gather : bool
        Contrast with every process's embeddings (under DDP).
    learnable_temperature : bool
        Learn the temperature (a parameter of this module).

    Examples
    --------
    >>> import torch
    >>> from negbatch.lab.tasks.image import Batch
    >>> from negbatch.lab.global_loss import GlobalPairLoss
    >>> loss_fn = GlobalPairLoss(num_samples=100, temperature=0.2, gamma=0.9)
    >>> batch = Batch(torch.arange(8), torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8))
    >>> loss = loss_fn(torch.randn(8, 4), torch.randn(8, 4), batch, torch.Generator())
    >>> sorted(loss_fn.log_values())
    ['infonce', 'minibatch_loss']
    """

    def __init__(self, num_samples: int, temperature: float, gamma, negatives: Negatives = "all",
                 gather: bool = False, learnable_temperature: bool = False) -> None:
        super().__init__()
        self.loss = GlobalInfoNCE(num_samples, temperature=temperature, gamma=gamma, negatives=negatives,
                                  gather=gather, learnable_temperature=learnable_temperature)

    def forward(self, z1: Tensor, z2: Tensor, batch, generator: torch.Generator | None = None) -> Tensor:
        # One call is one E-step: the trainer (and gradient caching) call the
        # loss once per optimizer step.
        return self.loss(z1, z2, batch.index, generator=generator)

    def log_values(self) -> dict[str, float]:
        """The last call's standard batch InfoNCE (positive in the denominator)
        and plain minibatch estimate ``mean(-s/tau + log Zhat)``; the trainer
        logs them next to the surrogate it back-propagates."""
        if self.loss.last_infonce is None:
            return {}
        return {"infonce": float(self.loss.last_infonce), "minibatch_loss": float(self.loss.last_minibatch_loss),
                **self.loss.log_values()}
