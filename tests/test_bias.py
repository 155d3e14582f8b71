"""Gradient-bias diagnostics: exactness against float64 loops, and the
statistical claims with Monte-Carlo bounds from the measured variance."""

from __future__ import annotations

import pytest
import torch

from negbatch import GlobalInfoNCE
from negbatch.diagnostics.bias import bias_curve, exact_global_gradient, gradient_bias, minibatch_gradient
from test_global_nce import query_document_anchors, reference_terms, two_view_anchors

TAU = 0.3


def _clustered(n=40, d_in=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, d_in, generator=g, dtype=dtype)
    x = centers[torch.arange(n) % 4] + 0.5 * torch.randn(n, d_in, generator=g, dtype=dtype)
    views = (x + 0.2 * torch.randn(n, d_in, generator=g, dtype=dtype),
             x + 0.2 * torch.randn(n, d_in, generator=g, dtype=dtype))
    torch.manual_seed(seed)
    model = torch.nn.Linear(d_in, 4).to(dtype)
    return model, views


def _flat_grad(value, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])


@pytest.mark.parametrize("form", ["two_view", "query_document", "symmetric"])
def test_exact_gradient_matches_loop_reference(form):
    model, (xa, xb) = _clustered(n=7)
    loss = GlobalInfoNCE(7, temperature=TAU, form="two_view" if form == "two_view" else "query_document",
                         symmetric=form == "symmetric").double()
    exact = exact_global_gradient(model, loss, (xa, xb), chunk_size=3)  # chunks smaller than N
    params = list(model.parameters())
    za, zb = model(xa), model(xb)
    if form == "two_view":
        anchors = two_view_anchors(za, zb)
    else:
        anchors = query_document_anchors(za, zb, symmetric=form == "symmetric")
    pos, zhat, _ = reference_terms(anchors, TAU)
    global_loss = (-pos + torch.log(zhat)).mean()
    torch.testing.assert_close(exact.gradient, _flat_grad(global_loss, params))
    assert exact.loss == pytest.approx(float(global_loss.detach()), rel=1e-12)
    torch.testing.assert_close(exact.log_normalizers, torch.log(zhat).detach().view(loss.num_roles, 7).t())
    assert all(p.grad is None for p in params)


def test_whole_data_set_batch_gives_the_exact_gradient():
    model, views = _clustered(n=12)
    loss = GlobalInfoNCE(12, temperature=TAU).double()
    exact = exact_global_gradient(model, loss, views, chunk_size=5)
    everything = torch.randperm(12)
    torch.testing.assert_close(minibatch_gradient(model, loss, views, everything), exact.gradient)
    corrected = GlobalInfoNCE(12, temperature=TAU).double()
    corrected.set_log_normalizers(exact.log_normalizers)
    torch.testing.assert_close(
        minibatch_gradient(model, corrected, views, everything, estimator="corrected_fixed"), exact.gradient)
    # A training step's gradient from an empty state (first visit: nu = Zhat = Z);
    # the state is restored afterwards.
    fresh = GlobalInfoNCE(12, temperature=TAU, gamma=0.3).double()
    torch.testing.assert_close(minibatch_gradient(model, fresh, views, everything, estimator="corrected"),
                               exact.gradient)
    assert not fresh.visited.any() and int(fresh.num_updates) == 0


@pytest.mark.parametrize("negatives", ["all", 3])
def test_corrected_gradient_with_exact_nu_is_unbiased(negatives):
    model, views = _clustered()
    loss = GlobalInfoNCE(40, temperature=TAU, negatives=negatives).double()
    est = gradient_bias(model, loss, views, 4, 400, estimator="corrected_exact", seed=1)
    # E||mean - g||^2 = tr Cov / M when unbiased: 3 noise floors is a ~3-sigma bound.
    assert est.relative_bias <= 3 * est.noise_floor, est
    assert not loss.visited.any()  # the loss itself is not modified


def test_plain_gradient_is_biased_and_the_bias_shrinks_with_batch_size():
    model, views = _clustered()
    loss = GlobalInfoNCE(40, temperature=0.15).double()
    rows = bias_curve(model, loss, views, [3, 6, 20], 400, estimators=("plain",), seed=2)
    small, mid, large = rows
    # Detectable, not noise (the same 3-sigma scale as the unbiasedness test).
    assert small.relative_bias > 5 * small.noise_floor, small
    assert mid.relative_bias > 3 * mid.noise_floor, mid
    assert small.relative_bias_debiased > mid.relative_bias_debiased > large.relative_bias_debiased
    assert small.relative_variance > large.relative_variance


