"""With gather=True, an error caused by one rank's batch is raised on every rank.

An anchor short of K candidates, an anchor without negatives (DCL, GlobalInfoNCE), NaN in
the embeddings or a rank without rows: until 2026-12 only the rank whose batch was at fault
raised, and the others went on into the next collective (the backward's all-reduce, the
next step's gather), where they failed when that rank's process died or waited forever when
it did not. Now every rank raises, naming the rank at fault. The same holds without gather for
a loss with a queue, since every rank's queue holds every rank's batch (the tests at the end).

Two real gloo processes. Every collective times out after TIMEOUT seconds (see
``run_distributed``), so a rank left waiting fails the test instead of blocking it; after
each refused call both ranks still meet in a gather, which shows that no rank was left a
collective behind.
"""

from __future__ import annotations

import pytest
import torch

import negbatch.losses._layout as layout_module
from _dist import run_distributed
from negbatch import DCL, GlobalInfoNCE, InfoNCE, ReLIC
from negbatch.negatives import ShortageError, candidate_counts
from negbatch.distributed import gather_nograd
from negbatch.losses._layout import build_layout

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

TIMEOUT = 60  # seconds a collective may wait for the other rank
B, D = 3, 4  # rows per rank, embedding width


def _in_step(rank):
    """Both ranks meet in one more gather: neither is a collective behind."""
    assert gather_nograd(torch.tensor([rank])).tolist() == [0, 1]


def _views(rank, seed=0):
    g = torch.Generator().manual_seed(seed + rank)
    return torch.randn(B, D, generator=g, requires_grad=True), torch.randn(B, D, generator=g, requires_grad=True)


def _gen():
    return torch.Generator().manual_seed(0)


def _exchanged(rank, world):
    # A mask of each rank's own rows (and the filter) decide counts that only that rank
    # knows: the ranks exchange them in one small all-gather.
    z1, z2 = _views(rank)
    mask = torch.zeros(B, world * B, dtype=torch.bool)
    if rank == 1:
        mask[0] = True  # sample 0 of rank 1 masks every sample: both its views have no candidate
    with pytest.raises(ShortageError, match=r"negatives=8 but 2 anchor\(s\) on rank 1 have fewer valid candidates "
                                            r"\(the fewest is 0 of 12 columns"):
        InfoNCE(temperature=0.5, negatives=8, gather=True)(z1, z2, mask=mask, generator=_gen())
    _in_step(rank)

    mask = torch.zeros(B, world * B, dtype=torch.bool)
    mask[: rank + 1] = True  # 1 sample of rank 0, 2 of rank 1
    with pytest.raises(ShortageError, match=r"but 2 anchor\(s\) on rank 0 and 4 on rank 1 have fewer"):
        InfoNCE(temperature=0.5, negatives=8, gather=True)(z1, z2, mask=mask, generator=_gen())
    _in_step(rank)

    # Every candidate masked on rank 0 only: DCL's denominator would be empty there.
    mask = torch.zeros(B, world * B, dtype=torch.bool)
    if rank == 0:
        mask[2] = True
    with pytest.raises(ValueError, match=r"2 anchor\(s\) on rank 0 have no negatives.*DCL's denominator"):
        DCL(temperature=0.5, gather=True)(z1, z2, mask=mask)
    _in_step(rank)

    # GlobalInfoNCE's normaliser needs a negative; the state stays untouched on both ranks.
    loss_fn = GlobalInfoNCE(10, form="query_document", gather=True)
    mask = torch.zeros(B, world * B, dtype=torch.bool)
    if rank == 1:
        mask[1] = True
    with pytest.raises(ValueError, match=r"1 anchor\(s\) on rank 1 have no negatives.*the normaliser Z"):
        loss_fn(z1, z2, torch.arange(B) + B * rank, mask=mask)
    assert not loss_fn.visited.any()
    _in_step(rank)

    # The filter judges each rank's own anchors: every positive is its anchor's copy (cosine 1,
    # nothing is closer) but rank 1's sample 0, whose positive is opposite its view (cosine -1),
    # so that a margin of 0 masks every candidate of both its views.
    z2 = z1.detach().clone()
    if rank == 1:
        z2[0] = -z2[0]
    with pytest.raises(ShortageError, match=r"negatives=6 but 2 anchor\(s\) on rank 1 have fewer"):
        InfoNCE(temperature=0.5, negatives=6, gather=True, filter_margin=0.0)(z1, z2, generator=_gen())
    _in_step(rank)


def test_a_shortage_or_no_negatives_of_one_rank_raises_on_every_rank():
    """Local masks and the filter: each rank's anchor counts travel in one all-gather, and both
    ranks raise the same error naming the rank (and how many anchors) at fault."""
    run_distributed(_exchanged, 2, timeout=TIMEOUT)


