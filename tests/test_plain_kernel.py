"""InfoNCE's and SigLIP's small plain calls run in one autograd node each,
with a written-out backward (negbatch/losses/_plain.py): checked here against
per-anchor Python loops in float64, for every form, reduction, temperature
(and bias) and K, and for what a hand-written backward can get wrong (second
order, a second backward, a zero row, one input without gradient, inference
tensors, torch.func)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import negbatch.losses._layout as layout_module
from negbatch import InfoNCE, SigLIP, select_negatives


def _views(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]


def _term(anchor, positive, negatives, scale):
    """-log softmax of the positive among the positive and the negatives."""
    logits = torch.stack([anchor @ positive] + [anchor @ c for c in negatives]) * scale
    return torch.logsumexp(logits, 0) - logits[0]


def _reference_terms(z1, z2, form, symmetric, scale, rows=None, columns=None):
    """Every anchor's term, one at a time: rows (and columns) None means every
    candidate, else row a's sampled bank columns (slot 0: the positive)."""
    n = z1.shape[0]
    terms = []
    if form == "two_view":
        bank = F.normalize(torch.cat([z1, z2]), dim=1)
        for a in range(2 * n):
            positive = (a + n) % (2 * n)
            negatives = [c for c in range(2 * n) if c not in (a, positive)] if rows is None else rows[a][1:]
            terms.append(_term(bank[a], bank[positive], [bank[c] for c in negatives], scale))
        return torch.stack(terms)
    q, d = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    for anchors, bank, sets in [(q, d, rows)] + ([(d, q, columns)] if symmetric else []):
        for i in range(n):
            negatives = [c for c in range(n) if c != i] if sets is None else sets[i][1:]
            terms.append(_term(anchors[i], bank[i], [bank[c] for c in negatives], scale))
    return torch.stack(terms)


def _draws(form, symmetric, n, k, seed):
    """The loss's draws replayed: rows, then (symmetric) columns."""
    if k == "all":
        return None, None
    gen = torch.Generator().manual_seed(seed)
    if form == "two_view":
        itself = torch.arange(2 * n)
        return select_negatives(itself.roll(n), 2 * n, k, self_index=itself, generator=gen).index.tolist(), None
    rows = select_negatives(torch.arange(n), n, k, generator=gen).index.tolist()
    columns = select_negatives(torch.arange(n), n, k, generator=gen).index.tolist() if symmetric else None
    return rows, columns


@pytest.fixture
def plain_only(monkeypatch):
    """Fail if a call takes the layout instead of the plain kernel."""
    def no_layout(*args, **kwargs):
        raise AssertionError("a small plain call took the layout")
    monkeypatch.setattr(layout_module, "build_layout", no_layout)


FORMS = [("two_view", False), ("query_document", False), ("query_document", True)]


def _assert_reduced_value_and_gradients(got, terms, reduction, leaves):
    """``got`` equals the reference ``terms`` reduced, and so do the gradients
    of both on ``leaves`` under unequal weights on the anchors (the backward's
    per-row weights with "none")."""
    want = {"mean": terms.mean(), "sum": terms.sum(), "none": terms}[reduction]
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=1e-14)
    weights = torch.rand(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    for g, w in zip(torch.autograd.grad((got * weights).sum(), leaves),
                    torch.autograd.grad((want * weights).sum(), leaves)):
        # The log-scale is float32: its gradient is rounded to float32.
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-10 if g.dtype == torch.float64 else 1e-6, atol=1e-13)


def test_a_symmetric_call_takes_the_short_path_up_to_b_724_and_the_others_the_layout(monkeypatch):
    """Symmetric calls take the short path up to B = 724 (n x n <= 2^19 logits; above, the layout's
    pair of directions is faster and holds half the memory), the other forms above 256 x 256 the
    layout. At B = 300 the short path equals both directions' cross-entropy in float64."""
    taken = []
    build = layout_module.build_layout
    monkeypatch.setattr(layout_module, "build_layout", lambda *a, **k: taken.append("layout") or build(*a, **k))
    q, d = _views(n=300, d=4, seed=3)
    got = InfoNCE(temperature=0.2, form="query_document", symmetric=True)(q, d)
    assert taken == []
    logits = F.normalize(q, dim=1) @ F.normalize(d, dim=1).T / 0.2
    target = torch.arange(300)
    want = (F.cross_entropy(logits, target, reduction="sum") + F.cross_entropy(logits.T, target, reduction="sum")) / 600
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for g, w in zip(torch.autograd.grad(got, [q, d]), torch.autograd.grad(want, [q, d])):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    InfoNCE(form="query_document")(q, d)
    assert taken == ["layout"]
    InfoNCE(form="query_document", symmetric=True)(*(torch.randn(724, 2) for _ in range(2)))
    assert taken == ["layout"]
    InfoNCE(form="query_document", symmetric=True)(*(torch.randn(725, 2) for _ in range(2)))
    assert taken == ["layout", "layout"]


