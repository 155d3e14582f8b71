"""SigLIP (Zhai et al. 2023) against a float64 loop over the pairs written
from the paper's eq. 1, with the gradients of the embeddings, the logit
scale and the bias."""

from __future__ import annotations

import math

import pytest
import torch

import _reference as ref
from _inputs import float64_views
from negbatch import SigLIP, same_id_mask
from negbatch.losses._layout import build_layout


def _data(n=6, d=5, seed=0, hard=0):
    return float64_views(n, d, seed, hard)


def _loss(**options):
    return SigLIP(temperature=0.25, bias=-2.0, **options).double()


def _reference_params():
    # log(4) as the module holds it: initialised in float32, then made float64.
    log_scale = torch.tensor(math.log(4.0), dtype=torch.float32).double().requires_grad_()
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    return log_scale, bias


def _match(loss_fn, loss, reference, inputs, params):
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=0)
    mine = list(inputs) + [loss_fn.logit_scale.log_scale, loss_fn.bias]
    for g, w in zip(torch.autograd.grad(loss, mine, retain_graph=True), torch.autograd.grad(reference, inputs + params)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("hard,use_mask,positives", [(0, False, "pair"), (2, True, "pair"), (0, True, "mask")])
def test_query_document_all_pairs(hard, use_mask, positives, dense_path):
    xs = _data(hard=hard)
    h = xs[2] if hard else None
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    mask = None
    if use_mask:
        mask = torch.zeros(6, 6 * (1 + hard), dtype=torch.bool)
        mask[:, :6] = same_id_mask(labels, labels)
    loss_fn = _loss(positives=positives)
    loss = loss_fn(xs[0], xs[1], h, mask=mask)
    log_scale, bias = _reference_params()
    kw = {"positive_mask" if positives == "mask" else "excluded_mask": mask}
    want = ref.siglip_query_document(xs[0], xs[1], log_scale.exp(), bias, hard=h, **kw)
    _match(loss_fn, loss, want, xs, [log_scale, bias])


def test_sampled_negatives_sum_over_the_positive_and_k_negatives():
    q, d = _data(n=8)
    loss_fn = _loss(negatives=3)
    loss = loss_fn(q, d, generator=torch.Generator().manual_seed(5))
    direction = build_layout(q, d, form="query_document").directions[0]
    sel = direction.select(3, torch.Generator().manual_seed(5), "raise")
    sets = [set(r.tolist()) for r in sel.index[:, 1:]]
    log_scale, bias = _reference_params()
    _match(loss_fn, loss, ref.siglip_query_document(q, d, log_scale.exp(), bias, neg_sets=sets), [q, d],
           [log_scale, bias])


def test_two_view(dense_path):
    z1, z2 = _data()
    loss_fn = _loss(form="two_view")
    loss = loss_fn(z1, z2)
    log_scale, bias = _reference_params()
    _match(loss_fn, loss, ref.siglip_two_view(z1, z2, log_scale.exp(), bias), [z1, z2], [log_scale, bias])


def test_symmetric_sums_the_same_pairs_again(dense_path):
    q, d = _data()
    torch.testing.assert_close(_loss(symmetric=True)(q, d), _loss()(q, d), rtol=1e-12, atol=0)


def test_fixed_scale_and_bias_and_the_autograd_path(dense_path):
    q, d = (t.detach().float().requires_grad_() for t in _data(n=20, d=8))
    fixed = SigLIP(temperature=0.1, bias=-3.0, learnable_temperature=False, learnable_bias=False)
    assert list(fixed.parameters()) == []
    loss = fixed(q, d)
    want = ref.siglip_query_document(q.double(), d.double(), 10.0, -3.0)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fixed(q, d)
    torch.testing.assert_close(low.double(), want, rtol=5e-2, atol=0)


def test_the_dense_backward_runs_once(fused_only):
    q, d = _data()
    loss = _loss()(q, d)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def test_bad_bias_is_refused():
    with pytest.raises(ValueError, match="bias must be a finite float"):
        SigLIP(bias=float("nan"))
    for wrong_type in ("x", True, None):
        with pytest.raises(TypeError, match="bias must be a finite float .* got (str|bool|NoneType)"):
            SigLIP(bias=wrong_type)
    with pytest.raises(TypeError, match="by keyword only"):
        SigLIP(0.1)


@pytest.mark.parametrize("form,symmetric", [("two_view", False), ("query_document", False), ("query_document", True)])
@pytest.mark.parametrize("learnable", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_small_plain_calls_equal_the_layout_path(monkeypatch, form, symmetric, learnable, reduction):
    import negbatch.losses._layout as layout

    a, b = _data(n=7)
    loss_fn = SigLIP(temperature=0.2, bias=-2.0, form=form, symmetric=symmetric, learnable_temperature=learnable,
                     learnable_bias=learnable, reduction=reduction).double()
    inputs = [a, b, *loss_fn.parameters()]
    short = loss_fn(a, b)
    short_grads = torch.autograd.grad(short.sum(), inputs)
    monkeypatch.setattr(layout, "SMALL_DENSE_LOGITS", 0)
    full = loss_fn(a, b)
    torch.testing.assert_close(short, full, rtol=1e-12, atol=1e-12)
    for g, w in zip(short_grads, torch.autograd.grad(full.sum(), inputs)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_small_plain_calls_name_a_non_finite_input(bad):
    for form, name in (("query_document", "documents"), ("two_view", "view2")):
        a, b = (t.detach().clone() for t in _data())
        b[1, 2] = bad
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            SigLIP(form=form)(a, b)
