"""Gradient signal-to-noise ratio (Mitrovic et al., Figure 4).

For every scalar parameter k, the tracker keeps exponential moving averages of
its gradient and squared gradient over optimizer steps,

    m_k <- beta m_k + (1 - beta) g_k,    v_k <- beta v_k + (1 - beta) g_k^2,

bias-corrected by 1 - beta^t as in Adam, and reports

    SNR_k = |m_k| / sqrt(max(v_k - m_k^2, 0) + eps v_k)

summarised as the mean over parameters and the standard deviation across
parameters. It reads ``p.grad`` and nothing else, so it works in any PyTorch
loop: call :meth:`GradientSNR.update` after ``backward()`` and before the
gradients are zeroed, or let :meth:`GradientSNR.attach` call it from an
optimizer step pre-hook.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["GradientSNR"]


class GradientSNR:
    """Track the gradient SNR of a set of parameters over training steps.

    Parameters
    ----------
    parameters : nn.Module or iterable of Tensor
        The parameters to watch (those with ``requires_grad``). A parameter
        whose ``.grad`` is None at an update counts as a zero gradient.
    beta : float in (0, 1), default 0.99
        EMA decay; the window is about 1 / (1 - beta) steps.
    eps : float, default 1e-12
        Relative to the second moment: ``eps * v`` is added to the variance,
        so that constant gradients give a large finite SNR (``1/sqrt(eps)``)
        instead of inf, and the SNR does not change with the gradients' scale
        (a loss scale, a tiny learning signal).

    Examples
    --------
    >>> import torch
    >>> from negbatch.diagnostics import GradientSNR
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> snr = GradientSNR(model, beta=0.9)
    >>> handle = snr.attach(opt)         # update() runs before every opt.step()
    >>> for _ in range(5):
    ...     opt.zero_grad()
    ...     model(torch.randn(8, 3)).pow(2).mean().backward()
    ...     opt.step()
    >>> sorted(snr.summary())
    ['snr_mean', 'snr_std']
    >>> handle.remove()
    """

    def __init__(self, parameters: nn.Module | Iterable[Tensor], beta: float = 0.99, eps: float = 1e-12) -> None:
        if isinstance(parameters, nn.Module):
            parameters = parameters.parameters()
        self.params = [p for p in parameters if p.requires_grad]
        if not self.params:
            raise ValueError("parameters must contain at least one tensor with requires_grad=True")
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must lie in (0, 1), got {beta!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.steps = 0
        #: Updates left out because a gradient held NaN or inf.
        self.skipped = 0
        # Flat buffers: one cat per update and a handful of in-place ops keep the
        # tracker's cost a small fraction of a training step. float64, because the
        # variance is v - m^2: at an SNR of 10^4 it is 10^-8 of v, below float32's
        # resolution (MPS has no float64: float32 there).
        total = sum(p.numel() for p in self.params)
        device = self.params[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.m = torch.zeros(total, dtype=dtype, device=device)
        self.v = torch.zeros(total, dtype=dtype, device=device)

    @torch.no_grad()
    def update(self) -> bool:
        """Fold the current ``.grad`` of every parameter into the two EMAs.

        A gradient holding NaN or inf (a mixed-precision step whose scale
        overflowed, a diverged step) is skipped, as a ``GradScaler`` skips
        the optimizer's step: folded in, it would leave the averages NaN for
        good. The first skip warns; ``skipped`` counts them. Returns whether
        the gradient was folded in."""
        g = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(self.m.dtype) for p in self.params
        ])
        if not bool(torch.isfinite(g).all()):
            if not self.skipped:
                warnings.warn("GradientSNR.update: a gradient holds NaN or inf; this step is left out of the "
                              "averages (GradientSNR.skipped counts such steps)", RuntimeWarning, stacklevel=2)
            self.skipped += 1
            return False
        self.m.mul_(self.beta).add_(g, alpha=1 - self.beta)
        self.v.mul_(self.beta).addcmul_(g, g, value=1 - self.beta)
        self.steps += 1
        return True

    def snr(self) -> Tensor:
        """SNR of every scalar parameter, flattened (float32), in ``parameters`` order."""
        return self._snr().float()

    @torch.no_grad()
    def _snr(self) -> Tensor:
        if self.steps == 0:
            raise RuntimeError("GradientSNR.snr() before any update(): call update() after backward() first")
        inv = 1.0 / (1.0 - self.beta**self.steps)  # Adam-style bias correction
        m = self.m * inv
        v = self.v * inv
        # In-place chain on one buffer: var = v/c - m^2, clamped, + eps v, then 1/sqrt.
        scale = (v * (1.0 + self.eps)).addcmul_(m, m, value=-1.0).clamp_(min=self.eps * v)
        # A parameter whose gradient was always zero (v = 0) gets SNR 0, not 0/0.
        scale.clamp_(min=torch.finfo(scale.dtype).tiny).rsqrt_()
        return m.abs_().mul_(scale)

    def summary(self) -> dict[str, float]:
        """``{"snr_mean": mean over parameters, "snr_std": std across parameters}``."""
        s = self._snr()
        # Two reductions (the sum, the sum of squares as a dot): faster than std_mean on CPU.
        mean = float(s.sum(dtype=torch.float64)) / s.numel()
        second = float(torch.dot(s, s)) / s.numel()
        return {"snr_mean": mean, "snr_std": max(second - mean * mean, 0.0) ** 0.5}

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call :meth:`update` before every ``optimizer.step()``; returns the hook handle."""
        def hook(*_) -> None:  # a pre-hook's return value would replace the step's arguments
            self.update()

        return optimizer.register_step_pre_hook(hook)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "m": self.m.clone(), "v": self.v.clone(), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if state["m"].shape != self.m.shape:
            raise ValueError(f"state holds {state['m'].numel()} moments, the tracker watches {self.m.numel()} parameters")
        self.steps = int(state["steps"])
        self.skipped = int(state.get("skipped", 0))  # states saved before 2026-12-03 have no count
        self.m.copy_(state["m"])
        self.v.copy_(state["v"])