@pytest.mark.parametrize("form,symmetric", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("negatives", ["all", 3])
@pytest.mark.parametrize("learnable", [False, True])
def test_values_and_gradients_equal_the_per_anchor_loop(plain_only, form, symmetric, reduction, negatives, learnable):
    z1, z2 = _views()
    tau = 0.3
    loss = InfoNCE(temperature=tau, form=form, symmetric=symmetric, reduction=reduction, negatives=negatives,
                   learnable_temperature=learnable)
    got = loss(z1, z2, generator=torch.Generator().manual_seed(4))
    scale = loss.logit_scale.log_scale.exp() if learnable else 1 / tau
    terms = _reference_terms(z1, z2, form, symmetric, scale, *_draws(form, symmetric, 6, negatives, 4))
    _assert_reduced_value_and_gradients(got, terms, reduction, [z1, z2, *loss.parameters()])


@pytest.mark.parametrize("form,symmetric", FORMS)
@pytest.mark.parametrize("negatives", ["all", 3])
def test_second_order_gradients_are_exact(plain_only, form, symmetric, negatives):
    # A gradient penalty: the backward under create_graph differentiates
    # autograd's version of the call, so the second order is the loop's.
    z1, z2 = _views(n=5)
    loss = InfoNCE(temperature=0.2, form=form, symmetric=symmetric, negatives=negatives, learnable_temperature=True)
    log_scale = loss.logit_scale.log_scale

    def penalty(value):
        g1, g2 = torch.autograd.grad(value, (z1, z2), create_graph=True)
        return torch.autograd.grad(g1.pow(2).sum() + (g2 * z1).sum(), (z1, z2, log_scale))

    got = penalty(loss(z1, z2, generator=torch.Generator().manual_seed(2)))
    terms = _reference_terms(z1, z2, form, symmetric, log_scale.exp(), *_draws(form, symmetric, 5, negatives, 2))
    for g, w in zip(got, penalty(terms.mean())):
        torch.testing.assert_close(g, w, rtol=1e-6 if g.dtype == torch.float32 else 1e-10, atol=1e-12)


def test_a_second_backward_adds_the_same_gradient_again(plain_only):
    z1, z2 = _views()
    value = InfoNCE(temperature=0.3, form="query_document", symmetric=True)(z1, z2)
    value.backward(retain_graph=True)
    first = z1.grad.clone(), z2.grad.clone()
    value.backward()
    torch.testing.assert_close(z1.grad, 2 * first[0])
    torch.testing.assert_close(z2.grad, 2 * first[1])


@pytest.mark.parametrize("form", ["two_view", "query_document"])
def test_rows_below_the_clamped_norm_get_the_gradient_of_f_normalize(plain_only, form):
    # F.normalize clamps the norm at 1e-12: a zero row stays zero, a row of
    # norm below 1e-12 is divided by 1e-12 (not by its norm), and both get
    # the incoming gradient divided by 1e-12 with no projection; a row of
    # norm exactly 1e-12 keeps the projection (the clamp passes norm >= eps).
    z1, z2 = _views()
    with torch.no_grad():
        z1[2] = 0.0
        z1[3] *= 1e-13 / z1[3].norm()
        z1[4] = 0.0
        z1[4, 1] = 1e-12
    got = torch.autograd.grad(InfoNCE(temperature=0.3, form=form)(z1, z2), (z1, z2))
    if form == "two_view":
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        logits = (z @ z.t() / 0.3).fill_diagonal_(float("-inf"))
        want = F.cross_entropy(logits, torch.arange(12).roll(6))
    else:
        want = F.cross_entropy(F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).t() / 0.3, torch.arange(6))
    for g, w in zip(got, torch.autograd.grad(want, (z1, z2))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert got[0][2].abs().max() > 1e6  # the clamped row's gradient: divided by 1e-12


@pytest.mark.parametrize("form", ["two_view", "query_document"])
def test_an_input_without_gradient_gets_none_and_the_other_its_own(plain_only, form):
    z1, z2 = _views()
    frozen = z2.detach()
    loss = InfoNCE(temperature=0.3, form=form)
    got, = torch.autograd.grad(loss(z1, frozen), z1)
    want, = torch.autograd.grad(_reference_terms(z1, frozen, form, False, 1 / 0.3).mean(), z1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert loss(z1.detach(), frozen).grad_fn is None


def test_torch_func_transforms_get_the_same_gradient(plain_only):
    # torch.func.grad cannot trace an autograd node written in the classic
    # style: under a transform the call runs on autograd's own ops. (Sampled
    # negatives are drawn in numpy, which a transform's tensors refuse.)
    z1, z2 = (z.detach() for z in _views())
    loss = InfoNCE(temperature=0.3, form="query_document", symmetric=True)
    got = torch.func.grad(lambda q: loss(q, z2))(z1)
    q = z1.clone().requires_grad_()
    want, = torch.autograd.grad(loss(q, z2), q)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("form", ["two_view", "query_document"])
def test_inference_tensors_beside_trained_ones(form):
    # Documents embedded under torch.inference_mode (a frozen tower) against
    # trained queries, with a learnable temperature: the node saves its inputs
    # for a second order, which an inference tensor refuses, so such calls run
    # on autograd's ops.
    z1, z2 = _views()
    with torch.inference_mode():
        frozen = z2.detach() * 1.0
    loss = InfoNCE(temperature=0.3, form=form, learnable_temperature=True)
    value = loss(z1, frozen)
    scale = loss.logit_scale.log_scale
    got = torch.autograd.grad(value, (z1, scale))
    want = torch.autograd.grad(_reference_terms(z1, frozen.clone(), form, False, scale.exp()).mean(), (z1, scale))
    torch.testing.assert_close(value, _reference_terms(z1, frozen.clone(), form, False, scale.exp()).mean())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10 if g.dtype == torch.float64 else 1e-6, atol=1e-13)


@pytest.mark.cuda
@pytest.mark.parametrize("form,symmetric", FORMS)
@pytest.mark.parametrize("negatives", ["all", 3])
@pytest.mark.parametrize("path", ["short", "layout"])
def test_on_cuda_the_node_equals_the_loop(monkeypatch, form, symmetric, negatives, path):
    # The draws differ on CUDA (its generator): they are read back from the
    # same generator state, as on the CPU. "layout": the same call through the
    # layout's kernels (sampled two views: the transposed scatter on CUDA).
    if path == "layout":
        monkeypatch.setattr(layout_module, "SMALL_DENSE_LOGITS", 0)
    z1, z2 = (z.detach().cuda().requires_grad_() for z in _views())
    loss = InfoNCE(temperature=0.3, form=form, symmetric=symmetric, negatives=negatives,
                   learnable_temperature=True).cuda()
    got = loss(z1, z2, generator=torch.Generator("cuda").manual_seed(4))
    rows = columns = None
    if negatives != "all":
        gen = torch.Generator("cuda").manual_seed(4)
        n = z1.shape[0]
        if form == "two_view":
            itself = torch.arange(2 * n, device="cuda")
            rows = select_negatives(itself.roll(n), 2 * n, 3, self_index=itself, generator=gen).index.tolist()
        else:
            positive = torch.arange(n, device="cuda")
            rows = select_negatives(positive, n, 3, generator=gen).index.tolist()
            columns = select_negatives(positive, n, 3, generator=gen).index.tolist() if symmetric else None
    scale = loss.logit_scale.log_scale
    want = _reference_terms(z1, z2, form, symmetric, scale.exp(), rows, columns).mean()
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=1e-14)
    for g, w in zip(torch.autograd.grad(got, (z1, z2, scale)), torch.autograd.grad(want, (z1, z2, scale))):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-10 if g.dtype == torch.float64 else 1e-6, atol=1e-13)



