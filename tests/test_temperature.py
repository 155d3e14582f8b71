"""A learnable temperature (CLIP's logit scale) in every loss: value and
gradient of log(1/tau) against the float64 references at tau = exp(-log_scale),
the clamp, checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch

import _reference as ref
from negbatch import DCL, GlobalInfoNCE, InfoNCE, ReLIC
from negbatch.losses import LearnableTemperature


def _data(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]


def _log_scale(loss_fn):
    """A float64 leaf equal to the module's parameter (initialised in float32)."""
    return loss_fn.logit_scale.log_scale.detach().clone().requires_grad_()


CASES = {
    "infonce": (lambda: InfoNCE(temperature=0.2, learnable_temperature=True),
                lambda z1, z2, tau: ref.softmax_two_view(z1, z2, tau)),
    "infonce_k_all": (lambda: InfoNCE(temperature=0.2, learnable_temperature=True, negatives=10),
                      lambda z1, z2, tau: ref.softmax_two_view(z1, z2, tau)),
    "dcl": (lambda: DCL(temperature=0.2, learnable_temperature=True),
            lambda z1, z2, tau: ref.softmax_two_view(z1, z2, tau, decoupled=True)),
    "relic": (lambda: ReLIC(temperature=0.2, alpha=0.5, learnable_temperature=True),
              lambda z1, z2, tau: ref.relic(z1, z2, tau, 0.5)),
    "query_document": (lambda: InfoNCE(temperature=0.2, learnable_temperature=True, form="query_document"),
                       lambda q, d, tau: ref.infonce_query_document(q, d, tau)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_value_and_gradients_match_the_reference_at_the_learned_temperature(name):
    make, reference = CASES[name]
    z1, z2 = _data()
    loss_fn = make().double()
    loss = loss_fn(z1, z2)
    log_scale = _log_scale(loss_fn)
    want = reference(z1, z2, torch.exp(-log_scale))
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
    got = torch.autograd.grad(loss, [z1, z2, loss_fn.logit_scale.log_scale])
    for g, w in zip(got, torch.autograd.grad(want, [z1, z2, log_scale])):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert float(got[2]) != 0.0


def test_global_infonce_learns_its_temperature_through_the_surrogate():
    z1, z2 = _data()
    loss_fn = GlobalInfoNCE(6, temperature=0.2, learnable_temperature=True).double()
    loss = loss_fn(z1, z2, torch.arange(6))  # first visit: the surrogate is the minibatch estimate
    log_scale = _log_scale(loss_fn)
    tau = torch.exp(-log_scale)
    zn = ref._norm(torch.cat([z1, z2]))
    terms = []
    for a, (pos, neg) in enumerate(ref.two_view_sets(6)):
        ln = torch.stack([(zn[a] * zn[c]).sum() / tau for c in neg])
        terms.append(-(zn[a] * zn[pos[0]]).sum() / tau + torch.logsumexp(ln, 0) - math.log(len(neg)))
    want = torch.stack(terms).mean()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
    # Gradient of the surrogate with nu fixed at Zhat: the minibatch gradient on a first visit.
    got = torch.autograd.grad(loss, loss_fn.logit_scale.log_scale)[0]
    torch.testing.assert_close(got, torch.autograd.grad(want, log_scale)[0], rtol=1e-9, atol=1e-12)


def test_the_scale_is_clamped_to_clip_bounds_and_keeps_its_gradient():
    t = LearnableTemperature(0.07)
    with torch.no_grad():
        t.log_scale.fill_(10.0)
    scale = t()
    assert t.log_scale.item() == pytest.approx(math.log(100.0)) and scale.item() == pytest.approx(100.0, rel=1e-6)
    scale.backward()
    assert t.log_scale.grad is not None and float(t.log_scale.grad) == pytest.approx(100.0, rel=1e-6)
    with torch.no_grad():
        t.log_scale.fill_(-3.0)
    assert t().item() == pytest.approx(1.0) and t.temperature == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"must lie in \[1, 100\]"):
        LearnableTemperature(0.001)
    with pytest.raises(ValueError, match=r"must lie in \[1, 100\]"):
        InfoNCE(temperature=2.0, learnable_temperature=True)
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        LearnableTemperature(0)
    with pytest.raises(TypeError, match="temperature must be a positive float, got str"):
        LearnableTemperature("0.1")


@pytest.mark.parametrize("bad, error, match", [
    (math.inf, ValueError, r"max_scale must be a finite float > 1 .*got inf: an unbounded scale .*e\.g\. 1e4"),
    (math.nan, ValueError, r"max_scale must be a finite float > 1 .*got nan"),
    (1.0, ValueError, r"max_scale must be a finite float > 1 .*got 1\.0: .*cannot move; for a fixed temperature"),
    (0.5, ValueError, r"max_scale must be a finite float > 1 .*got 0\.5"),
    ("100", TypeError, r"max_scale must be a finite float > 1 .*got str"),
    (True, TypeError, r"max_scale must be a finite float > 1 .*got bool"),
])
def test_max_scale_must_be_a_finite_bound_above_one(bad, error, match):
    """max_scale=inf was accepted: the clamp bounded nothing and a diverging
    step could take the scale to inf and the loss to NaN; at 1 the scale is
    clamped to [1, 1] and the learnable temperature never moves."""
    with pytest.raises(error, match=match):
        LearnableTemperature(1.0, max_scale=bad)


def test_a_loose_finite_max_scale_bounds_the_scale():
    t = LearnableTemperature(0.5, max_scale=1e4)
    with torch.no_grad():
        t.log_scale.fill_(1e3)  # exp of it is inf in float32
    assert t().item() == pytest.approx(1e4, rel=1e-6) and math.isfinite(t().item())


def test_checkpoint_round_trip_and_log_values():
    loss_fn = InfoNCE(temperature=0.1, learnable_temperature=True)
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.5)
    z1, z2 = _data()
    loss_fn(z1.float(), z2.float()).backward()
    optimizer.step()
    assert loss_fn.current_temperature != pytest.approx(0.1)
    buffer = io.BytesIO()
    torch.save(loss_fn.state_dict(), buffer)
    buffer.seek(0)
    restored = InfoNCE(temperature=0.1, learnable_temperature=True)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.current_temperature == loss_fn.current_temperature
    assert restored.log_values() == {"temperature": loss_fn.current_temperature}
    assert list(InfoNCE(temperature=0.1).parameters()) == []


