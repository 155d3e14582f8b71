"""gather=True under DDP equals the single-process loss on the global batch.

Two real processes on the gloo backend. Each rank holds half of the batch,
trains a DDP-wrapped encoder with gather=True, and compares every parameter's
gradient (after DDP's averaging) with the gradient of a plain copy of the
model on the concatenated global batch, in the same process.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import run_distributed
from negbatch import InfoNCE, ReLIC, same_id_mask
from negbatch.distributed import gather_nograd, gather_with_grad

pytestmark = pytest.mark.distributed

B, D_IN, D = 8, 6, 4  # global batch, input and embedding widths


def _case(name):
    if name == "two_view_all":
        return InfoNCE(temperature=0.3), dict(form="views")
    if name == "two_view_k":
        return InfoNCE(temperature=0.3, negatives=5), dict(form="views", seed=3)
    if name == "two_view_mask_k":
        return InfoNCE(temperature=0.3, negatives=4), dict(form="views", seed=4, mask=True)
    if name == "qd_hard_symmetric_mask":
        return InfoNCE(temperature=0.3, form="query_document", symmetric=True), dict(form="qd", hard=2, mask=True)
    if name == "qd_k":
        return InfoNCE(temperature=0.3, negatives=6, form="query_document", symmetric=True), dict(form="qd", hard=2, seed=5)
    if name == "two_view_sum":
        return InfoNCE(temperature=0.3, reduction="sum"), dict(form="views")
    if name == "qd_k_sum":
        return InfoNCE(temperature=0.3, negatives=6, form="query_document", symmetric=True,
                       reduction="sum"), dict(form="qd", hard=2, seed=5)
    if name == "relic_k_mask":
        return ReLIC(temperature=0.3, alpha=0.5, negatives=3), dict(form="views", seed=6, mask=True)
    raise KeyError(name)


def _loss(loss_fn, model, x1, x2, hard, mask, opts):
    gen = torch.Generator().manual_seed(opts["seed"]) if "seed" in opts else None
    if opts["form"] == "views":
        return loss_fn(model(x1), model(x2), mask=mask, generator=gen)
    h = model(hard.reshape(-1, D_IN)).reshape(hard.shape[0], -1, D)
    return loss_fn(model(x1), model(x2), h, mask=mask, generator=gen)


def _worker(rank, world, name, cut=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, D)).double()
    reference = copy.deepcopy(model)
    loss_fn, opts = _case(name)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(B, D_IN, generator=g).double(), torch.randn(B, D_IN, generator=g).double()
    hard = torch.randn(B, opts.get("hard", 1), D_IN, generator=g).double()
    labels = torch.randint(0, 4, (B,), generator=g)
    n_cols = B * (1 + opts.get("hard", 0)) if opts["form"] == "qd" else B
    full_mask = None
    if opts.get("mask"):
        full_mask = torch.zeros(B, n_cols, dtype=torch.bool)
        full_mask[:, :B] = same_id_mask(labels, labels)

    # single process, global batch, no gather
    single = copy.copy(loss_fn)
    single.gather = False
    want_loss = _loss(single, reference, x1, x2, hard, full_mask, opts)
    want_loss.backward()

    # this rank's half (or, with ``cut``, rows [0, cut) and [cut, B)), gather=True, DDP
    lo, hi = rank * B // world, (rank + 1) * B // world
    if cut is not None:
        lo, hi = (0, cut) if rank == 0 else (cut, B)
    local_mask = None
    if full_mask is not None:
        # columns: documents of rank 0, of rank 1, then hard negatives in the same order
        local_mask = full_mask[lo:hi]
    dist_fn = copy.copy(loss_fn)
    dist_fn.gather = True
    ddp = DDP(model)
    loss = _loss(dist_fn, ddp, x1[lo:hi], x2[lo:hi], hard[lo:hi], local_mask, opts)
    loss.backward()

    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)  # each rank returns its share of the global mean (or sum)
    assert torch.allclose(mean_loss / world, want_loss.detach(), rtol=1e-10), (mean_loss / world, want_loss)
    for (pname, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12), f"{name}: {pname} differs on rank {rank}"


EVEN = ["two_view_all", "two_view_k", "two_view_mask_k", "qd_hard_symmetric_mask", "qd_k", "relic_k_mask",
        "two_view_sum", "qd_k_sum"]
# 5 rows on rank 0, 3 on rank 1: DDP's equal-weight average must still give the gradient of the mean
# over the 8 rows.
UNEVEN = ["two_view_k", "qd_hard_symmetric_mask", "relic_k_mask", "two_view_sum"]


def _every_case(rank, world):
    for name in EVEN:
        _worker(rank, world, name)
    for name in UNEVEN:
        _worker(rank, world, name, 5)
    _uneven_worker(rank, world)


def test_gather_gradient_equals_single_process_even_and_uneven_ranks():
    """Every case in one spawn of two processes (starting them is the slow part): each loss's gradient
    under gather=True and DDP equals the single-process gradient of the global batch, with even
    and uneven ranks; and gather_with_grad on uneven ranks sums the gradients of all ranks."""
    run_distributed(_every_case, 2)


def _uneven_worker(rank, world):
    x = torch.full((rank + 2, 3), float(rank), requires_grad=True)  # 2 rows on rank 0, 3 on rank 1
    gathered, offset = gather_with_grad(x)
    assert gathered.shape == (5, 3) and offset == (0 if rank == 0 else 2)
    assert torch.equal(gathered[:, 0], torch.tensor([0.0, 0, 1, 1, 1]))
    weights = torch.arange(5, dtype=torch.float32)[:, None] * (rank + 1)
    (gathered * weights).sum().backward()
    # d/dx of the sum over ranks of (rank + 1) * row_weight: 3 * row_weight
    expected = 3 * torch.arange(5, dtype=torch.float32)[offset : offset + x.shape[0], None].expand_as(x)
    assert torch.equal(x.grad, expected)
    assert torch.equal(gather_nograd(x)[:, 0], torch.tensor([0.0, 0, 1, 1, 1]))



def _mismatched_worker(rank, world):
    # Rows of another width, dtype or number of hard negatives on one rank: gloo aborted both processes
    # ("terminate called after throwing an instance of 'gloo::EnforceNotMet'"); now every rank raises.
    z = torch.randn(3, 4 if rank == 0 else 6, requires_grad=True)
    with pytest.raises(ValueError, match=r"rank 0: float32 rows of shape \(8,\); rank 1: float32 rows of shape \(12,\)"):
        InfoNCE(temperature=0.3, gather=True)(z, z)
    z = torch.randn(3, 4, dtype=torch.float32 if rank == 0 else torch.float64)
    with pytest.raises(ValueError, match=r"rank 1: float64 rows of shape \(4,\).*of one width and dtype"):
        gather_nograd(z)
    q = torch.randn(3, 4, requires_grad=True)
    hard = torch.randn(3, 1 + rank, 4)
    with pytest.raises(ValueError, match=r"\(12,\); rank 1: float32 rows of shape \(16,\).*as many hard negatives"):
        InfoNCE(temperature=0.3, form="query_document", gather=True)(q, q, hard)
    # Many trailing dims, alike on both ranks (and rows of another count): gathered.
    x = torch.full((1 + rank, 2, 1, 3, 2, 2), float(rank))
    assert gather_with_grad(x)[0].shape == (3, 2, 1, 3, 2, 2)


def test_rows_of_another_shape_or_dtype_on_one_rank_raise_on_every_rank():
    run_distributed(_mismatched_worker, 2)