# ------------------------------------------------------------------ SigLIP


def _sigmoid_terms(z1, z2, form, symmetric, scale, bias):
    """Every anchor's sum over its candidates of -log sigmoid(z (scale s + b)),
    z = +1 for the positive and -1 otherwise, one pair at a time."""
    n = z1.shape[0]
    if form == "two_view":
        bank = F.normalize(torch.cat([z1, z2]), dim=1)
        directions = [(bank, bank, lambda a: (a + n) % (2 * n), lambda a, c: c != a)]
    else:
        q, d = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        directions = [(q, d, lambda i: i, lambda i, c: True)]
        if symmetric:
            directions.append((d, q, lambda i: i, lambda i, c: True))
    terms = []
    for anchors, candidates, positive, allowed in directions:
        for i in range(anchors.shape[0]):
            pairs = []
            for c in range(candidates.shape[0]):
                if allowed(i, c):
                    sign = 1.0 if c == positive(i) else -1.0
                    pairs.append(-F.logsigmoid(sign * (scale * (anchors[i] @ candidates[c]) + bias)))
            terms.append(torch.stack(pairs).sum())
    return torch.stack(terms)


@pytest.fixture
def siglip_plain_only(monkeypatch):
    def no_layout(*args, **kwargs):
        raise AssertionError("a small plain SigLIP call took the layout")
    monkeypatch.setattr(layout_module, "build_layout", no_layout)


