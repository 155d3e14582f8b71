"""Gradient signal-to-noise ratio (Mitrovic et al., Figure 4).

For every scalar parameter k, the tracker keeps exponential moving averages of
its gradient and squared gradient over optimizer steps,

    m_k <- beta m_k + (1 - beta) g_k,    v_k <- beta v_k + (1 - beta) g_k^2,

bias-corrected by 1 - beta^t as in Adam, and reports

    SNR_k = |m_k| / sqrt(max(v_k - m_k^2, 0) + eps)

summarised as the mean over parameters and the standard deviation across
parameters. It reads ``p.grad`` and nothing else, so it works in any PyTorch
loop: call :meth:`GradientSNR.update` after ``backward()`` and before the
gradients are zeroed, or let :meth:`GradientSNR.attach` call it from an
optimizer step pre-hook.
"""

from __future__ import annotations

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
        Added to the variance so that constant gradients give a large finite
        SNR instead of inf.

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
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current ``.grad`` of every parameter into the two EMAs."""
        grads = [p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        # foreach kernels: one launch per op for all tensors, which keeps the
        # tracker's cost a small fraction of a training step.
        torch._foreach_mul_(self.m, self.beta)
        torch._foreach_add_(self.m, grads, alpha=1 - self.beta)
        torch._foreach_mul_(self.v, self.beta)
        squares = torch._foreach_mul(grads, grads)
        torch._foreach_add_(self.v, squares, alpha=1 - self.beta)
        self.steps += 1

    @torch.no_grad()
    def snr(self) -> Tensor:
        """SNR of every scalar parameter, flattened (float32)."""
        if self.steps == 0:
            raise RuntimeError("GradientSNR.snr() before any update(): call update() after backward() first")
        correction = 1.0 - self.beta**self.steps
        m = torch.cat([t.flatten() for t in self.m]) / correction
        v = torch.cat([t.flatten() for t in self.v]) / correction
        return m.abs() / ((v - m * m).clamp_min(0) + self.eps).sqrt()

    def summary(self) -> dict[str, float]:
        """``{"snr_mean": mean over parameters, "snr_std": std across parameters}``."""
        s = self.snr().double()
        return {"snr_mean": float(s.mean()), "snr_std": float(s.std(unbiased=False))}

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call :meth:`update` before every ``optimizer.step()``; returns the hook handle."""
        return optimizer.register_step_pre_hook(lambda *_: self.update())

    def state_dict(self) -> dict:
        return {"steps": self.steps, "m": [t.clone() for t in self.m], "v": [t.clone() for t in self.v]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["m"]) != len(self.m):
            raise ValueError(f"state has {len(state['m'])} tensors, tracker watches {len(self.m)} parameters")
        self.steps = int(state["steps"])
        for dst, src in zip(self.m + self.v, list(state["m"]) + list(state["v"])):
            dst.copy_(src)
