"""The fused kernels' exp (negbatch/losses/_exp.py): terms below exp(floor)
are exactly zero, every other term within exp(floor) of torch's exp, NaN and
inf kept; and the losses at a CLIP-like logit scale, where most terms are
floored, still equal their float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import negbatch.losses._layout as layout_module
from negbatch import GlobalInfoNCE, InfoNCE
from negbatch.losses._exp import _AT_FLOOR, _FLOOR, exp_floored, exp_floored_, lowest_log_softmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_terms_below_the_floor_are_zero_and_the_others_torchs_exp(dtype):
    floor = _FLOOR[dtype]
    x = torch.cat([torch.linspace(floor - 50, 5, 2001, dtype=dtype),
                   torch.tensor([float("-inf"), float("inf"), float("nan"), floor, floor - 1e-3], dtype=dtype)])
    got, want = exp_floored(x), torch.exp(x.double())
    below = x <= floor
    assert (got[below & ~x.isnan()] == 0).all()  # -inf and everything at or under the floor
    kept = ~below & x.isfinite()
    exact = want[kept].to(dtype)
    assert ((got[kept] - exact).abs() <= 2 * _AT_FLOOR[dtype] + 4 * torch.finfo(dtype).eps * exact).all()
    assert got[-3].isnan() and got[-4] == math.inf  # NaN stays NaN (a threshold would zero it)
    assert (got[kept] > 0).all() and (got[kept] >= torch.finfo(dtype).tiny).all()  # no subnormal result
    in_place = x.clone()
    assert exp_floored_(in_place) is in_place and torch.equal(in_place.nan_to_num(-1.0), got.nan_to_num(-1.0))


def test_a_known_bound_above_the_floor_is_torchs_exp_itself():
    # e^-60 is 9e-27: subtracting the floor's 1e-30 would show in its fourth digit.
    x = torch.tensor([-60.0, -3.0, 0.0, float("-inf")])
    assert torch.equal(exp_floored(x, lowest=-65.0), torch.exp(x))  # no finite argument can reach the floor
    assert not torch.equal(exp_floored(x), torch.exp(x))
    assert lowest_log_softmax(10.0, 100) == pytest.approx(-20.0 - math.log(100))


def test_other_dtypes_take_torchs_exp():
    x = torch.tensor([-200.0, 0.0, 1.0], dtype=torch.bfloat16)
    assert torch.equal(exp_floored(x), torch.exp(x))


def _aligned(n, d=16, seed=0, dtype=torch.float32):
    """Trained-like pairs: the two views of a sample nearly equal, other samples far."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    views = [(base + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)) for _ in range(2)]
    return [v.to(dtype).requires_grad_() for v in views]


def _nt_xent(z1, z2, tau):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = (z @ z.t() / tau).fill_diagonal_(float("-inf"))
    return F.cross_entropy(logits, torch.arange(2 * n).roll(n))


@pytest.mark.parametrize("path", ["plain", "fused"])
@pytest.mark.parametrize("form", ["two_view", "query_document"])
def test_losses_at_a_clip_scale_equal_float64(monkeypatch, path, form):
    # tau = 0.01: most softmax terms are below exp(-69) and floored.
    if path == "fused":
        monkeypatch.setattr(layout_module, "SMALL_DENSE_LOGITS", 0)
    z1, z2 = _aligned(24)
    loss = InfoNCE(temperature=0.01, form=form)
    got = loss(z1, z2)
    w1, w2 = (z.detach().double().requires_grad_() for z in (z1, z2))
    if form == "two_view":
        want = _nt_xent(w1, w2, 0.01)
    else:
        want = F.cross_entropy(F.normalize(w1, dim=1) @ F.normalize(w2, dim=1).t() / 0.01, torch.arange(24))
    logits = F.normalize(w1, dim=1) @ F.normalize(w2, dim=1).t() / 0.01
    assert (logits - logits.amax(dim=1, keepdim=True) < _FLOOR[torch.float32]).float().mean() > 0.5  # floored
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, (z1, z2)), torch.autograd.grad(want, (w1, w2))):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


def test_global_loss_at_a_clip_scale_equals_its_float64_self():
    z1, z2 = _aligned(40)
    idx = torch.arange(40)
    got = GlobalInfoNCE(num_samples=40, temperature=0.01)(z1, z2, idx)
    w1, w2 = (z.detach().double().requires_grad_() for z in (z1, z2))
    want = GlobalInfoNCE(num_samples=40, temperature=0.01).double()(w1, w2, idx)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, (z1, z2)), torch.autograd.grad(want, (w1, w2))):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_a_nan_input_still_gives_a_nan_loss_and_gradient(monkeypatch, path):
    if path == "fused":
        monkeypatch.setattr(layout_module, "SMALL_DENSE_LOGITS", 0)
    z1, z2 = _aligned(8)
    bad = z1.detach().clone()
    bad[3, 0] = float("nan")
    bad.requires_grad_()
    value = InfoNCE(temperature=0.01, check_finite=False)(bad, z2)
    grad, = torch.autograd.grad(value, bad)
    assert value.isnan() and grad.isnan().any()