def _no_collective(*args):
    raise AssertionError("the counts of every rank are known on every rank: no collective is needed")


def _derived(rank, world):
    # Gathered labels (and a mask that symmetric query_document gathers whole) tell every rank
    # every anchor's candidates: the ranks agree without exchanging anything.
    layout_module.every_rank = _no_collective
    z1, z2 = _views(rank)
    labels = torch.zeros(B, dtype=torch.long) if rank == 1 else torch.tensor([1, 2, 3])
    # Rank 1's samples share a class: 12 columns less 2 x 3 of that class leave 6 < 8.
    with pytest.raises(ShortageError, match=r"but 6 anchor\(s\) on rank 1 have fewer.*fewest is 6 of 12"):
        InfoNCE(temperature=0.5, negatives=8, gather=True)(z1, z2, labels=labels, generator=_gen())
    _in_step(rank)
    with pytest.raises(ShortageError, match=r"but 6 anchor\(s\) on rank 1 have fewer"):
        InfoNCE(temperature=0.5, negatives=8, gather=True, positives="mask")(z1, z2, labels=labels, generator=_gen())
    _in_step(rank)
    # ReLIC: each view against the other view's 6 columns, less the 3 of the class.
    with pytest.raises(ShortageError, match=r"negatives=4 but 3 anchor\(s\) on rank 1 have fewer.*3 of 6"):
        ReLIC(temperature=0.5, negatives=4, gather=True)(z1, z2, labels=labels, generator=_gen())
    _in_step(rank)
    # Query-document with hard negatives (no label): 6 documents + 6 hard negatives less 3.
    hard = torch.randn(B, 1, D)
    with pytest.raises(ShortageError, match=r"negatives=10 but 3 anchor\(s\) on rank 1 have fewer.*9 of 12"):
        InfoNCE(temperature=0.5, negatives=10, form="query_document", gather=True)(
            z1, z2, hard, labels=labels, generator=_gen())
    _in_step(rank)
    # GlobalInfoNCE: after the error both ranks send their (NaN) estimates; the state stays untouched.
    loss_fn = GlobalInfoNCE(10, negatives=8, gather=True)
    with pytest.raises(ShortageError, match=r"but 6 anchor\(s\) on rank 1 have fewer"):
        loss_fn(z1, z2, torch.arange(B) + B * rank, labels=labels, generator=_gen())
    assert not loss_fn.visited.any()
    _in_step(rank)
    # Symmetric query_document gathers the mask: rank 1's query 0 masks every document.
    mask = torch.zeros(B, world * B, dtype=torch.bool)
    if rank == 1:
        mask[0] = True
    with pytest.raises(ShortageError, match=r"negatives=5 but 1 anchor\(s\) on rank 1 have fewer.*0 of 6"):
        InfoNCE(temperature=0.5, negatives=5, form="query_document", symmetric=True, gather=True)(
            z1, z2, mask=mask, generator=_gen())
    _in_step(rank)
    _counts_everywhere_are_the_local_counts(rank, world)