def test_running_estimate_after_e_steps_reduces_the_bias():
    model, views = _clustered()
    loss = GlobalInfoNCE(40, temperature=TAU, gamma=0.2).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # E-steps only: the model is fixed
        for _ in range(300):
            idx = torch.randperm(40, generator=g)[:4]
            loss(model(views[0][idx]), model(views[1][idx]), idx)
    plain = gradient_bias(model, loss, views, 4, 300, estimator="plain", seed=4)
    state = loss.log_nu.clone()
    for estimator in ("corrected", "corrected_fixed"):
        running = gradient_bias(model, loss, views, 4, 300, estimator=estimator, seed=4)
        assert running.relative_bias_debiased < 0.5 * plain.relative_bias_debiased, (plain, running)
    assert torch.equal(loss.log_nu, state)


def test_bad_arguments():
    model, views = _clustered(n=10)
    loss = GlobalInfoNCE(11, temperature=TAU).double()
    with pytest.raises(ValueError, match="num_samples=10"):
        exact_global_gradient(model, loss, views)
    loss = GlobalInfoNCE(10, temperature=TAU).double()
    with pytest.raises(ValueError, match="batch_size"):
        gradient_bias(model, loss, views, 11, 5)
    with pytest.raises(ValueError, match="num_batches"):
        gradient_bias(model, loss, views, 4, 1)
    with pytest.raises(ValueError, match="estimator"):
        gradient_bias(model, loss, views, 4, 5, estimator="exact")
    with pytest.raises(TypeError, match="inputs"):
        exact_global_gradient(model, loss, views[0])
    poisoned = views[1].clone()
    poisoned[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"embedding of inputs\[1\] row 7 holds NaN or inf"):
        exact_global_gradient(model, loss, (views[0], poisoned))
    bn = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4)).double()
    with pytest.warns(UserWarning, match="eval"):
        exact_global_gradient(bn, loss, views)


def test_two_encoders_for_queries_and_documents():
    _, (xq, xd) = _clustered(n=6)
    torch.manual_seed(5)
    q_enc, d_enc = torch.nn.Linear(6, 3).double(), torch.nn.Linear(6, 3).double()
    loss = GlobalInfoNCE(6, temperature=TAU, form="query_document").double()
    exact = exact_global_gradient((q_enc, d_enc), loss, (xq, xd), chunk_size=4)
    pos, zhat, _ = reference_terms(query_document_anchors(q_enc(xq), d_enc(xd)), TAU)
    params = list(q_enc.parameters()) + list(d_enc.parameters())
    torch.testing.assert_close(exact.gradient, _flat_grad((-pos + torch.log(zhat)).mean(), params))
    g = minibatch_gradient((q_enc, d_enc), loss, (xq, xd), torch.arange(6))
    torch.testing.assert_close(g, exact.gradient)
    with pytest.raises(ValueError, match="single"):
        exact_global_gradient((q_enc, d_enc), GlobalInfoNCE(6).double(), (xq, xd))


def test_a_learned_temperature_is_the_one_the_exact_gradient_uses_and_dropout_warns():
    import math

    model, views = _clustered(n=12)
    loss = GlobalInfoNCE(12, temperature=0.5, learnable_temperature=True).double()
    with torch.no_grad():
        loss.logit_scale.log_scale.fill_(math.log(10.0))  # trained to tau = 0.1
    exact = exact_global_gradient(model, loss, views, chunk_size=5)
    fixed = exact_global_gradient(model, GlobalInfoNCE(12, temperature=0.1).double(), views, chunk_size=5)
    torch.testing.assert_close(exact.gradient, fixed.gradient)
    torch.testing.assert_close(minibatch_gradient(model, loss, views, torch.randperm(12)), exact.gradient)
    dropout = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Dropout(0.5)).double()
    with pytest.warns(UserWarning, match="dropout in training mode"):
        exact_global_gradient(dropout, GlobalInfoNCE(12, temperature=TAU).double(), views)
