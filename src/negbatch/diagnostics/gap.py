"""The gap between the global and the training contrastive loss
(Sachidananda et al. 2023), the quantity that GCBS bounds.

With anchors ``x_i``, positives ``y_i`` and ``s_ij = x_i·y_j`` (cosine by
default), a batch assignment ``B(i)`` (the batch holding sample i):

    L^Global = mean_i [ -s_ii/τ + log Σ_{j=1..N}  exp(s_ij/τ) ]
    L^Train  = mean_i [ -s_ii/τ + log Σ_{j∈B(i)} exp(s_ij/τ) ]

both means over the anchors that the batches contain. The gap
``L^Global - L^Train = mean_i [lse_all(i) - lse_batch(i)] >= 0`` is small
when every anchor's strongest negatives share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .._checks import check_embeddings, check_positive_int, check_same, check_temperature

__all__ = ["GapResult", "global_train_gap"]


@dataclass(frozen=True)
class GapResult:
    """``global_loss - train_loss == gap``; ``num_anchors`` anchors averaged.

    Examples
    --------
    >>> import torch
    >>> from negbatch import global_train_gap
    >>> result = global_train_gap(torch.randn(8, 4), [[0, 1, 2, 3], [4, 5, 6, 7]], temperature=0.5)
    >>> abs(result.global_loss - result.train_loss - result.gap) < 1e-9, result.num_anchors
    (True, 8)
    """

    global_loss: float
    train_loss: float
    gap: float
    num_anchors: int


def _check_batches(batches: Sequence[Sequence[int]], n: int) -> list[Tensor]:
    if isinstance(batches, Tensor) or not hasattr(batches, "__iter__"):
        raise TypeError("batches must be a sequence of index sequences (one per batch)")
    out = []
    for i, b in enumerate(batches):
        arr = np.asarray(b)
        if arr.ndim != 1:
            # A flat list of indices (one batch not wrapped in a list) became N batches of one sample.
            raise ValueError(f"batches[{i}] is {b!r}, not a 1-d sequence of sample indices: batches is a sequence "
                             f"of batches; wrap a single batch in a list ([batch])" if arr.ndim == 0 else
                             f"batches[{i}] has shape {arr.shape}; each batch must be a 1-d sequence of sample indices")
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"batches must hold integer sample indices, got {arr.dtype} values (e.g. {arr.flat[0]!r})")
        t = torch.as_tensor(arr.astype(np.int64, copy=False))
        if t.numel() == 0:
            raise ValueError("batches contains an empty batch")
        if int(t.min()) < 0 or int(t.max()) >= n:
            raise ValueError(f"batches holds index {int(t.max()) if int(t.max()) >= n else int(t.min())}, "
                             f"outside [0, {n})")
        out.append(t)
    if not out:
        raise ValueError("batches is empty")
    flat = torch.cat(out)
    if torch.unique(flat).numel() != flat.numel():
        raise ValueError("batches must not repeat an index (each anchor belongs to one batch)")
    return out


def global_train_gap(
    embeddings: Tensor | tuple[Tensor, Tensor],
    batches: Sequence[Sequence[int]],
    temperature: float,
    *,
    normalize: bool = True,
    block_size: int = 4096,
) -> GapResult:
    """L^Global minus L^Train for a batch assignment, blockwise.

    Parameters
    ----------
    embeddings : Tensor or (Tensor, Tensor)
        ``(X, Y)``, anchors and their positives, ``(N, d)`` each (the paper's
        setting). A single tensor ``Z`` means ``X = Y = Z``.
    batches : sequence of sequences of int
        The batches of an epoch (e.g. ``list(sampler)``); an index may occur
        once at most. Anchors in no batch are left out of both means.
    temperature : float
        τ > 0.
    normalize : bool
        L2-normalise rows (cosine similarities).
    block_size : int
        Rows of ``X`` per block; memory O(block_size · N).

    Returns
    -------
    GapResult

    Examples
    --------
    >>> from negbatch import global_train_gap
    >>> import torch
    >>> x = torch.randn(50, 8)
    >>> r = global_train_gap((x, x + 0.1 * torch.randn_like(x)), [range(0, 25), range(25, 50)], 0.1)
    >>> r.gap >= 0
    True
    """
    if isinstance(embeddings, Tensor):
        x = y = embeddings
    elif isinstance(embeddings, (tuple, list)) and len(embeddings) == 2:
        x, y = embeddings
    else:
        raise TypeError("embeddings must be a tensor Z or a pair (X, Y) of tensors")
    check_embeddings(x, "X")
    check_embeddings(y, "Y")
    check_same(x, y, "X", "Y", dims=(0, 1))
    tau = check_temperature(temperature)
    block_size = check_positive_int(block_size, "block_size")
    n = x.shape[0]
    groups = _check_batches(batches, n)
    # At least float32: in bf16 the products and log-sum-exps lose the gap (16% off at tau = 0.05).
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
        y = torch.nn.functional.normalize(y, dim=1)
    anchors = torch.cat(groups).to(x.device)
    with torch.no_grad():
        # global: each used anchor against all N positives, a block of anchors at a time
        lse_all = torch.cat([torch.logsumexp(x[blk] @ y.T / tau, dim=1) for blk in torch.split(anchors, block_size)])
        lse_batch = torch.cat([torch.logsumexp(x[b] @ y[b].T / tau, dim=1) for b in (g.to(x.device) for g in groups)])
        pos = (x[anchors] * y[anchors]).sum(1) / tau
        global_loss = float((lse_all - pos).double().mean())
        train_loss = float((lse_batch - pos).double().mean())
        gap = float((lse_all - lse_batch).double().mean())
    return GapResult(global_loss, train_loss, gap, int(anchors.numel()))
