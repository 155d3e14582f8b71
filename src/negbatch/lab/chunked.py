"""Chunked training steps for the lab's trainer (``TrainConfig.chunk_size``).

Two ways to push a batch of B pairs through the encoder ``chunk_size`` rows
at a time, so that only one chunk's activation graph is alive:

* :func:`cached_forward_backward` -- gradient caching (:class:`negbatch.GradCache`):
  the loss sees all B pairs (2B - 2 negatives per anchor in SimCLR), and the
  gradient is the plain step's for encoders without cross-sample layers;
* :func:`accumulated_forward_backward` -- gradient accumulation: one loss per
  chunk, so each anchor is contrasted only with its own chunk (2c - 2
  negatives), the baseline gradient caching is measured against.

Both encode the two views separately, chunk by chunk, so a BatchNorm layer
sees the same c rows of one view in both methods (per-chunk statistics: not
the plain step's, which normalises the 2B rows of both views together).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..distributed import world_size
from ..gradcache import GradCache
from ..losses import GlobalInfoNCE

__all__ = ["cached_forward_backward", "accumulated_forward_backward"]


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def cached_forward_backward(
    model: nn.Module, loss_fn: nn.Module, batch, generator: torch.Generator, chunk_size: int, precision=None
) -> Tensor:
    """Gradient-cached forward/backward of one batch: ``.grad`` receives the
    gradient of ``loss_fn(z1, z2, batch, generator)`` on the whole batch.

    Parameters
    ----------
    model : nn.Module
        Encoder and head, shared by both views.
    loss_fn : nn.Module
        Called once per step as ``loss_fn(z1, z2, batch, generator)``, as in
        the plain step, so a seeded generator draws the same negatives.
    batch : negbatch.lab.tasks.image.Batch
    generator : torch.Generator
    chunk_size : int
        Rows of one view per chunk (the last chunk may be smaller).
    precision : negbatch.lab.precision.Precision, optional
        Autocast and loss scaling (GradCache applies both itself).

    Returns
    -------
    Tensor: the detached loss of the whole batch.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from negbatch.lab.tasks.image import Batch, PairLoss
    >>> from negbatch.lab.chunked import cached_forward_backward
    >>> from negbatch import InfoNCE
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
    >>> batch = Batch(torch.arange(10), torch.rand(10, 1, 8, 8), torch.rand(10, 1, 8, 8))
    >>> loss = cached_forward_backward(model, PairLoss(InfoNCE(temperature=0.2)), batch, torch.Generator(), 4)
    >>> loss.shape, model[1].weight.grad is not None
    (torch.Size([]), True)
    """
    _check_chunk_size(chunk_size)

    def full_batch_loss(z1: Tensor, z2: Tensor, *, generator: torch.Generator) -> Tensor:
        return loss_fn(z1, z2, batch, generator)

    amp = dict(autocast=precision.autocast_kwargs, scaler=precision.scaler) if precision is not None else {}
    cache = GradCache(model, full_batch_loss, chunk_size, **amp)
    return cache.step(batch.view1, batch.view2, generator=generator)


def check_accumulated_chunks(chunk_size: int, processes: int) -> None:
    """Accumulated chunks hold ``chunk_size`` rows over all processes, ``chunk_size / processes`` each."""
    if chunk_size % processes:
        raise ValueError(f"chunk_size={chunk_size} (rows per chunk's loss, over all processes) must be divisible by "
                         f"the {processes} processes; pick a multiple of {processes}")


def accumulated_forward_backward(
    model: nn.Module, loss_fn: nn.Module, batch, generator: torch.Generator, chunk_size: int, precision=None
) -> Tensor:
    """Gradient accumulation over chunks of ``chunk_size`` pairs: the loss of
    each chunk (its own negatives only), weighted by the chunk's share of the
    batch, back-propagated chunk by chunk.

    Returns the detached weighted mean of the chunk losses (not the full-batch
    loss: every chunk contrasts fewer negatives). A GlobalInfoNCE loss updates
    each chunk's samples with this step's gamma and counts one E-step for the
    whole batch, as the plain step does.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from negbatch.lab.tasks.image import Batch, PairLoss
    >>> from negbatch.lab.chunked import accumulated_forward_backward
    >>> from negbatch import InfoNCE
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
    >>> batch = Batch(torch.arange(10), torch.rand(10, 1, 8, 8), torch.rand(10, 1, 8, 8))
    >>> accumulated_forward_backward(model, PairLoss(InfoNCE(temperature=0.2)), batch, torch.Generator(), 5).shape
    torch.Size([])
    """
    _check_chunk_size(chunk_size)
    # Under several processes the loss gathers every process's chunk: each process takes
    # chunk_size / N rows, so that a chunk's loss still has chunk_size rows (the chunks hold
    # other samples than one process's, so such a run is not the one-process run).
    processes = world_size()
    check_accumulated_chunks(chunk_size, processes)
    chunk_size //= processes
    n = batch.view1.shape[0]
    total = torch.zeros(())
    counters = _step_counters(loss_fn)
    step = [int(c) for c in counters]
    for start in range(0, n, chunk_size):
        part = slice(start, min(start + chunk_size, n))
        for counter, value in zip(counters, step):
            counter.fill_(value)  # every chunk at this optimizer step's gamma
        sub = type(batch)(batch.index[part], batch.view1[part], batch.view2[part])
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            z1, z2 = model(sub.view1), model(sub.view2)
            loss = loss_fn(z1, z2, sub, generator) * ((part.stop - part.start) / n)
        if precision is not None:
            precision.backward(loss)
        else:
            loss.backward()
        total = total + loss.detach().cpu()
    for counter, value in zip(counters, step):
        counter.fill_(value + 1)  # one E-step per optimizer step, as the schedule counts
    return total


def _step_counters(loss_fn: nn.Module) -> list[Tensor]:
    """The E-step counters (``num_updates``) of the GlobalInfoNCE losses in
    ``loss_fn``. Each chunk's call updates its own samples' state (every
    sample once a step, as in the plain step) but would also advance the
    counter that indexes the gamma schedule, which counts optimizer steps."""
    return [m.num_updates for m in loss_fn.modules() if isinstance(m, GlobalInfoNCE)]