def _calls():
    """Each loss with a learnable scalar, called on the small plain path and
    on the layout path (a mask takes it)."""
    from negbatch import SigLIP

    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    no_mask = torch.zeros(4, 4, dtype=torch.bool)
    losses = {
        "InfoNCE": InfoNCE(temperature=0.1, learnable_temperature=True),
        "DCL": DCL(temperature=0.1, learnable_temperature=True),
        "SigLIP": SigLIP(temperature=0.1),
        "ReLIC": ReLIC(temperature=0.1, learnable_temperature=True),
    }
    for name, loss in losses.items():
        yield name, "plain", loss, lambda loss=loss: loss(z1, z2)
        yield name, "layout", loss, lambda loss=loss: loss(z1, z2, mask=no_mask)
    g = GlobalInfoNCE(num_samples=8, temperature=0.1, learnable_temperature=True)
    yield "GlobalInfoNCE", "layout", g, lambda: g(z1, z2, torch.arange(4))


@pytest.mark.parametrize("case", list(range(9)))
def test_a_nan_log_scale_after_construction_is_named(case):
    name, path, loss, call = list(_calls())[case]
    assert torch.isfinite(call()).all()
    with torch.no_grad():
        loss.logit_scale.log_scale.fill_(float("nan"))  # what a diverged step leaves
    with pytest.raises(ValueError, match=r"the loss's logit_scale.log_scale is nan: an optimizer step"):
        call()
    loss.check_finite = False  # the check is what raises: without it the NaN goes through
    if name == "GlobalInfoNCE":  # ... to its state's own guard, which refuses to store NaN
        with pytest.raises(ValueError, match="log_zhat contains NaN or inf; the state is left unchanged"):
            call()
    else:
        assert torch.isnan(call()).any()
    with torch.no_grad():
        loss.logit_scale.log_scale.fill_(float("inf"))  # clamped to the bound, as CLIP does
    loss.check_finite = True
    assert torch.isfinite(call()).all() and loss.current_temperature == pytest.approx(0.01)


@pytest.mark.parametrize("path", ["plain", "layout"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_siglip_bias_from_a_loaded_state_dict_is_named(path, bad):
    from negbatch import SigLIP

    loss = SigLIP(temperature=0.1)
    state = loss.state_dict()
    state["bias"] = torch.tensor(bad)
    loss.load_state_dict(state)
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    kwargs = {"mask": torch.zeros(4, 4, dtype=torch.bool)} if path == "layout" else {}
    with pytest.raises(ValueError, match=r"the loss's bias is (nan|inf|-inf): .*load a checkpoint with a finite value"):
        loss(z1, z2, **kwargs)
    # The inputs are still named first when they are the culprit.
    with pytest.raises(ValueError, match="queries contains NaN"):
        loss(z1.new_full((4, 3), float("nan")), z2, **kwargs)
