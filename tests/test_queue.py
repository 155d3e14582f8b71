"""The negative queue (MoCo's queue, a memory bank) and the momentum encoder:
the FIFO itself, the loss over batch and queue against a float64 reference
that keeps its own list of past embeddings, against pytorch-metric-learning's
CrossBatchMemory, and checkpoints read back with weights_only=True."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import _reference as ref
from negbatch import DCL, InfoNCE, MomentumEncoder
from negbatch.losses import NegativeQueue

TAU = 0.3


def _views(step, n=5, d=4):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]


def _round_trip(module):
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_fifo_overwrites_the_oldest_and_keeps_the_last_of_a_long_batch():
    q = NegativeQueue(4)
    q.enqueue(0, torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 2]))
    q.enqueue(0, 10 + torch.arange(4.0).reshape(2, 2), torch.tensor([3, 4]), torch.tensor([7, 8]))
    emb, idx = q.entries(0)
    assert idx.tolist() == [4, 1, 2, 3] and int(q.pointer[0]) == 1 and len(q) == 4
    assert emb[0].tolist() == [12.0, 13.0]
    labels, labelled = q.entry_labels(0)
    assert labelled.tolist() == [True, False, False, True] and labels[0] == 8 and labels[3] == 7
    q.enqueue(0, torch.zeros(9, 2), torch.arange(9))  # more rows than slots: the last 4 stay
    assert sorted(q.entries(0)[1].tolist()) == [5, 6, 7, 8] and q.entry_labels(0) is None
    with pytest.raises(ValueError, match="width 2, got width 3"):
        q.enqueue(0, torch.zeros(1, 3), torch.tensor([0]))
    fresh = NegativeQueue(4)
    fresh.load_state_dict(_round_trip(q))
    assert torch.equal(fresh.embeddings, q.embeddings) and torch.equal(fresh.indices, q.indices)


@pytest.mark.parametrize("read", ["entries", "entry_labels", "enqueue"])
@pytest.mark.parametrize("role", [-1, 2, True, 0.0])
def test_every_method_refuses_a_role_the_queue_lacks(read, role):
    """A negative role read the last queue (Python's indexing) and a large one
    raised torch's IndexError; only enqueue checked it."""
    q = NegativeQueue(4, roles=2)
    q.enqueue(1, torch.ones(2, 3), torch.tensor([0, 1]))
    args = (torch.zeros(1, 3), torch.tensor([0])) if read == "enqueue" else ()
    with pytest.raises(ValueError, match=r"role must be an int in \[0, 2\)"):
        getattr(q, read)(role, *args)


def _queue_reference(steps, size, *, labels=None, positives=False):
    """Per step: the loss over the batch plus a plain list of past entries
    (embedding, index, label), the oldest dropped first."""
    queue, losses = [], []
    for z1, z2, idx in steps:
        n = z1.shape[0]
        anchor_idx = idx.tolist() * 2
        anchor_lab = labels.tolist() * 2 if labels is not None else None
        extra = []
        for emb, e_idx, e_lab in queue:
            own = lambda a, e_idx=e_idx: anchor_idx[a] == e_idx  # noqa: E731
            same = lambda a, e_lab=e_lab: anchor_lab is not None and anchor_lab[a] == e_lab  # noqa: E731
            if positives:
                extra.append((emb, lambda a, own=own, same=same: same(a) and not own(a), own))
            else:
                extra.append((emb, lambda a: False, lambda a, own=own, same=same: own(a) or same(a)))
        same_samples = None
        if labels is not None:
            same_samples = labels[:, None] == labels[None, :]
        kw = {"positive_samples" if positives else "excluded_samples": same_samples}
        losses.append(ref.softmax_two_view(z1, z2, TAU, extra=extra, **kw))
        zn = torch.cat([ref._norm(z1), ref._norm(z2)]).detach()
        lab = labels.tolist() * 2 if labels is not None else [None] * (2 * n)
        queue = (queue + list(zip(zn, idx.tolist() * 2, lab)))[-size:]
    return losses


@pytest.mark.parametrize("mode", ["plain", "labels", "positives"])
def test_loss_over_batch_and_queue_matches_a_list_kept_by_hand(mode):
    # Indices overlap across steps: sample 3 and 4 come back, and never meet their own entries.
    steps = [(*_views(s), torch.tensor([0, 1, 2, 3, 4]) + 3 * s) for s in range(3)]
    labels = torch.tensor([0, 1, 0, 1, 2]) if mode != "plain" else None
    positives = mode == "positives"
    loss_fn = InfoNCE(temperature=TAU, queue_size=13, positives="mask" if positives else "pair")
    want = _queue_reference(steps, 13, labels=labels, positives=positives)
    for (z1, z2, idx), w in zip(steps, want):
        got = loss_fn(z1, z2, indices=idx, labels=labels)
        torch.testing.assert_close(got, w, rtol=1e-10, atol=0)
        for g, r in zip(torch.autograd.grad(got, [z1, z2]), torch.autograd.grad(w, [z1, z2])):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert len(loss_fn.queue) == 13


def test_sampled_negatives_come_from_batch_and_queue():
    loss_fn = InfoNCE(temperature=TAU, queue_size=10, negatives=6)
    first = _views(0)
    loss_fn(*first, indices=torch.arange(5))
    z1, z2 = _views(1)
    idx = torch.tensor([3, 5, 6, 7, 8])  # sample 3 has entries in the queue
    got = loss_fn(z1, z2, indices=idx, generator=torch.Generator().manual_seed(9), update=False)
    # The sets the loss drew, read back from its own layout with the same generator.
    layout = loss_fn._layout(z1, z2, None, None)
    loss_fn._extend_with_queue(layout, idx, None)
    (direction,) = layout.directions
    sel = direction.select(6, torch.Generator().manual_seed(9), "raise")
    sets = sel.index[:, 1:].tolist()
    assert any(c >= 10 for s in sets for c in s), "no queue entry was sampled"
    queue = [(e, lambda a: False, lambda a, j=j: [3, 5, 6, 7, 8, 3, 5, 6, 7, 8][a] == j)
             for e, j in zip(*loss_fn.queue.entries(0))]
    want = ref.softmax_two_view(z1, z2, TAU, extra=[(e, p, x) for e, p, x in queue], neg_sets=sets)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    assert len(loss_fn.queue) == 10 and loss_fn.queue.entries(0)[1].tolist() == [0, 1, 2, 3, 4] * 2


def test_query_document_queues_documents_and_queries():
    loss_fn = InfoNCE(temperature=TAU, form="query_document", symmetric=True, queue_size=8)
    q0, d0 = _views(0)
    loss_fn(q0, d0, indices=torch.arange(5))
    q1, d1 = _views(1)
    got = loss_fn(q1, d1, indices=torch.arange(5, 10))
    nq0, nd0, nq1, nd1 = (ref._norm(x) for x in (q0, d0, q1, d1))
    terms = []
    for i in range(5):
        terms.append(ref.softmax_anchor(nq1[i], [nd1[i]], [nd1[j] for j in range(5) if j != i] + list(nd0.detach()), TAU))
    for i in range(5):
        terms.append(ref.softmax_anchor(nd1[i], [nq1[i]], [nq1[j] for j in range(5) if j != i] + list(nq0.detach()), TAU))
    torch.testing.assert_close(got, torch.stack(terms).mean(), rtol=1e-10, atol=0)
    assert loss_fn.queue.roles == 2 and len(loss_fn.queue) == 8


def test_update_false_leaves_the_queue_and_checkpoints_continue_identically():
    steps = [(*_views(s), torch.arange(5) + 5 * s) for s in range(3)]
    loss_fn = DCL(temperature=TAU, queue_size=12)
    for z1, z2, idx in steps[:2]:
        loss_fn(z1, z2, indices=idx)
    before = loss_fn.queue.embeddings.clone()
    loss_fn(*steps[2][:2], indices=steps[2][2], update=False)
    assert torch.equal(before, loss_fn.queue.embeddings)
    restored = DCL(temperature=TAU, queue_size=12)
    restored.load_state_dict(_round_trip(loss_fn))
    z1, z2, idx = steps[2]
    torch.testing.assert_close(restored(z1, z2, indices=idx), loss_fn(z1, z2, indices=idx), rtol=0, atol=0)
    assert torch.equal(restored.queue.embeddings, loss_fn.queue.embeddings)


def test_a_checkpoint_of_another_size_is_refused_and_leaves_the_queue_intact():
    loss_fn = InfoNCE(temperature=TAU, queue_size=4)
    loss_fn(*_views(0), indices=torch.arange(5))
    other = InfoNCE(temperature=TAU, queue_size=8)
    with pytest.raises(RuntimeError, match="build the loss with queue_size=4"):
        other.load_state_dict(_round_trip(loss_fn))
    assert len(other.queue) == 0 and int(other.queue.pointer[0]) == 0  # nothing half-copied
    for s in range(3):  # wraps around
        other(*_views(s), indices=torch.arange(5) + 5 * s)
    assert len(other.queue) == 8


def test_a_checkpoint_of_another_form_names_the_form_to_build():
    two_view = InfoNCE(temperature=TAU, queue_size=4)
    two_view(*_views(0), indices=torch.arange(5))
    symmetric = InfoNCE(temperature=TAU, queue_size=4, form="query_document", symmetric=True)
    with pytest.raises(RuntimeError, match=r"build the loss with form='two_view' or symmetric=False to load it"):
        symmetric.load_state_dict(_round_trip(two_view))
    q, d = _views(1)
    symmetric(q, d, indices=torch.arange(5))
    with pytest.raises(RuntimeError, match=r"build the loss with queue_size=4, form='query_document', symmetric=True"):
        InfoNCE(temperature=TAU, queue_size=6).load_state_dict(_round_trip(symmetric))


def test_a_first_call_under_inference_mode_does_not_break_training():
    """An evaluation pass first (a trainer's sanity check runs under
    torch.inference_mode): the queue it starts stays writable afterwards."""
    loss_fn = InfoNCE(temperature=TAU, queue_size=8)
    with torch.inference_mode():
        loss_fn(*_views(0), indices=torch.arange(5))
    assert not loss_fn.queue.embeddings.is_inference()
    z1, z2 = _views(1)
    loss_fn(z1, z2, indices=torch.arange(5, 10)).backward()
    assert len(loss_fn.queue) == 8


def test_a_changed_embedding_width_names_the_queue_and_the_way_out():
    loss_fn = InfoNCE(temperature=TAU, queue_size=8)
    loss_fn(*_views(0), indices=torch.arange(5))
    narrow = [z[:, :2] for z in _views(1)]
    with pytest.raises(ValueError, match=r"holds embeddings of width \d+, got width 2.*reset\(\)"):
        loss_fn(*narrow, indices=torch.arange(5, 10))
    loss_fn.queue.reset()
    loss_fn(*narrow, indices=torch.arange(5, 10))
    assert len(loss_fn.queue) == 8 and loss_fn.queue.embeddings.shape[2] == 2


def test_the_queue_needs_indices_and_only_the_queue_takes_them():
    z1, z2 = _views(0)
    with pytest.raises(ValueError, match="needs indices="):
        InfoNCE(temperature=TAU, queue_size=4)(z1, z2)
    with pytest.raises(ValueError, match="indices= is used by the queue only"):
        InfoNCE(temperature=TAU)(z1, z2, indices=torch.arange(5))
    with pytest.raises(ValueError, match="queue_size must be an int >= 0"):
        InfoNCE(temperature=TAU, queue_size=-1)
    from negbatch.losses import NegativeQueue

    for bad in (0, 2.0, True):  # the class's own argument is called size
        with pytest.raises(ValueError, match=r"^size must be a positive int"):
            NegativeQueue(bad)


def test_queue_against_pytorch_metric_learning_cross_batch_memory():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    n, d, size = 5, 4, 20
    # PML's memory holds the current batch too: memory_size = queue_size + 2n gives the same bank.
    theirs = pml.CrossBatchMemory(pml.SupConLoss(temperature=0.2), embedding_size=d, memory_size=size + 2 * n)
    ours = InfoNCE(temperature=0.2, positives="mask", queue_size=size)
    theirs = theirs.double()
    for step in range(4):
        z1, z2 = _views(step, n, d)
        labels = torch.tensor([0, 1, 2, 0, 1]) + step % 2
        got = ours(z1, z2, indices=torch.arange(n) + n * step, labels=labels)  # no sample comes back
        want = theirs(torch.cat([z1, z2]), torch.cat([labels, labels]))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    # The gradients differ by design: PML's memory holds the current batch
    # detached (its columns carry no gradient), ours keeps the batch's columns
    # differentiable as the in-batch loss does (checked against the reference above).


def test_momentum_encoder_is_an_exponential_moving_average():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    keys = MomentumEncoder(online, momentum=0.9)
    assert all(not p.requires_grad for p in keys.parameters())
    start = [p.detach().clone() for p in keys.encoder.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    keys.update()
    for p, s, o in zip(keys.encoder.parameters(), start, online.parameters()):
        torch.testing.assert_close(p, 0.9 * s + 0.1 * o, rtol=1e-6, atol=1e-7)
    out = keys(torch.randn(6, 4))
    assert not out.requires_grad and int(keys.num_updates) == 1
    state = _round_trip(keys)
    assert all(not k.startswith("_online") for k in state) and "num_updates" in state
    other = MomentumEncoder(online, momentum=0.9)
    other.load_state_dict(state)
    for p, q in zip(other.encoder.parameters(), keys.encoder.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="momentum must be a float in"):
        MomentumEncoder(online, momentum=1.0)


# A queue with K = every candidate but one: a rank none of whose anchors met its own queued entry took
# the dense shortcut and drew no random numbers, the others drew; a generator reused across steps then
# sampled other negatives on that rank than one process would (found by a review).
_B, _K = 4, 7


def _queue_steps(loss_fn, rows, generator):
    values, draws = [], []
    for step, idx in enumerate([torch.arange(_B), torch.tensor([2, 10, 11, 12]), torch.arange(20, 24)]):
        g = torch.Generator().manual_seed(step)
        q, k = torch.randn(_B, 8, generator=g, dtype=torch.float64), torch.randn(_B, 8, generator=g, dtype=torch.float64)
        values.append(float(loss_fn(q[rows], k[rows], indices=idx[rows], generator=generator)))
        draws.append(int(torch.randint(0, 10**6, (1,), generator=torch.Generator().set_state(generator.get_state()))))
    return values, draws


def _queue_rank(rank, world, single):
    import torch.distributed as dist

    loss_fn = InfoNCE(temperature=0.3, form="query_document", queue_size=4, negatives=_K, on_shortage="use_all",
                      gather=True)
    values, draws = _queue_steps(loss_fn, slice(2 * rank, 2 * rank + 2), torch.Generator().manual_seed(0))
    got = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(got)
    torch.testing.assert_close(got / world, torch.tensor(single[0], dtype=torch.float64), rtol=1e-12, atol=0)
    assert draws == single[1]  # every rank's generator where one process leaves it


@pytest.mark.distributed
def test_ranks_draw_the_single_process_negatives_with_a_queue_and_k_one_below_the_bank():
    from _dist import run_distributed

    loss_fn = InfoNCE(temperature=0.3, form="query_document", queue_size=4, negatives=_K, on_shortage="use_all")
    run_distributed(_queue_rank, 2, _queue_steps(loss_fn, slice(None), torch.Generator().manual_seed(0)))


def _duplicated(idx):
    """Sample-level: i and j (i != j) share a data-set index."""
    same = idx[:, None] == idx[None, :]
    return same & ~torch.eye(len(idx), dtype=torch.bool)


@pytest.mark.parametrize("loss_cls,decoupled", [(InfoNCE, False), (DCL, True)])
@pytest.mark.parametrize("positives", ["pair", "mask"])
def test_rows_of_one_index_are_not_each_others_candidates(loss_cls, decoupled, positives):
    # A sampler with replacement puts sample 0 in the batch twice: like its
    # queued copy, the other row is neither a negative nor a positive.
    z1, z2 = (torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(s)).requires_grad_()
              for s in (1, 2))
    idx, labels = torch.tensor([0, 7, 0, 3, 4]), torch.tensor([1, 0, 1, 1, 0])
    dup = _duplicated(idx)
    loss_fn = loss_cls(temperature=TAU, queue_size=16, positives=positives).double()
    if positives == "mask":  # the copies share a label: positives but for the index
        got = loss_fn(z1, z2, indices=idx, labels=labels)
        same_label = labels[:, None] == labels[None, :]
        sets = dict(positive_samples=same_label & ~dup, excluded_samples=dup)
    else:  # without labels, so that only the index leaves the copies out
        got = loss_fn(z1, z2, indices=idx)
        sets = dict(excluded_samples=dup)
    want = ref.softmax_two_view(z1, z2, TAU, decoupled=decoupled, **sets)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    for g, w in zip(torch.autograd.grad(got, (z1, z2)), torch.autograd.grad(want, (z1, z2))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_rows_of_one_index_in_the_query_document_form_with_hard_negatives():
    g = torch.Generator().manual_seed(3)
    q, d = (torch.randn(5, 4, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    hard = torch.randn(5, 1, 4, dtype=torch.float64, generator=g)
    idx = torch.tensor([2, 2, 5, 6, 2])
    loss_fn = InfoNCE(temperature=TAU, form="query_document", symmetric=True, queue_size=16).double()
    got = loss_fn(q, d, hard, indices=idx)
    excluded = torch.cat([_duplicated(idx), torch.zeros(5, 5, dtype=torch.bool)], dim=1)  # hard negatives: no index
    want = ref.softmax_query_document(q, d, TAU, hard=hard, excluded_mask=excluded, symmetric=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    for gg, w in zip(torch.autograd.grad(got, (q, d)), torch.autograd.grad(want, (q, d))):
        torch.testing.assert_close(gg, w, rtol=1e-10, atol=1e-12)


def test_a_call_in_another_precision_than_the_first_is_enqueued():
    # The first entries decide the queue's dtype; a later call in another
    # precision (a float32 sanity check, then autocast training; a loss moved
    # with .double() after its queue filled) failed in the enqueue, after the
    # loss was computed, with torch's "Index put requires the source and
    # destination dtypes match".
    encoder = nn.Linear(4, 3)
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    loss_fn = InfoNCE(temperature=TAU, queue_size=20)
    loss_fn(encoder(x1), encoder(x2), indices=torch.arange(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = encoder(x1), encoder(x2)
        assert z1.dtype == torch.bfloat16
        loss_fn(z1, z2, indices=torch.arange(5, 10))
    assert len(loss_fn.queue) == 20 and loss_fn.queue.embeddings.dtype == torch.float32
    want = torch.nn.functional.normalize(z1.float(), dim=1)
    torch.testing.assert_close(loss_fn.queue.entries(0)[0][10:15], want, rtol=0, atol=2e-2)  # bfloat16 rounding
    loss_fn.double()  # the filled queue becomes float64; float32 calls go on
    loss_fn(encoder(x1), encoder(x2), indices=torch.arange(10, 15))
    assert loss_fn.queue.embeddings.dtype == torch.float64


@pytest.mark.parametrize("bad", ["no", 0, None])
def test_update_must_be_a_bool(bad):
    # update="no" is truthy: it filled the queue it was meant to leave alone.
    loss_fn = InfoNCE(temperature=TAU, queue_size=8)
    with pytest.raises(TypeError, match="update must be True or False"):
        loss_fn(*_views(0), indices=torch.arange(5), update=bad)
    assert len(loss_fn.queue) == 0


def test_enqueue_names_a_bad_argument():
    # NegativeQueue is public: misuse gave "not enough values to unpack", an
    # IndexError or torch's "Index put requires the source and destination
    # dtypes match" (float indices), after nothing or part was written.
    q = NegativeQueue(3, roles=2)
    with pytest.raises(ValueError, match=r"role must be an int in \[0, 2\)"):
        q.enqueue(2, torch.zeros(2, 3), torch.arange(2))
    with pytest.raises(ValueError, match=r"embeddings must be a 2-d floating-point tensor \(E, d\).*shape \(3,\)"):
        q.enqueue(0, torch.zeros(3), torch.arange(3))
    with pytest.raises(ValueError, match="embeddings must be a 2-d floating-point tensor"):
        q.enqueue(0, torch.zeros(2, 3, dtype=torch.long), torch.arange(2))
    with pytest.raises(TypeError, match=r"indices must be an integer tensor \(torch.long\).*float32"):
        q.enqueue(0, torch.zeros(2, 3), torch.arange(2.0))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        q.enqueue(0, torch.zeros(2, 3), torch.arange(2), torch.zeros(2))
    assert len(q) == 0 and q.embeddings.shape[2] == 0
    q.enqueue(1, torch.zeros(2, 3), torch.arange(2, dtype=torch.int32))
    assert q.entries(1)[1].tolist() == [0, 1]


@pytest.mark.parametrize("loss_cls", [InfoNCE, DCL])
def test_a_shortage_while_the_queue_fills_says_so_and_what_to_pass(loss_cls):
    # MoCo-style K negatives from batch and queue: until the queue holds enough
    # entries, the first steps have fewer than K candidates. The error advised
    # "Lower negatives, enlarge the batch", not a word of the queue filling.
    loss_fn = loss_cls(temperature=TAU, queue_size=12, negatives=12)
    with pytest.raises(ValueError, match=r"negatives=12 .*The queue holds 0 of its 12 entries.*on_shortage='use_all'"):
        loss_fn(*_views(0), indices=torch.arange(5))  # 8 candidates in a batch of 5
    assert len(loss_fn.queue) == 0  # the refused call enqueued nothing
    patient = loss_cls(temperature=TAU, queue_size=12, negatives=12, on_shortage="use_all")
    for step in range(3):
        patient(*_views(step), indices=torch.arange(5) + 5 * step)
    full = loss_cls(temperature=TAU, queue_size=4, negatives=30, on_shortage="use_all")
    full(*_views(0), indices=torch.arange(5))
    full.on_shortage = "raise"
    with pytest.raises(ValueError, match="negatives=30") as caught:  # full, and still short: no word of filling
        full(*_views(1), indices=torch.arange(5, 10))
    assert "queue holds" not in str(caught.value)


def test_momentum_encoder_refuses_an_encoder_that_changed_after_it_was_built():
    """A layer appended to the encoder after the copy was made: update() went on
    averaging the old parameters only, and the keys came from the old
    architecture without a word. A changed encoder is refused, with the fix."""
    online = nn.Sequential(nn.Linear(4, 3))
    keys = MomentumEncoder(online, momentum=0.9)
    online.append(nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match=r"lacks: \['1.weight', '1.bias'\].*build a new MomentumEncoder"):
        keys.update()
    online = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    keys = MomentumEncoder(online, momentum=0.9)
    online[1] = nn.Linear(3, 5)
    with pytest.raises(RuntimeError, match=r"no longer has a parameter '1.weight'.*build a new MomentumEncoder"):
        keys.update()
    assert int(keys.num_updates) == 0


def test_rows_holding_nan_are_never_queued_even_without_the_finite_check():
    """With check_finite=False (an fp16 loop whose GradScaler skips the steps
    that overflow) a NaN embedding went into the queue and every later call's
    loss was NaN until queue_size entries had pushed it out. The queue leaves
    such rows out and warns; the next call's loss is the reference's over the
    finite entries."""
    loss_fn = InfoNCE(temperature=TAU, form="query_document", queue_size=8, check_finite=False)
    q0, d0 = _views(0)
    d0 = d0.detach().clone()
    d0[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="left out 1 of 5 rows holding NaN or inf"):
        assert torch.isnan(loss_fn(q0, d0, indices=torch.arange(5)))  # this call's own loss shows it
    assert loss_fn.queue.entries(0)[1].tolist() == [0, 1, 3, 4] and loss_fn.queue.dropped == 1
    q1, d1 = _views(1)
    got = loss_fn(q1, d1, indices=torch.arange(5, 10))
    nq1, nd1 = ref._norm(q1), ref._norm(d1)
    queued = [ref._norm(d0[i : i + 1])[0] for i in (0, 1, 3, 4)]
    want = torch.stack([ref.softmax_anchor(nq1[i], [nd1[i]], [nd1[j] for j in range(5) if j != i] + queued, TAU)
                        for i in range(5)]).mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    q = NegativeQueue(4)
    with pytest.warns(RuntimeWarning, match="left out 2 of 3 rows"):
        q.enqueue(0, torch.tensor([[1.0, float("inf")], [0.0, 1.0], [float("nan"), 0.0]]), torch.arange(3),
                  torch.tensor([5, 6, 7]))
    assert q.entries(0)[1].tolist() == [1] and q.entry_labels(0)[0].tolist() == [6] and int(q.pointer[0]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.enqueue(0, torch.full((2, 2), 3e38), torch.arange(2))  # finite rows whose sum overflows: kept, no warning
    assert len(q) == 3 and q.dropped == 2


def test_a_first_call_under_autocast_does_not_make_the_queue_bfloat16():
    """The first entries decided the queue's dtype: a first step under
    torch.autocast left a bfloat16 queue, and every later float32 entry was
    rounded to bfloat16 (0.002 off on unit vectors). The queue keeps at least
    float32: the bfloat16 entries exactly, the float32 ones as they came."""
    encoder = nn.Linear(4, 3)
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    loss_fn = InfoNCE(temperature=TAU, queue_size=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h1, h2 = encoder(x1), encoder(x2)
        loss_fn(h1, h2, indices=torch.arange(5))
    assert h1.dtype == torch.bfloat16 and loss_fn.queue.embeddings.dtype == torch.float32
    stored = loss_fn.queue.entries(0)[0]
    normalized = torch.nn.functional.normalize(h1.detach(), dim=1)  # what the loss normalised, in bfloat16
    assert torch.equal(stored[:5], normalized.float())
    z1, z2 = encoder(x1).detach(), encoder(x2).detach()
    loss_fn(z1, z2, indices=torch.arange(5, 10))
    want = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    torch.testing.assert_close(loss_fn.queue.entries(0)[0][10:].double(), want, rtol=0, atol=1e-6)
    # A bfloat16 queue saved before: loaded as float32, its entries unchanged.
    state = {k: (v.bfloat16() if k == "queue.embeddings" else v) for k, v in _round_trip(loss_fn).items()}
    restored = InfoNCE(temperature=TAU, queue_size=20)
    restored.load_state_dict(state)
    assert restored.queue.embeddings.dtype == torch.float32
    assert torch.equal(restored.queue.embeddings, state["queue.embeddings"].float())


def _batch_norm64(h, mean, var, bn):
    return (h - mean) / torch.sqrt(var + bn.eps) * bn.weight.double() + bn.bias.double()


def test_the_momentum_copy_runs_in_the_encoder_s_mode():
    """Built from an encoder in eval mode, the copy stayed in eval mode once
    the encoder trained: its BatchNorm normalised the keys by running
    statistics it never updated, unlike MoCo's key encoder (trained beside
    the query encoder). The copy follows the encoder's mode, module by module;
    eval() on the MomentumEncoder runs it in eval mode. Outputs against a
    float64 BatchNorm written out."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    keys = MomentumEncoder(online, momentum=0.9)
    bn = keys.encoder[1]
    x = torch.randn(8, 4)
    h = keys.encoder[0](x).double()
    online.train()
    out = keys(x)
    mean, var = h.mean(0), h.var(0, unbiased=False)
    torch.testing.assert_close(out.double(), _batch_norm64(h, mean, var, bn), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * mean, rtol=1e-5, atol=1e-6)  # updated once
    running = bn.running_mean.double(), bn.running_var.double()
    online.eval()
    torch.testing.assert_close(keys(x).double(), _batch_norm64(h, *running, bn), rtol=1e-5, atol=1e-5)
    online.train()
    online[1].eval()  # a frozen BatchNorm in a training encoder
    torch.testing.assert_close(keys(x).double(), _batch_norm64(h, *running, bn), rtol=1e-5, atol=1e-5)
    assert keys.encoder.training and not bn.training
    online.train()
    keys.eval()
    torch.testing.assert_close(keys(x).double(), _batch_norm64(h, *running, bn), rtol=1e-5, atol=1e-5)
    keys.train()
    keys(x)
    assert bn.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_momentum_copy_moves_as_the_float64_average_says(dtype):
    """With a bfloat16 encoder and m = 0.999, (1 - m)(θ_q - θ_k) was below
    the resolution of θ_k: the copy stood still, or moved by rounding alone
    (twice as far as it should in the first report). The average runs on
    float32 masters: the copy is the float64 average rounded to its dtype,
    through a checkpoint too."""
    torch.manual_seed(0)
    online = nn.Linear(6, 4).to(dtype)
    keys = MomentumEncoder(online, momentum=0.999)
    want = [p.detach().double() for p in keys.encoder.parameters()]
    start = [w.clone() for w in want]
    gen = torch.Generator().manual_seed(1)
    for step in range(300):
        with torch.no_grad():  # an optimizer's steps: the encoder drifts away from the copy
            for p in online.parameters():
                p.add_((0.01 + 0.02 * torch.randn(p.shape, generator=gen)).to(dtype))
        want = [0.999 * w + 0.001 * p.detach().double() for w, p in zip(want, online.parameters())]
        keys.update()
        if step == 149:  # resume from a checkpoint halfway: the masters travel with it
            state = _round_trip(keys)
            assert {"master.weight", "master.bias"} <= set(state)
            keys = MomentumEncoder(online, momentum=0.999)
            keys.load_state_dict(state)
    for p, w, s in zip(keys.encoder.parameters(), want, start):
        assert p.dtype == dtype
        assert (w - s).abs().max() > 0.2  # it has moved, by many units in the last place
        torch.testing.assert_close(p, w.to(dtype), rtol=0, atol=0)  # the float64 average, rounded


def test_a_half_precision_momentum_copy_loads_a_state_without_masters_and_follows_a_loaded_copy():
    """A state saved before the masters existed loads (they start from the
    loaded parameters), and a copy overwritten through its own
    load_state_dict is averaged from what was loaded, not from the old
    master."""
    torch.manual_seed(0)
    online = nn.Linear(6, 4).to(torch.bfloat16)
    keys = MomentumEncoder(online, momentum=0.9)
    keys.update()
    state = {k: v for k, v in _round_trip(keys).items() if not k.startswith("master.")}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.5)

    def copy_only(st, **kw):
        keys.encoder.load_state_dict({k.removeprefix("encoder."): v.clone() for k, v in st.items()
                                      if k.startswith("encoder.")}, **kw)

    for load in (keys.load_state_dict, copy_only, lambda st: copy_only(st, assign=True)):
        with torch.no_grad():
            for p in keys.encoder.parameters():
                p.mul_(3.0)  # moved away from what the state holds
        keys.update()
        load(state)
        keys.update()
        for name, p in keys.encoder.named_parameters():
            want = 0.9 * state["encoder." + name].double() + 0.1 * dict(online.named_parameters())[name].double()
            torch.testing.assert_close(p, want.to(torch.bfloat16), rtol=0, atol=0)


def test_a_half_precision_momentum_copy_follows_an_assigned_parameter():
    """A parameter replaced by assignment is a new tensor, whose version
    counter may equal the old one's: the master is trusted only while the
    parameter keeps its storage too."""
    online = nn.Linear(3, 2).to(torch.bfloat16)
    keys = MomentumEncoder(online, momentum=0.5)
    keys.update()
    old = keys.encoder.weight
    new = torch.full_like(old, 2.0)
    while new._version < old._version:
        new.add_(0)
    keys.encoder.weight = nn.Parameter(new, requires_grad=False)
    assert keys.encoder.weight._version == old._version
    keys.update()
    want = 0.5 * 2.0 + 0.5 * online.weight.detach().double()
    torch.testing.assert_close(keys.encoder.weight, want.to(torch.bfloat16), rtol=0, atol=0)


def test_a_refused_queue_state_leaves_the_learnable_temperature_as_it_was():
    """torch loads every part of a module that does not refuse its own: a checkpoint of another queue
    size left the queue empty but set the learnable temperature to the checkpoint's."""
    saved = InfoNCE(temperature=0.5, queue_size=4, learnable_temperature=True)
    saved(*_views(0), indices=torch.arange(5))
    loss_fn = InfoNCE(temperature=0.1, queue_size=8, learnable_temperature=True)
    before = loss_fn.logit_scale.log_scale.detach().clone()
    with pytest.raises(RuntimeError, match="build the loss with queue_size=4"):
        loss_fn.load_state_dict(_round_trip(saved))
    assert torch.equal(loss_fn.logit_scale.log_scale, before) and len(loss_fn.queue) == 0