def _counts_everywhere_are_the_local_counts(rank, world):
    """What every rank computes for every anchor equals what the selection counts on the rank
    that holds it: random labels and masks, every layout that has such counts."""
    g = torch.Generator().manual_seed(5)  # the same draws on both ranks
    rows = 2 + rank  # uneven ranks: 2 and 3 rows
    total = 5
    a, b, hard = torch.randn(rows, D), torch.randn(rows, D), torch.randn(rows, 2, D)
    labels = torch.randint(0, 3, (total,), generator=g)
    mask = torch.rand(total, total * 3, generator=g) < 0.3
    lo = 0 if rank == 0 else 2
    mine = slice(lo, lo + rows)
    cases = [
        dict(form="two_view", labels=labels[mine]),
        dict(form="two_view", labels=labels[mine], mask_as_positives=True),
        dict(form="two_view", labels=labels[mine], bank="other_view"),
        dict(form="query_document", hard_negatives=hard, labels=labels[mine]),
        dict(form="query_document", symmetric=True, hard_negatives=hard, mask=mask[mine]),
        dict(form="query_document", symmetric=True, hard_negatives=hard, mask=mask[mine], labels=labels[mine],
             mask_as_positives=True),
        dict(form="query_document", symmetric=True, labels=labels[mine]),
    ]
    for case in cases:
        layout = build_layout(a, b, gather=True, **case)
        for direction in layout.directions:
            assert direction.counts_everywhere is not None, case
            local = candidate_counts(direction.positive_index, direction.bank.shape[0],
                                     self_index=direction.self_index, mask=direction.mask,
                                     positives=direction.positives)
            everywhere = direction.counts_everywhere()[mine]
            assert torch.equal(local, everywhere.repeat(local.shape[0] // rows)), case


def test_labels_or_a_gathered_mask_tell_every_rank_every_count_without_a_collective():
    """Labels (two_view, positives="mask", ReLIC, query_document with hard negatives,
    GlobalInfoNCE) and symmetric query_document's gathered mask: every rank computes every
    rank's counts and both raise, naming rank 1, with the all-gather of counts forbidden; the
    counts equal the selection's on uneven ranks."""
    run_distributed(_derived, 2, timeout=TIMEOUT)


def _gathered_checks(rank, world):
    z1, z2 = _views(rank)
    bad = z2.detach().clone()
    if rank == 1:
        bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"view2 contains NaN or inf on rank 1 \(every rank raises"):
        InfoNCE(temperature=0.5, gather=True)(z1, bad)
    _in_step(rank)
    hard = torch.randn(B, 2, D)
    if rank == 0:
        hard[0, 1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"hard_negatives contains NaN or inf on rank 0"):
        InfoNCE(temperature=0.5, form="query_document", gather=True)(z1, z2, hard)
    _in_step(rank)
    # The filter's guide embeddings are gathered as well.
    with pytest.raises(ValueError, match=r"guide view2 contains NaN or inf on rank 1"):
        InfoNCE(temperature=0.5, gather=True, filter_margin=0.1)(z1, z2, guide=(z1.detach(), bad))
    _in_step(rank)
    loss_fn = GlobalInfoNCE(10, gather=True)
    with pytest.raises(ValueError, match=r"view2 contains NaN or inf on rank 1"):
        loss_fn(z1, bad, torch.arange(B) + B * rank)
    assert not loss_fn.visited.any()
    _in_step(rank)
    # A rank without rows (a last batch smaller than the number of ranks).
    rows = B if rank == 0 else 0
    with pytest.raises(ValueError, match=r"view1 is an empty batch \(0 rows\) on rank 1; with gather=True every rank"):
        InfoNCE(temperature=0.5, gather=True)(z1[:rows], z2[:rows])
    _in_step(rank)


def test_nan_or_no_rows_on_one_rank_raise_on_every_rank_after_the_gather():
    """NaN or inf in one rank's views, hard negatives or guide embeddings, and a rank with an
    empty batch: found in the gathered rows, so both ranks raise, naming the input and the rank
    (the checks used to run before the gather, on the rank at fault only)."""
    run_distributed(_gathered_checks, 2, timeout=TIMEOUT)


# A queue without gather: every rank's queue holds every rank's batch, which the enqueue gathers
# (after the loss); the indices are gathered before the selection. A batch that one rank refused
# alone left the others waiting in one of those gathers.

def _queue_state(loss_fn):
    """The queue's buffers as one row of numbers."""
    return torch.cat([value.double().flatten() for value in loss_fn.queue.state_dict().values()])


def _queue_kept(rank, loss_fn, before):
    """After a refused call: both ranks meet in a gather, nothing was enqueued, and the two
    ranks' queues are still equal."""
    _in_step(rank)
    state = _queue_state(loss_fn)
    assert torch.equal(state, before)
    both = gather_nograd(state[None])
    assert torch.equal(both[0], both[1])


def _queue_inputs(rank, world):
    z1, z2 = _views(rank)
    idx = torch.arange(B) + B * rank
    loss_fn = InfoNCE(temperature=0.5, queue_size=24)
    loss_fn(z1, z2, indices=idx)  # the queue holds both views of both ranks' samples
    before = _queue_state(loss_fn)
    bad = z2.detach().clone()
    if rank == 1:
        bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"view2 contains NaN or inf on rank 1 \(every rank raises"):
        loss_fn(z1, bad, indices=idx + 10)
    _queue_kept(rank, loss_fn, before)
    with pytest.raises(ValueError, match=r"view2 contains NaN or inf on rank 1 \(every rank raises"):
        loss_fn(z1, bad, indices=idx + 10, update=False)
    _queue_kept(rank, loss_fn, before)
    # A rank without rows (a last batch smaller than the number of ranks).
    rows = B if rank == 0 else 0
    with pytest.raises(ValueError, match=r"view1 is an empty batch \(0 rows\) on rank 1; every rank raises"):
        loss_fn(z1[:rows], z2[:rows], indices=idx[:rows] + 10)
    _queue_kept(rank, loss_fn, before)
    # Embeddings of another width than the queue's, on rank 1 only.
    w1, w2 = (torch.randn(B, D + 1), torch.randn(B, D + 1)) if rank == 1 else (z1, z2)
    with pytest.raises(ValueError, match=r"the queue holds embeddings of width 4, got width 5 on rank 1 \(every"):
        loss_fn(w1, w2, indices=idx + 10)
    _queue_kept(rank, loss_fn, before)
    # Hard negatives of rank 0, symmetric query_document (two queues).
    dcl = DCL(temperature=0.5, form="query_document", symmetric=True, queue_size=12)
    dcl(z1, z2, indices=idx)
    before = _queue_state(dcl)
    hard = torch.randn(B, 2, D)
    if rank == 0:
        hard[0, 1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"hard_negatives contains NaN or inf on rank 0 \(every rank raises"):
        dcl(z1, z2, hard, indices=idx + 10)
    _queue_kept(rank, dcl, before)
    # Still in step: a valid call fills both ranks' queues alike.
    dcl(z1, z2, hard.nan_to_num(posinf=0.0), indices=idx + 10)
    _queue_kept(rank, dcl, _queue_state(dcl))


