"""The losses of issue 15 under DDP with gather=True (2 real gloo processes,
one spawn for every case): the DDP-averaged gradient of every parameter of
the model *and of the loss* (a learnable temperature, SigLIP's bias) equals
the single-process gradient on the global batch; a queue holds the same
entries on every rank, those of the single process."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import run_distributed
from negbatch import DCL, GlobalInfoNCE, InfoNCE, ReLIC, SigLIP

pytestmark = pytest.mark.distributed

B, D_IN, D = 8, 6, 4


def _cases():
    return {
        "supcon_k": (lambda: InfoNCE(temperature=0.3, positives="mask", negatives=4, on_shortage="use_all"),
                     dict(labels=True, seed=3)),
        "supcon_uneven": (lambda: InfoNCE(temperature=0.3, positives="mask"), dict(labels=True, cut=5)),
        "dcl_w_qd": (lambda: DCL(temperature=0.3, sigma=0.5, form="query_document", symmetric=True),
                     dict(form="qd", hard=2)),
        "siglip_qd": (lambda: SigLIP(temperature=0.2, bias=-1.0), dict(form="qd", hard=1, labels=True)),
        "siglip_two_view_k": (lambda: SigLIP(form="two_view", negatives=5), dict(seed=4)),
        "filter_learnable": (lambda: InfoNCE(temperature=0.3, filter_margin=0.1, learnable_temperature=True), {}),
        "relic_positives": (lambda: ReLIC(temperature=0.3, positives="mask", learnable_temperature=True),
                            dict(labels=True)),
        "global_learnable": (lambda: GlobalInfoNCE(B, temperature=0.3, learnable_temperature=True),
                             dict(indices=True)),
        "queue": (lambda: InfoNCE(temperature=0.3, queue_size=12, negatives=6, learnable_temperature=True),
                  dict(labels=True, indices=True, steps=3, seed=5)),
        "queue_qd_no_gather": (lambda: DCL(temperature=0.3, form="query_document", symmetric=True, queue_size=10),
                               dict(form="qd", indices=True, steps=2, gather=False)),
        # Indices 0-2 on both ranks: left out of each other's candidates across ranks too.
        "queue_duplicates": (lambda: InfoNCE(temperature=0.3, queue_size=12, positives="mask"),
                             dict(labels=True, indices=True, steps=2, duplicates=True)),
    }


def _call(loss_fn, model, x1, x2, hard, labels, idx, opts):
    kw = {}
    if "seed" in opts:
        kw["generator"] = torch.Generator().manual_seed(opts["seed"])
    if opts.get("labels"):
        kw["labels"] = labels
    args = [model(x1), model(x2)]
    if isinstance(loss_fn, GlobalInfoNCE):
        args.append(idx)
    elif opts.get("indices"):
        kw["indices"] = idx
    if opts.get("form") == "qd" and "hard" in opts:
        kw["hard_negatives"] = model(hard.reshape(-1, D_IN)).reshape(hard.shape[0], -1, D)
    return loss_fn(*args, **kw)


def _batches(opts):
    for step in range(opts.get("steps", 1)):
        g = torch.Generator().manual_seed(10 + step)
        x1, x2 = torch.randn(B, D_IN, generator=g).double(), torch.randn(B, D_IN, generator=g).double()
        hard = torch.randn(B, opts.get("hard", 1), D_IN, generator=g).double()
        labels = torch.randint(0, 3, (B,), generator=g)
        idx = (torch.arange(B) % 5 if opts.get("duplicates") else torch.arange(B)) + 5 * step  # samples come back
        yield x1, x2, hard, labels, idx


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, D)).double()


def _single_process(make, opts):
    """One process, the global batch, no process group: the reference results."""
    model, loss_fn = _model(), make().double()
    steps = []
    for x1, x2, hard, labels, idx in _batches(opts):
        for p in [*model.parameters(), *loss_fn.parameters()]:
            p.grad = None
        loss = _call(loss_fn, model, x1, x2, hard, labels, idx, opts)
        loss.backward()
        steps.append((loss.detach(), [p.grad.clone() for p in model.parameters()],
                      [p.grad.clone() for p in loss_fn.parameters()]))
    queue = getattr(loss_fn, "queue", None)
    return steps, (queue.state_dict() if queue is not None else None), model.state_dict()


def _one_case(rank, world, name, make, opts, want):
    steps, queue_state, _ = want
    model = _model()
    loss_fn = make().double()
    loss_fn.gather = opts.get("gather", True)
    ddp = DDP(model)
    cut = opts.get("cut", B // 2)
    lo, hi = (0, cut) if rank == 0 else (cut, B)
    for (x1, x2, hard, labels, idx), (want_loss, want_grads, want_loss_grads) in zip(_batches(opts), steps):
        for p in [*model.parameters(), *loss_fn.parameters()]:
            p.grad = None
        got = _call(loss_fn, ddp, x1[lo:hi], x2[lo:hi], hard[lo:hi], labels[lo:hi], idx[lo:hi], opts)
        got.backward()
        if loss_fn.gather:
            total = got.detach().clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total / world, want_loss, rtol=1e-10, atol=1e-12, msg=f"{name} loss")
            for (pname, p), q in zip(model.named_parameters(), want_grads):
                torch.testing.assert_close(p.grad, q, rtol=1e-9, atol=1e-12, msg=f"{name}: {pname}")
            for (pname, p), q in zip(loss_fn.named_parameters(), want_loss_grads):
                torch.testing.assert_close(p.grad, q, rtol=1e-9, atol=1e-12, msg=f"{name}: loss's {pname}")
    if queue_state is not None:
        # Every rank holds the global batch's entries, those of the single process.
        for key, value in loss_fn.queue.state_dict().items():
            assert torch.equal(value, queue_state[key]), f"{name}: queue {key} differs on rank {rank}"


def _worker(rank, world, wants):
    for name, (make, opts) in _cases().items():
        _one_case(rank, world, name, make, opts, wants[name])


def test_every_new_loss_under_ddp_equals_one_process():
    wants = {name: _single_process(make, opts) for name, (make, opts) in _cases().items()}
    run_distributed(_worker, 2, wants)


def _momentum_warning_worker(rank: int, world_size: int) -> None:
    import warnings

    from negbatch import MomentumEncoder

    cases = {
        "batchnorm": (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), True),
        "sync": (nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))), False),
        "layernorm": (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), False),
    }
    for name, (model, warns) in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            MomentumEncoder(model, momentum=0.9)
        said = [w for w in caught if "BatchNorm under torch.distributed" in str(w.message)]
        assert bool(said) == warns, (name, [str(w.message) for w in caught])


def test_momentum_encoder_warns_of_per_rank_batchnorm_under_ddp():
    # MoCo's shuffle-BN problem: the copy is not DDP-wrapped, so a BatchNorm
    # normalises each rank's keys by its own batch. A SyncBatchNorm does not.
    run_distributed(_momentum_warning_worker, 2)
