"""LARS (You, Gitman and Ginsburg, 2017), the optimizer of SimCLR and ReLIC.

No maintained PyPI implementation fits a plain torch dependency (the known
ones are unmaintained or tied to a framework), so it is written here. For a
parameter w with gradient g, weight decay lambda and trust coefficient eta:

    d = g + lambda w
    r = eta ||w|| / ||d||      (1 if either norm is 0)
    u <- momentum u + lr r d,  w <- w - u

Biases and normalisation parameters (1-D tensors) skip both the adaptation
and the weight decay, as in SimCLR.
"""

from __future__ import annotations

import torch

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum.

    Examples
    --------
    >>> import torch
    >>> from negbatch.lab.lars import LARS
    >>> w = torch.nn.Parameter(torch.ones(3, 3))
    >>> opt = LARS([w], lr=0.1)
    >>> w.sum().backward(); opt.step()
    >>> bool((w < 1).all())
    True
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: need lr > 0, momentum in [0, 1), weight_decay >= 0, eta > 0; got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    if group["weight_decay"]:
                        d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    ratio = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d, alpha=group["lr"])
                p.sub_(buf)
        return loss