def test_a_queue_without_gather_refuses_the_inputs_of_one_rank_on_every_rank():
    """InfoNCE and DCL with a queue and gather=False: NaN in one rank's views (with and without
    update) or hard negatives, a rank without rows, and embeddings of another width than the
    queue's on one rank make both ranks raise the same error naming that rank; both still meet
    in a gather, and their queues are unchanged and equal."""
    run_distributed(_queue_inputs, 2, timeout=TIMEOUT)


def _counting_collectives():
    """Count every collective of this process (by name) from now on."""
    import torch.distributed as dist

    counts = {}
    for name in ("all_gather", "all_reduce", "broadcast"):
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return counts


def _queue_counts(rank, world):
    z1, z2 = _views(rank)
    # Uneven ranks and a queue still filling: rank 0's 3 samples give each view 4 candidates,
    # rank 1's 2 samples give 2.
    rows = B if rank == 0 else B - 1
    loss_fn = InfoNCE(temperature=0.5, negatives=4, queue_size=24)
    before = _queue_state(loss_fn)
    with pytest.raises(ShortageError, match=r"negatives=4 but 4 anchor\(s\) on rank 1 have fewer valid candidates "
                                            r"\(the fewest is 2 of 4 columns.*The queue holds 0 of its 24 entries"):
        loss_fn(z1[:rows], z2[:rows], indices=torch.arange(rows) + B * rank, generator=_gen())
    _queue_kept(rank, loss_fn, before)

    # A full queue of 12 entries, data-set indices 0-11, the same on both ranks. Rank 1's samples
    # 0-2 meet their own entry, left out of their candidates: 4 + 11 on rank 1, 4 + 12 on rank 0.
    loss_fn = InfoNCE(temperature=0.5, negatives=16, queue_size=12)
    loss_fn.queue.enqueue(0, torch.randn(12, D, generator=torch.Generator().manual_seed(1)), torch.arange(12))
    before = _queue_state(loss_fn)
    idx = torch.arange(B) + (20 if rank == 0 else 0)
    with pytest.raises(ShortageError, match=r"negatives=16 but 6 anchor\(s\) on rank 1 have fewer valid candidates "
                                            r"\(the fewest is 15 of 18 columns"):
        loss_fn(z1, z2, indices=idx, generator=_gen())
    _queue_kept(rank, loss_fn, before)

    # DCL: rank 1's sample 0 masks every sample and the queue is empty: no negatives.
    dcl = DCL(temperature=0.5, form="query_document", symmetric=True, queue_size=12)
    mask = torch.zeros(B, B, dtype=torch.bool)
    if rank == 1:
        mask[0] = True
    before = _queue_state(dcl)
    with pytest.raises(ValueError, match=r"1 anchor\(s\) on rank 1 have no negatives.*DCL's denominator"):
        dcl(z1, z2, indices=torch.arange(B) + B * rank, mask=mask)
    _queue_kept(rank, dcl, before)

    # A valid call: the counts ride on the gather of the indices, no collective is added (the
    # indices and the enqueue's two tensors, two all_gathers each: sizes, then rows).
    counts = _counting_collectives()
    mask = torch.zeros(B, B, dtype=torch.bool)
    mask[0, 1] = True
    loss = dcl(z1, z2, indices=torch.arange(B) + B * rank, mask=mask)
    assert torch.isfinite(loss)
    assert counts == {"all_gather": 6}, counts
    _queue_kept(rank, dcl, _queue_state(dcl))


def test_a_queue_without_gather_refuses_a_shortage_of_one_rank_on_every_rank():
    """InfoNCE with a queue still filling on uneven ranks, and with a full queue whose own-index
    entries leave one rank's anchors short of K; DCL with an anchor of one rank without
    negatives: both ranks raise the same error naming rank 1 (its anchors, its fewest
    candidates of its own columns, how full the queue is), meet in a gather and keep equal,
    unchanged queues. A valid call costs no collective beyond the gathers of the indices and
    of the enqueue."""
    run_distributed(_queue_counts, 2, timeout=TIMEOUT)
