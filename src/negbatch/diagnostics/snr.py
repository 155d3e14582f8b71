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

On an accelerator :meth:`GradientSNR.update` never reads a value back to the
host (no device synchronisation in a GPU training loop): a step whose gradient
holds NaN or inf is left out by a masked update on the device, counted there
(on the CPU, where a read costs nothing, by a plain branch: the same bits), and
reported by a warning when the results are next read (:meth:`~GradientSNR.snr`,
:meth:`~GradientSNR.summary`, :meth:`~GradientSNR.state_dict`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .._checks import is_real

__all__ = ["GradientSNR"]


def _dense_grad(p: Tensor) -> Tensor:
    """``p.grad`` as a strided tensor: zeros when None, densified when sparse
    (``nn.Embedding(sparse=True)``; the rows a step did not touch have gradient 0)."""
    if p.grad is None:
        return torch.zeros_like(p)
    return p.grad if p.grad.layout == torch.strided else p.grad.to_dense()


class GradientSNR:
    """Track the gradient SNR of a set of parameters over training steps.

    Parameters
    ----------
    parameters : nn.Module or iterable of Tensor
        The parameters to watch (those with ``requires_grad``). A parameter
        whose ``.grad`` is None at an update counts as a zero gradient; a
        sparse ``.grad`` (``nn.Embedding(sparse=True)``) is read densified. A
        parameter listed more than once is watched once (its first place).
    beta : float in (0, 1), default 0.99
        EMA decay; the window is about 1 / (1 - beta) steps.
    eps : float, default 1e-12
        Relative to the second moment: ``eps * v`` is added to the variance,
        so that constant gradients give a large finite SNR (``1/sqrt(eps)``)
        instead of inf, and the SNR does not change with the gradients' scale
        (a loss scale, a tiny learning signal).

    Attributes
    ----------
    steps : int
        Updates folded into the averages (read from the device: a
        synchronisation on a GPU).
    skipped : int
        Updates left out because a gradient held NaN or inf (read from the
        device likewise).

    Notes
    -----
    On an accelerator :meth:`update` runs without a host synchronisation: the finite check, the
    choice between the updated and the unchanged averages (``torch.where``, so
    that a NaN of a left-out step cannot leak into them) and both counts stay
    on the parameters' device. The warning about left-out steps therefore
    cannot come at the step: it is given once per tracker, by the first
    :meth:`snr`, :meth:`summary` or :meth:`state_dict` after a step was left
    out. A tracker that loads a state with left-out steps does not warn
    again for them or for later ones (the saving tracker warned).

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
        # A parameter listed twice (encoders sharing a layer, their parameters chained) is watched
        # once, as a module's parameters() lists it: twice, the summary would weight it double.
        self.params = list({id(p): p for p in parameters if p.requires_grad}.values())
        if not self.params:
            raise ValueError("parameters must contain at least one tensor with requires_grad=True")
        if not is_real(beta) or not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be a float in (0, 1) (the EMA decay), got {beta!r}")
        if not is_real(eps) or not 0 <= eps < math.inf:
            raise ValueError(f"eps must be a finite number >= 0 (relative to the second moment; default 1e-12), "
                             f"got {eps!r}")
        self.beta = float(beta)
        self.eps = float(eps)
        # Flat buffers: one cat per update and a handful of in-place ops keep the
        # tracker's cost a small fraction of a training step. float64, because the
        # variance is v - m^2: at an SNR of 10^4 it is 10^-8 of v, below float32's
        # resolution (MPS has no float64: float32 there).
        total = sum(p.numel() for p in self.params)
        device = self.params[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.m = torch.zeros(total, dtype=dtype, device=device)
        self.v = torch.zeros(total, dtype=dtype, device=device)
        self._g = torch.empty(total, dtype=dtype, device=device)  # each update's gradients, converted in the cat
        # (updates folded in, updates left out), on the device: update() never reads them.
        self._counts = torch.zeros(2, dtype=torch.int64, device=device)
        # On the CPU a read-back costs nothing and the masked update took 1.1-1.4x the in-place
        # one's time (0.1-1M parameters, one thread, interleaved); on an accelerator the masked
        # update saves a synchronisation per step. Both give the same bits (tested).
        self._masked = device.type != "cpu"
        self._warned = False  # the left-out steps were reported (once per tracker)

    @property
    def steps(self) -> int:
        """Updates folded into the averages (a read from the device)."""
        return int(self._counts[0])

    @property
    def skipped(self) -> int:
        """Updates left out because a gradient held NaN or inf (a read from the device)."""
        return int(self._counts[1])

    @torch.no_grad()
    def update(self) -> Tensor:
        """Fold the current ``.grad`` of every parameter into the two EMAs.

        A gradient holding NaN or inf (a mixed-precision step whose scale
        overflowed, a diverged step) is left out, as a ``GradScaler`` skips
        the optimizer's step: folded in, it would leave the averages NaN for
        good. A left-out step leaves the averages bit for bit as they were
        and adds one to :attr:`skipped`. On an accelerator nothing is read
        back to the host: the check runs on the device and the step is
        applied masked; on the CPU, where a read-back is free, a branch
        applies it in place (cheaper; the same bits).
        The warning about left-out steps comes when the results are read
        (see Notes of :class:`GradientSNR`).

        Returns
        -------
        Tensor
            0-dim bool tensor on the parameters' device: whether the gradient
            was folded in. Reading it (``bool(...)``) synchronises; ignoring
            it does not.
        """
        # cat converts to the moments' dtype as it copies: one pass, into a buffer kept for the next update.
        g = torch.cat([_dense_grad(p).reshape(-1) for p in self.params], out=self._g)
        if self._masked:
            ok = torch.isfinite(g).all()
        else:
            # A sum is finite exactly when every term is, unless finite terms overflow it (float64
            # gradients near 1e308): on the CPU one reduction, then the elementwise test only where
            # the two may differ (the test was a fifth of the tracker's time at 1e5 parameters).
            ok = torch.isfinite(g.sum())
            if not bool(ok):
                ok = torch.isfinite(g).all()
        if self._masked:
            # The arithmetic of the plain update, out of place, then chosen lane by lane: a
            # left-out step's NaN stays in the discarded candidate (0 * NaN would be NaN).
            candidate = self.m.mul(self.beta).add_(g, alpha=1 - self.beta)
            torch.where(ok, candidate, self.m, out=self.m)
            torch.mul(self.v, self.beta, out=candidate).addcmul_(g, g, value=1 - self.beta)
            torch.where(ok, candidate, self.v, out=self.v)
        elif bool(ok):
            self.m.mul_(self.beta).add_(g, alpha=1 - self.beta)
            self.v.mul_(self.beta).addcmul_(g, g, value=1 - self.beta)
        self._counts.add_(torch.stack((ok, ~ok)))
        return ok

    def _read_counts(self, stacklevel: int) -> tuple[int, int]:
        """(steps, skipped) in one read; warns once per tracker about left-out steps."""
        steps, skipped = self._counts.tolist()
        if skipped and not self._warned:
            self._warned = True
            warnings.warn(f"GradientSNR: {skipped} of {steps + skipped} updates were left out of the averages "
                          "because a gradient held NaN or inf (GradientSNR.skipped counts them; this warning "
                          "is given once)", RuntimeWarning, stacklevel=stacklevel + 1)
        return steps, skipped

    def snr(self) -> Tensor:
        """SNR of every scalar parameter, flattened (float32), in ``parameters`` order.

        Reads the step counts from the device; warns (once) if updates were left out."""
        s, factor = self._snr(*self._read_counts(stacklevel=2))
        return s.mul_(factor).float()

    @torch.no_grad()
    def _snr(self, steps: int, skipped: int) -> tuple[Tensor, float]:
        """The SNR of every scalar parameter up to a common factor, and that factor."""
        if steps == 0:
            why = f" ({skipped} update{'s' if skipped != 1 else ''} skipped: NaN or inf gradients)" if skipped else ""
            raise RuntimeError("GradientSNR.snr() before any gradient was folded in by update()" + why
                               + ": call update() after backward() first")
        inv = 1.0 / (1.0 - self.beta**steps)  # Adam-style bias correction
        # With m' = inv m, v' = inv v (bias-corrected): |m'| / sqrt(max(v' - m'^2, 0) + eps v')
        # = sqrt(inv) |m| / sqrt(max(v - inv m^2, 0) + eps v): the correction is two scalars, and the
        # chain runs in place on one new buffer (each an (n,) float64 that a CPU's caches barely hold).
        scale = torch.addcmul(self.v, self.m, self.m, value=-inv).clamp_(min=0).add_(self.v, alpha=self.eps)
        # A parameter whose gradient was always zero (v = 0) gets SNR 0, not 0/0.
        scale.clamp_(min=torch.finfo(scale.dtype).tiny).rsqrt_()
        return scale.mul_(self.m).abs_(), math.sqrt(inv)

    def summary(self) -> dict[str, float]:
        """``{"snr_mean": mean over parameters, "snr_std": std across parameters}``.

        Warns (once) if updates were left out."""
        s, factor = self._snr(*self._read_counts(stacklevel=2))
        # Two reductions (the sum, the sum of squares as a dot): faster than std_mean on CPU. The
        # common factor scales both statistics, so it multiplies two numbers instead of n.
        mean = float(s.sum(dtype=torch.float64)) / s.numel()
        second = float(torch.dot(s, s)) / s.numel()
        return {"snr_mean": factor * mean, "snr_std": factor * max(second - mean * mean, 0.0) ** 0.5}

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call :meth:`update` before every ``optimizer.step()``; returns the hook handle."""
        def hook(*_) -> None:  # a pre-hook's return value would replace the step's arguments
            self.update()

        return optimizer.register_step_pre_hook(hook)

    def state_dict(self) -> dict:
        """``{"steps": int, "m": Tensor, "v": Tensor, "skipped": int, "beta": float}`` (the counts
        as plain ints, as before they were kept on the device). Warns (once) if updates were left out."""
        steps, skipped = self._read_counts(stacklevel=2)
        return {"steps": steps, "m": self.m.clone(), "v": self.v.clone(), "skipped": skipped, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        """Load a :meth:`state_dict`; states saved before the skipped count (no ``"skipped"``)
        load with none, and counts saved as 0-dim tensors load too."""
        missing = {"steps", "m", "v"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; pass a dict made by GradientSNR.state_dict()")
        for key in ("m", "v"):  # both: copy_ would broadcast a single value over every parameter, silently
            if not isinstance(state[key], Tensor) or state[key].shape != self.m.shape:
                got = tuple(state[key].shape) if isinstance(state[key], Tensor) else type(state[key]).__name__
                raise ValueError(f"state[{key!r}] must be a tensor of {self.m.numel()} moments (one per scalar "
                                 f"parameter the tracker watches), got {got}: was it saved for other parameters?")
        if "beta" in state and float(state["beta"]) != self.beta:
            # The moments are averages over another window: continued at this beta, the SNR would mix the two.
            raise ValueError(f"state was saved with beta={state['beta']}, this tracker has beta={self.beta}; "
                             f"create it with beta={state['beta']}")
        steps = int(state["steps"])
        skipped = int(state.get("skipped", 0))  # states saved before 2026-12-03 have no count
        self._counts.copy_(torch.tensor([steps, skipped], dtype=torch.int64))
        self._warned = skipped > 0  # the saving tracker warned (its state_dict() did)
        self.m.copy_(state["m"])
        self.v.copy_(state["v"])
