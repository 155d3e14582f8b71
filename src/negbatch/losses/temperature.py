"""A learnable temperature: CLIP's logit scale, for every loss of negbatch.

CLIP (Radford et al. 2021) learns the softmax temperature with the encoders:
the parameter is ``log(1/tau)`` (log space keeps the scale positive and its
steps relative), initialised from a given temperature, and the scale
``exp(log_scale)`` is clipped at 100 "to prevent scaling the logits by more
than 100" (open_clip clamps ``log_scale`` to ``[0, log 100]`` after every
optimizer step). SigLIP (Zhai et al. 2023) learns it the same way, with a
learnable bias beside it.

:class:`LearnableTemperature` holds the parameter; a loss built with
``learnable_temperature=True`` multiplies its anchors by the scale, so its
logits are ``scale * s`` and every kernel runs at temperature 1 while
autograd gives the scale its gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._checks import check_temperature, is_real
from ..distributed import is_distributed, world_size

__all__ = ["LearnableTemperature", "average_gradient"]

#: CLIP's bound on the logit scale (1/temperature).
MAX_SCALE = 100.0


class _AverageGradient(torch.autograd.Function):
    """Identity forward; the backward averages the gradient over the ranks."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad / world_size()


def average_gradient(x: Tensor) -> Tensor:
    """``x`` whose gradient is averaged over the ranks in the backward (as
    DDP averages a model's gradients), so that a loss's own parameters stay
    equal on every rank; ``x`` itself without a process group.

    Every rank must run the backward in the same step, as under DDP.
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _AverageGradient.apply(x)


def _check_max_scale(max_scale: object) -> float:
    """The bound of the logit scale: a finite float above 1.

    ``inf`` was accepted: the clamp then bounds nothing, and a diverging
    step takes ``exp(log_scale)`` to inf and the loss to NaN. At 1 the scale
    is clamped to [1, 1] and the "learnable" temperature never moves.
    """
    if not is_real(max_scale):
        raise TypeError(f"max_scale must be a finite float > 1 (the largest logit scale 1/temperature; CLIP: 100), "
                        f"got {type(max_scale).__name__}")
    if not math.isfinite(max_scale):
        raise ValueError(
            f"max_scale must be a finite float > 1 (the largest logit scale 1/temperature; CLIP: 100), got "
            f"{max_scale!r}: an unbounded scale can overflow to inf and the loss to NaN; for a loose bound pass a "
            "large finite one (e.g. 1e4: temperature >= 1e-4)"
        )
    if max_scale <= 1:
        raise ValueError(
            f"max_scale must be a finite float > 1 (the largest logit scale 1/temperature; CLIP: 100), got "
            f"{max_scale!r}: the scale is kept in [1, max_scale], so at or below 1 it cannot move; for a fixed "
            "temperature pass it as a float (a loss's temperature= with learnable_temperature=False)"
        )
    return float(max_scale)


class LearnableTemperature(nn.Module):
    """The temperature as a trainable parameter in log space, clamped as CLIP.

    Parameters
    ----------
    temperature : float
        Initial temperature tau; ``1/tau`` must lie in ``[1, max_scale]``.
    max_scale : float, default 100
        Largest logit scale ``1/tau`` (CLIP's 100: tau >= 0.01): finite and
        above 1. The scale is also kept >= 1 (tau <= 1), as open_clip clamps
        ``log_scale`` to ``[0, log max_scale]``.

    Attributes
    ----------
    log_scale : nn.Parameter, 0-d
        ``log(1/tau)``. Before each use it is projected onto
        ``[0, log max_scale]`` in place, as CLIP clamps it after each
        optimizer step: at the bound it keeps receiving gradients, so it can
        come back (a clamp inside the graph would freeze it there).

    Call the module for the scale ``1/tau`` (a 0-d tensor with gradient);
    under ``torch.distributed`` its gradient is averaged over the ranks in
    the backward, so every rank keeps the same temperature.

    Examples
    --------
    >>> import torch
    >>> from negbatch.losses import LearnableTemperature
    >>> t = LearnableTemperature(0.07)
    >>> round(t.temperature, 4), round(t().item(), 2)
    (0.07, 14.29)
    >>> with torch.no_grad():
    ...     _ = t.log_scale.fill_(9.0)   # an optimizer step far past the bound
    >>> round(t().item(), 3), round(t.temperature, 6)   # clamped to CLIP's 100
    (100.0, 0.01)
    """

    def __init__(self, temperature: float, *, max_scale: float = MAX_SCALE) -> None:
        super().__init__()
        max_scale = _check_max_scale(max_scale)
        scale = 1.0 / check_temperature(temperature)
        if not 1.0 <= scale <= max_scale * (1 + 1e-12):
            raise ValueError(
                f"a learnable temperature starts at 1/temperature = {scale:.4g}, which must lie in [1, {max_scale:g}] "
                f"(CLIP clamps the logit scale to [1, 100]); pick temperature in [{1 / max_scale:g}, 1]"
            )
        self.max_scale = max_scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self) -> Tensor:
        with torch.no_grad():
            self.log_scale.clamp_(0.0, math.log(self.max_scale))
        return average_gradient(self.log_scale.exp())

    @property
    def temperature(self) -> float:
        """The current temperature ``1/scale`` (clamped), as a float."""
        return 1.0 / math.exp(min(max(float(self.log_scale.detach()), 0.0), math.log(self.max_scale)))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}, max_scale={self.max_scale:g}"
