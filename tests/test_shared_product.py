"""A symmetric query-document call of one process computes its two
directions from one product (``negbatch.losses._pair``): the document-to-query
logits are the query-to-document ones transposed. Checked against the
float64 per-anchor loops of tests/_reference.py, against the per-direction
kernels it replaces, and by the products it runs (3 instead of 6)."""

from __future__ import annotations

import pytest
import torch

import _reference as ref
from _inputs import float64_views
from _profile import matrix_products as _products
import negbatch.losses._layout as layout_module
from negbatch import DCL, GlobalInfoNCE, InfoNCE, SigLIP, same_id_mask
from negbatch.losses import _pair

TAU = 0.3


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    """The fused kernels at these small test sizes (InfoNCE takes autograd's
    cross-entropy below SMALL_DENSE_LOGITS, where the pair does not apply)."""
    monkeypatch.setattr(layout_module, "SMALL_DENSE_LOGITS", 0)


def _data(n=9, d=5, seed=0, hard=0):
    return float64_views(n, d, seed, hard)


def _labels(n=9):
    return torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 4])[:n]


def _match(loss, reference, inputs):
    torch.testing.assert_close(loss, reference, rtol=1e-9, atol=0)
    got = torch.autograd.grad(loss, inputs, retain_graph=True)
    for g, w in zip(got, torch.autograd.grad(reference, inputs)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


def _per_direction(monkeypatch) -> None:
    """The directions computed one by one, as before the pair (its one switch)."""
    monkeypatch.setattr(_pair, "shares_one_product", lambda *args: False)


def _spy(monkeypatch) -> list[int]:
    """Counts the pair kernel's calls."""
    calls = []
    apply = _pair.PairOfDirections.apply

    def counted(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(_pair.PairOfDirections, "apply", counted)
    return calls


CASES = {
    "hard negatives": dict(hard=2),
    "label mask": dict(labels=True),
    "several positives": dict(labels=True, positives="mask"),
    "hard negatives and labels": dict(hard=1, labels=True),
}


@pytest.mark.parametrize("loss_class", [InfoNCE, DCL])
@pytest.mark.parametrize("case", list(CASES))
def test_the_pair_equals_the_float64_reference(monkeypatch, loss_class, case):
    options = CASES[case]
    calls = _spy(monkeypatch)
    xs = _data(hard=options.get("hard", 0))
    hard = xs[2] if len(xs) == 3 else None
    labels = _labels() if options.get("labels") else None
    positives = options.get("positives", "pair")
    decoupled = loss_class is DCL
    loss_fn = loss_class(temperature=TAU, form="query_document", symmetric=True, positives=positives)
    loss = loss_fn(xs[0], xs[1], hard, labels=labels)
    assert len(calls) == 1
    same = None if labels is None else same_id_mask(labels, labels)
    if same is not None and hard is not None:  # hard negatives carry no label
        same = torch.cat([same, same.new_zeros(9, 9 * hard.shape[1])], dim=1)
    masks = dict(positive_mask=same) if positives == "mask" else dict(excluded_mask=same)
    want = ref.softmax_query_document(xs[0], xs[1], TAU, hard=hard, symmetric=True, decoupled=decoupled, **masks)
    _match(loss, want, xs)


@pytest.mark.parametrize("loss_class", [InfoNCE, DCL])
@pytest.mark.parametrize("dtype,filtered", [(torch.float32, False), (torch.float64, False), (torch.float64, True)])
def test_the_pair_equals_the_per_direction_kernels(monkeypatch, loss_class, dtype, filtered):
    """Values per anchor and every gradient (the learnable temperature's among
    them, which reaches the pair through the queries only), float32 and 64;
    with the false-negative filter, whose masks differ per direction."""
    def run(shared: bool):
        if not shared:
            _per_direction(monkeypatch)
        torch.manual_seed(0)
        q, d = (torch.randn(40, 16, dtype=dtype, requires_grad=True) for _ in range(2))
        hard = torch.randn(40, 1, 16, dtype=dtype, requires_grad=True)
        loss_fn = loss_class(form="query_document", symmetric=True, learnable_temperature=True, reduction="none",
                             filter_top=0.2 if filtered else None).to(dtype)
        values = loss_fn(q, d, hard, labels=torch.arange(40) % 7)
        (values * torch.linspace(0.5, 2, values.shape[0], dtype=dtype)).sum().backward()
        return values.detach(), q.grad, d.grad, hard.grad, loss_fn.logit_scale.log_scale.grad

    shared, separate = run(True), run(False)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("loss_class", [InfoNCE, DCL])
def test_one_product_and_its_two_backward_products(monkeypatch, loss_class):
    """The reason for the pair: 3 products for the forward and backward of
    both directions, against 6 computed direction by direction."""
    q, d, hard = _data(n=32, d=8, hard=1)
    loss_fn = loss_class(temperature=TAU, form="query_document", symmetric=True)
    assert _products(lambda: loss_fn(q, d, hard).backward()) == 3
    _per_direction(monkeypatch)
    assert _products(lambda: loss_fn(q, d, hard).backward()) == 6


def test_a_queue_holding_queries_takes_the_per_direction_kernels(monkeypatch):
    """Once the queue holds entries the documents' bank is the queries and
    queued queries: not a transposed block. The first step (queue empty)
    takes the pair; the values match the per-direction kernels on both."""
    def run(shared: bool) -> list[torch.Tensor]:
        if not shared:
            _per_direction(monkeypatch)
        loss_fn = InfoNCE(temperature=TAU, form="query_document", symmetric=True, queue_size=16,
                          on_shortage="use_all")
        out = []
        for step in range(3):
            q, d = _data(n=8, seed=step)
            out.append(loss_fn(q, d, indices=torch.arange(8) + 8 * step))
        return out

    calls = _spy(monkeypatch)
    shared = run(True)
    assert len(calls) == 1
    for a, b in zip(shared, run(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_sampled_negatives_and_one_direction_take_the_per_direction_kernels(monkeypatch):
    calls = _spy(monkeypatch)
    q, d, hard = _data(hard=1)
    InfoNCE(form="query_document", symmetric=True, negatives=3)(q, d, hard, generator=torch.Generator().manual_seed(0))
    InfoNCE(form="query_document")(q, d, hard)
    assert not calls
    InfoNCE(form="query_document", symmetric=True, gather=True)(q, d, hard)  # one process: gather is the identity
    assert len(calls) == 1
    # Several positives: GlobalInfoNCE computes those directions with autograd.
    GlobalInfoNCE(num_samples=9, form="query_document", symmetric=True, positives="mask")(
        q, d, torch.arange(9), hard, labels=_labels())
    assert len(calls) == 1


def test_the_pair_backward_runs_once():
    q, d, hard = _data(hard=1)
    loss = DCL(form="query_document", symmetric=True)(q, d, hard)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def _global_steps(monkeypatch, shared: bool, dtype=torch.float64):
    """Three steps of a symmetric GlobalInfoNCE (state, learnable temperature,
    labels, hard negatives): per-anchor values, gradients, the state and the
    logged losses."""
    if not shared:
        _per_direction(monkeypatch)
    loss_fn = GlobalInfoNCE(num_samples=60, form="query_document", symmetric=True, learnable_temperature=True,
                            reduction="none").to(dtype)
    out = []
    for step in range(3):
        torch.manual_seed(step)
        q, d = (torch.randn(20, 16, dtype=dtype, requires_grad=True) for _ in range(2))
        hard = torch.randn(20, 1, 16, dtype=dtype, requires_grad=True)
        values = loss_fn(q, d, torch.arange(20) + 20 * step, hard, labels=torch.arange(20) % 6)
        (values * torch.linspace(0.5, 2, values.shape[0], dtype=dtype)).sum().backward()
        out += [values.detach(), q.grad, d.grad, hard.grad, loss_fn.logit_scale.log_scale.grad,
                loss_fn.log_nu.clone(), loss_fn.last_infonce, loss_fn.last_minibatch_loss,
                loss_fn.minibatch_loss(q, d, hard_negatives=hard, labels=torch.arange(20) % 6).detach()]
    return out


def test_global_infonce_takes_the_pair_and_equals_its_per_direction_kernels(monkeypatch):
    """The per-direction kernels are checked against float64 loops in
    tests/test_global_nce.py (symmetric among them, which now takes the pair)."""
    calls = _spy(monkeypatch)
    shared = _global_steps(monkeypatch, True)
    assert len(calls) == 6  # three steps, each a call and a minibatch_loss
    separate = _global_steps(monkeypatch, False)
    assert len(calls) == 6
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_global_infonce_runs_one_product_and_its_two_backward_products(monkeypatch):
    q, d, hard = _data(n=32, d=8, hard=1)
    loss_fn = GlobalInfoNCE(num_samples=32, form="query_document", symmetric=True).double()
    assert _products(lambda: loss_fn(q, d, torch.arange(32), hard).backward()) == 3
    _per_direction(monkeypatch)
    assert _products(lambda: loss_fn(q, d, torch.arange(32), hard).backward()) == 6


@pytest.mark.parametrize("positives", ["pair", "mask"])
def test_siglip_takes_the_pair_and_equals_the_float64_reference(monkeypatch, positives):
    """SigLIP's directions: the queries against the documents and hard negatives, the documents against
    the queries (the transposed label mask, no hard negatives); a fixed scale and bias."""
    calls = _spy(monkeypatch)
    q, d, hard = _data(hard=2)
    labels = _labels()
    loss = SigLIP(temperature=0.5, bias=-1.0, learnable_temperature=False, learnable_bias=False,
                  form="query_document", symmetric=True, positives=positives).double()(q, d, hard, labels=labels)
    assert len(calls) == 1
    same = same_id_mask(labels, labels)
    with_hard = torch.cat([same, same.new_zeros(9, 18)], dim=1)
    key = "positive_mask" if positives == "mask" else "excluded_mask"
    want = (ref.siglip_query_document(q, d, 2.0, -1.0, hard=hard, **{key: with_hard})
            + ref.siglip_query_document(d, q, 2.0, -1.0, **{key: same.t()})) / 2
    _match(loss, want, [q, d, hard])


def test_siglip_pair_equals_its_per_direction_kernels_with_the_learned_scale_and_bias(monkeypatch):
    def run(shared: bool):
        if not shared:
            _per_direction(monkeypatch)
        torch.manual_seed(0)
        q, d = (torch.randn(40, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
        hard = torch.randn(40, 1, 16, dtype=torch.float64, requires_grad=True)
        loss_fn = SigLIP(form="query_document", symmetric=True, reduction="none").double()
        values = loss_fn(q, d, hard, labels=torch.arange(40) % 7)
        (values * torch.linspace(0.5, 2, values.shape[0], dtype=torch.float64)).sum().backward()
        return values.detach(), q.grad, d.grad, hard.grad, loss_fn.logit_scale.log_scale.grad, loss_fn.bias.grad

    calls = _spy(monkeypatch)
    shared = run(True)
    assert len(calls) == 1
    for a, b in zip(shared, run(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_siglip_runs_one_product_and_its_two_backward_products(monkeypatch):
    q, d, hard = _data(n=32, d=8, hard=1)
    loss_fn = SigLIP(form="query_document", symmetric=True).double()
    assert _products(lambda: loss_fn(q, d, hard).backward()) == 3
    _per_direction(monkeypatch)
    assert _products(lambda: loss_fn(q, d, hard).backward()) == 6


@pytest.mark.parametrize("make", [lambda: InfoNCE(temperature=0.01, form="query_document", symmetric=True),
                                  lambda: DCL(temperature=0.01, form="query_document", symmetric=True),
                                  lambda: GlobalInfoNCE(num_samples=300, temperature=0.01, form="query_document",
                                                        symmetric=True)],
                         ids=["InfoNCE", "DCL", "GlobalInfoNCE"])
def test_the_pair_at_clips_largest_scale_takes_the_floored_exp_as_the_directions_do(monkeypatch, make):
    """tau = 0.01 on trained-like float32 embeddings (each pair at cosine ~0.99): the terms below
    e^-69 are floored (losses/_exp.py), on the column direction's transposed view too."""
    def run(shared: bool):
        if not shared:
            _per_direction(monkeypatch)
        torch.manual_seed(0)
        base = torch.randn(300, 32)
        q = (base + 0.05 * torch.randn(300, 32)).requires_grad_()
        d = (base + 0.05 * torch.randn(300, 32)).requires_grad_()
        extra = (torch.arange(300),) if "Global" in type(loss_fn).__name__ else ()
        loss = loss_fn(q, d, *extra, labels=torch.arange(300) % 11)
        loss.backward()
        return loss.detach(), q.grad, d.grad

    loss_fn = make()
    calls = _spy(monkeypatch)
    shared = run(True)
    assert len(calls) == 1
    loss_fn = make()
    for a, b in zip(shared, run(False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("loss_class", [InfoNCE, DCL, SigLIP, GlobalInfoNCE])
def test_the_pair_on_cuda_equals_the_cpu_pair(monkeypatch, loss_class):
    """On a GPU the column direction's kernels run on a transposed CUDA view (no floor bound there)."""
    calls = _spy(monkeypatch)
    torch.manual_seed(0)
    inputs = [torch.randn(300, 32, dtype=torch.float64), torch.randn(300, 32, dtype=torch.float64),
              torch.randn(300, 1, 32, dtype=torch.float64)]
    out = []
    for device in ("cpu", "cuda"):
        xs = [x.to(device).requires_grad_() for x in inputs]
        extra = {"num_samples": 300} if loss_class is GlobalInfoNCE else {}
        loss_fn = loss_class(form="query_document", symmetric=True, **extra).double().to(device)
        args = (xs[0], xs[1], torch.arange(300, device=device), xs[2]) if extra else tuple(xs)
        loss = loss_fn(*args, labels=torch.arange(300, device=device) % 7)
        loss.backward()
        out.append([loss.detach().cpu()] + [x.grad.cpu() for x in xs])
    assert len(calls) == 2
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