@pytest.mark.parametrize("form,symmetric", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("learnable", [False, True])
def test_siglip_values_and_gradients_equal_the_pairwise_loop(siglip_plain_only, form, symmetric, reduction, learnable):
    z1, z2 = _views()
    loss = SigLIP(temperature=0.25, bias=-2.0, form=form, symmetric=symmetric, reduction=reduction,
                  learnable_temperature=learnable, learnable_bias=learnable)
    got = loss(z1, z2)
    scale = loss.logit_scale.log_scale.exp() if learnable else 4.0
    terms = _sigmoid_terms(z1, z2, form, symmetric, scale, loss.bias.to(torch.float64))
    _assert_reduced_value_and_gradients(got, terms, reduction, [z1, z2, *loss.parameters()])


@pytest.mark.parametrize("form,symmetric", FORMS)
def test_siglip_second_order_and_a_second_backward(siglip_plain_only, form, symmetric):
    z1, z2 = _views(n=5)
    loss = SigLIP(temperature=0.25, bias=-2.0, form=form, symmetric=symmetric)
    leaves = (z1, z2, loss.logit_scale.log_scale, loss.bias)

    def penalty(value):
        g1, g2 = torch.autograd.grad(value, (z1, z2), create_graph=True)
        return torch.autograd.grad(g1.pow(2).sum() + (g2 * z1).sum(), leaves)

    value = loss(z1, z2)
    terms = _sigmoid_terms(z1, z2, form, symmetric, loss.logit_scale.log_scale.exp(), loss.bias.to(torch.float64))
    for g, w in zip(penalty(value), penalty(terms.mean())):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-6 if g.dtype == torch.float32 else 1e-10, atol=1e-12)
    first = torch.autograd.grad(value, (z1, z2), retain_graph=True)
    again = torch.autograd.grad(value, (z1, z2))
    for f, g in zip(first, again):
        torch.testing.assert_close(f, g)


@pytest.mark.parametrize("form", ["two_view", "query_document"])
def test_siglip_zero_row_and_inference_tensors(siglip_plain_only, form):
    z1, z2 = _views()
    with torch.no_grad():
        z1[2] = 0.0
        z1[3] *= 1e-13 / z1[3].norm()
    loss = SigLIP(temperature=0.25, bias=-2.0, form=form, learnable_temperature=False, learnable_bias=False)
    got = torch.autograd.grad(loss(z1, z2), (z1, z2))
    want = torch.autograd.grad(_sigmoid_terms(z1, z2, form, False, 4.0, -2.0).mean(), (z1, z2))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    with torch.inference_mode():
        frozen = z2.detach() * 1.0
    got, = torch.autograd.grad(loss(z1, frozen), z1)
    want, = torch.autograd.grad(_sigmoid_terms(z1, frozen.clone(), form, False, 4.0, -2.0).mean(), z1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
