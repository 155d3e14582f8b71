"""Gathering across processes, with gradients, for losses that contrast each
rank's anchors with the candidates of every rank.

The trap this module exists to avoid: ``torch.distributed.all_gather`` carries
no gradient, and the usual patch (put the local tensor back into the gathered
list) drops every other rank's contribution to the local embeddings. After
DDP's averaging this gives a gradient that is neither the global one nor a
multiple of it. :func:`gather_with_grad` instead sums, in the backward, the
gradient that every rank's loss sends to this rank's rows. With each rank
returning the *mean over its local anchors*, DDP's average over ranks then
yields exactly the gradient of the mean over all anchors of the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed", "world_size", "rank", "gather_with_grad", "gather_with_sizes", "gather_nograd",
    "global_batch_mean", "global_batch_sum", "broadcast_object",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)
_KEPT_DIMS = 4  # trailing dims described one by one; any further ones multiply into the last


def _describe(x: Tensor) -> list[int]:
    """``[rows, dtype code, ndim, trailing dims...]``, one fixed length for every tensor."""
    dims = list(x.shape[1:])
    if len(dims) > _KEPT_DIMS:
        dims = dims[: _KEPT_DIMS - 1] + [math.prod(dims[_KEPT_DIMS - 1 :])]
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
    return [x.shape[0], code, x.dim()] + dims + [0] * (_KEPT_DIMS - len(dims))


def _gather_sizes(x: Tensor) -> list[int]:
    """Every rank's number of rows of ``x``, after checking that all ranks hold rows
    of one shape and dtype (all raise together: gloo aborted the process, NCCL hangs)."""
    mine = torch.tensor(_describe(x), dtype=torch.long, device=x.device)
    every = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(every, mine)
    described = [d.tolist() for d in every]
    if any(d[1:] != described[0][1:] for d in described):
        def what(d: list[int]) -> str:
            dtype = str(_DTYPES[d[1]]).replace("torch.", "") if d[1] >= 0 else "another dtype"
            return f"{dtype} rows of shape {tuple(d[3 : 3 + min(d[2] - 1, _KEPT_DIMS)])}"

        ranks = "; ".join(f"rank {r}: {what(d)}" for r, d in enumerate(described))
        raise ValueError(f"gathering across ranks needs rows of one shape and dtype on every rank, got {ranks}; a "
                         "loss with gather=True sends each row's embeddings side by side (both sides, its hard "
                         "negatives): give every rank embeddings of one width and dtype, and as many hard negatives")
    return [d[0] for d in described]


def _all_gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    """all_gather along dim 0 for ranks holding different numbers of rows."""
    longest = max(sizes)
    if x.shape[0] < longest:
        pad = x.new_zeros((longest - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], offset: int) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.offset, ctx.n = sizes, offset, x.shape[0]
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Every rank's loss may depend on our rows: sum their gradients.
        # (gloo has no reduce_scatter, so all_reduce and keep our slice.)
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset : ctx.offset + ctx.n], None, None


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``x`` (dim 0) from every rank, keeping gradients.

    Returns ``(gathered, offset)``: the rows of all ranks in rank order and the
    index of this rank's first row in them. Ranks may hold different numbers of
    rows. Without an initialised process group it returns ``(x, 0)``.
    """
    gathered, sizes = gather_with_sizes(x)
    return gathered, sum(sizes[: rank()])


def gather_with_sizes(x: Tensor) -> tuple[Tensor, list[int]]:
    """:func:`gather_with_grad` returning every rank's number of rows (rank
    order) instead of the offset: what tells, on every rank, which rank a
    gathered row came from. Without a process group: ``(x, [len(x)])``."""
    if not is_distributed() or world_size() == 1:
        return x, [x.shape[0]]
    sizes = _gather_sizes(x)
    return _GatherWithGrad.apply(x, sizes, sum(sizes[: rank()])), sizes


def global_batch_mean(per_anchor: Tensor, local_rows: int, global_rows: int) -> Tensor:
    """This rank's share of the mean over the global batch, for DDP.

    DDP averages the ranks' gradients with equal weights, so the mean over
    this rank's anchors gives the gradient of the global mean only when every
    rank holds the same number of rows. This returns the local mean times
    ``world_size * local_rows / global_rows``: the local mean itself when the
    ranks are even, and in every case a value whose average over the ranks
    is the mean over the global batch.
    """
    mean = per_anchor.mean()
    w = world_size()
    if w == 1 or global_rows == w * local_rows:
        return mean
    return mean * (w * local_rows / global_rows)


def global_batch_sum(per_anchor: Tensor) -> Tensor:
    """This rank's share of the sum over the global batch, for DDP: the
    local sum times ``world_size``, since DDP divides the ranks' summed
    gradients by ``world_size`` (the plain local sum would give the gradient
    of the global sum divided by the number of ranks)."""
    total = per_anchor.sum()
    w = world_size()
    return total if w == 1 else total * w


def gather_nograd(x: Tensor) -> Tensor:
    """Concatenate ``x`` (dim 0) from every rank, without gradients."""
    if not is_distributed() or world_size() == 1:
        return x
    sizes = _gather_sizes(x)
    return _all_gather_padded(x.detach(), sizes)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (every rank must call it): a decision
    that must be the same everywhere, as one process on the global batch makes it."""
    if not is_distributed() or world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def every_rank(values: Tensor) -> Tensor:
    """``values`` (a few integers, 1-d) of every rank, one row per rank in rank
    order (every rank must call it): one small all-gather, for a decision that
    every rank must take alike and an error that names each rank's part."""
    if not is_distributed() or world_size() == 1:
        return values[None]
    every = [torch.empty_like(values) for _ in range(world_size())]
    dist.all_gather(every, values.contiguous())
    return torch.stack(every)


def rows_rank(sizes: Sequence[int], device: torch.device | None = None) -> Tensor:
    """The rank holding each row of a gather of ``sizes`` rows per rank (rank
    order): what an error that every rank raises alike names."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(list(sizes), device=device))


def name_ranks(ranks: Sequence[int]) -> str:
    """``rank 1``, ``ranks 0, 2``."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from rank ``src`` to every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
