"""GlobalInfoNCE under torch.distributed: 2 real gloo processes against one
process on the global batch (state and parameter gradients)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from _dist import run_distributed
from negbatch import GlobalInfoNCE

N, B_GLOBAL, D_IN, D_OUT, STEPS = 24, 8, 6, 4, 3


def _setup():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    # Overlapping batches, so that steps 2 and 3 mix old and new estimates.
    perm = torch.randperm(N, generator=g)
    batches = [perm[:8], torch.cat([perm[:3], perm[8:13]]), perm[5:13].flip(0)]
    return x1, x2, batches


def _make(form, negatives):
    torch.manual_seed(1)
    model = torch.nn.Linear(D_IN, D_OUT).double()
    kw = dict(temperature=0.3, gamma=0.5, negatives=negatives, form=form, symmetric=form == "query_document")
    return model, kw


def _step(model, loss_fn, x1, x2, idx, step, mask=None):
    gen = torch.Generator().manual_seed(100 + step)
    out = loss_fn(model(x1[idx]), model(x2[idx]), idx, mask=mask, generator=gen)
    grads = torch.autograd.grad(out, list(model.parameters()))
    return out, grads


# (form, negatives, mask, rows of rank 0: None for an even split). Uneven ranks: DDP's
# equal-weight average must still give the gradient of the global mean.
CONFIGS = [("two_view", "all", False, None), ("two_view", 5, False, None), ("query_document", "all", False, None),
           ("two_view", "all", True, None), ("two_view", 5, False, 5), ("query_document", "all", True, 3)]


def _worker(rank, world, tmp):
    for form, negatives, use_mask, cut in CONFIGS:  # one process group for all: starting processes dominates the cost
        _compare(rank, world, form, negatives, use_mask, cut, os.path.join(tmp, f"{form}-{negatives}-{use_mask}-{cut}"))


def _compare(rank, world, form, negatives, use_mask, cut, tmp):
    os.makedirs(tmp, exist_ok=True)
    x1, x2, batches = _setup()
    model, kw = _make(form, negatives)
    dist_loss = GlobalInfoNCE(N, gather=True, **kw).double()
    ref_loss = GlobalInfoNCE(N, sync_state=False, **kw).double()  # one process, global batch
    half = B_GLOBAL // world
    rows = slice(rank * half, (rank + 1) * half)
    if cut is not None:
        rows = slice(0, cut) if rank == 0 else slice(cut, B_GLOBAL)
    for step, idx in enumerate(batches):
        local = idx[rows]
        # Sample-level false negatives ("same class" = same index mod 3), global columns.
        mask = (idx[:, None] % 3 == idx[None, :] % 3) if use_mask else None
        local_mask = mask[rows] if use_mask else None
        _, grads = _step(model, dist_loss, x1, x2, local, step, local_mask)
        grads = [g.clone() for g in grads]
        for g in grads:  # what DDP does: average over ranks
            dist.all_reduce(g)
            g /= world
        _, ref_grads = _step(model, ref_loss, x1, x2, idx, step, mask)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
        torch.testing.assert_close(dist_loss.log_nu, ref_loss.log_nu)
        assert torch.equal(dist_loss.visited, ref_loss.visited)
        assert int(dist_loss.num_updates) == step + 1
        with torch.no_grad():  # a small SGD step so that later steps see moved embeddings
            for p, g in zip(model.parameters(), grads):
                p -= 0.5 * g
    # Identical state on every rank, bit for bit.
    torch.save(dist_loss.state_dict(), os.path.join(tmp, f"state{rank}.pt"))
    dist.barrier()
    other = torch.load(os.path.join(tmp, f"state{1 - rank}.pt"))
    for k, v in dist_loss.state_dict().items():
        assert torch.equal(v, other[k]), k


def _bad_input_worker(rank, world, tmp):
    _duplicate(rank)
    _out_of_range(rank)
    _no_negatives_on_one_rank(rank)
    _nan_on_one_rank(rank)


def _nan_on_one_rank(rank):
    # Rank 1's embeddings hold NaN (gather=False, sync_state=True): it refuses them once it has
    # sent its indices, and sends NaN for its estimates, so that rank 0's E-step refuses too,
    # naming rank 1. Rank 0 used to wait in the gather of the indices.
    loss_fn = GlobalInfoNCE(10)
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    if rank == 1:
        z2[1, 0] = float("nan")
    with pytest.raises(ValueError, match="view2 contains NaN" if rank == 1 else r"\(log Zhat\) of rank 1 hold NaN"):
        loss_fn(z1, z2, torch.arange(3) + 3 * rank)
    assert not loss_fn.visited.any()


def _no_negatives_on_one_rank(rank):
    # Rank 1's mask leaves an anchor without negatives: it raises before the E-step's gather,
    # and rank 0, already in that gather, raises too (it waited for rank 1 forever).
    loss_fn = GlobalInfoNCE(10, gather=False, form="query_document")
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    if rank == 1:
        mask[0] = True
        mask[0, 0] = False
    with pytest.raises(ValueError, match="no negatives" if rank == 1 else "NaN or inf.*see that rank's error"):
        loss_fn(z1, z2, torch.tensor([0, 1, 2]) + 3 * rank, mask=mask)
    assert not loss_fn.visited.any()


def _duplicate(rank):
    loss_fn = GlobalInfoNCE(10, gather=True)
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    idx = torch.tensor([0, 1, 2]) + 2 * rank  # sample 2 on both ranks
    with pytest.raises(ValueError, match="duplicates"):
        loss_fn(z1, z2, idx)
    assert not loss_fn.visited.any()


def _every_case(rank, world, tmp):
    _worker(rank, world, tmp)
    _bad_input_worker(rank, world, tmp)


@pytest.mark.distributed
def test_two_ranks_match_one_process_and_bad_indices_raise_on_every_rank(tmp_path):
    """Both forms (query_document symmetric), all and K=5 sampled negatives, a mask; then
    duplicates across ranks, an out-of-range index, an anchor without negatives and NaN
    embeddings on rank 1 only: both ranks raise (no rank is left waiting in a collective; each
    collective times out after 60 s). One start for all (starting them is the slow part)."""
    run_distributed(_every_case, 2, str(tmp_path), timeout=60)


def _out_of_range(rank):
    loss_fn = GlobalInfoNCE(10, gather=True)
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    idx = torch.tensor([0, 1, 2]) + 8 * rank  # rank 1 holds 8, 9, 10
    with pytest.raises(ValueError, match="num_samples=10"):
        loss_fn(z1, z2, idx)  # both ranks raise; neither waits in a collective
    assert not loss_fn.visited.any()

