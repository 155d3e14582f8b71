"""GlobalInfoNCE against per-anchor float64 loops written for these tests."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from negbatch import GlobalInfoNCE, InfoNCE, select_negatives

TAU = 0.3


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def two_view_anchors(z1, z2, mask=None):
    """(anchor, positive, [negatives]) per anchor, view-1 anchors first."""
    z1, z2 = _unit(z1), _unit(z2)
    views = (z1, z2)
    n = z1.shape[0]
    out = []
    for v in (0, 1):
        for i in range(n):
            negs = [views[w][j] for w in (0, 1) for j in range(n) if j != i and not (mask is not None and mask[i, j])]
            out.append((views[v][i], views[1 - v][i], negs))
    return out


def query_document_anchors(q, d, hard=None, mask=None, symmetric=False):
    q, d = _unit(q), _unit(d)
    n = q.shape[0]
    bank = [d[j] for j in range(n)]
    if hard is not None:
        h = _unit(hard)
        bank += [h[j, k] for j in range(n) for k in range(h.shape[1])]
    out = []
    for i in range(n):
        negs = [bank[c] for c in range(len(bank)) if c != i and not (mask is not None and mask[i, c])]
        out.append((q[i], d[i], negs))
    if symmetric:
        for i in range(n):
            negs = [q[j] for j in range(n) if j != i and not (mask is not None and mask[j, i])]
            out.append((d[i], q[i], negs))
    return out


def reference_terms(anchors, tau=TAU):
    """Per anchor: positive logit, Zhat (mean over negatives) and InfoNCE."""
    pos, zhat, nce = [], [], []
    for a, p, negs in anchors:
        sp = torch.dot(a, p) / tau
        en = torch.stack([torch.exp(torch.dot(a, m) / tau) for m in negs])
        pos.append(sp)
        zhat.append(en.mean())
        nce.append(-sp + torch.log(torch.exp(sp) + en.sum()))
    return torch.stack(pos), torch.stack(zhat), torch.stack(nce)


def reference_step(anchors, nu_old, visited, gamma, tau=TAU):
    """Hand E-step then surrogate -s/tau + Zhat/nu + log nu - 1 per anchor."""
    pos, zhat, nce = reference_terms(anchors, tau)
    nu = []
    for k in range(len(anchors)):
        z = zhat[k].detach()
        nu.append(z if not visited[k] else (1 - gamma) * nu_old[k] + gamma * z)
    nu = torch.stack(nu)
    return -pos + zhat / nu + torch.log(nu) - 1, nu, nce, pos, zhat


def _data(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]


@pytest.mark.parametrize("use_mask", [False, True])
def test_two_view_surrogate_gradient_and_state_match_loop(use_mask):
    z1, z2 = _data()
    n = z1.shape[0]
    mask = None
    if use_mask:
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[0, 3] = mask[3, 0] = mask[2, 5] = True
    loss_fn = GlobalInfoNCE(20, temperature=TAU, gamma=0.4).double()
    idx = torch.tensor([3, 7, 1, 12, 0, 19])
    # Step 1: first visit, nu = Zhat.  Step 2: same samples, mixed.
    nu_old = torch.ones(2 * n, dtype=torch.float64)
    visited = [False] * (2 * n)
    for step in range(2):
        anchors = two_view_anchors(z1, z2, mask)
        ref, nu, nce, pos, zhat = reference_step(anchors, nu_old, visited, 0.4)
        out = loss_fn(z1, z2, idx, mask=mask)
        torch.testing.assert_close(out, ref.mean())
        g = torch.autograd.grad(out, (z1, z2))
        g_ref = torch.autograd.grad(ref.mean(), (z1, z2))
        torch.testing.assert_close(g[0], g_ref[0])
        torch.testing.assert_close(g[1], g_ref[1])
        torch.testing.assert_close(loss_fn.log_nu[idx], torch.log(nu).view(2, n).t())
        torch.testing.assert_close(loss_fn.last_infonce, nce.mean())
        torch.testing.assert_close(loss_fn.last_minibatch_loss, (-pos + torch.log(zhat)).mean())
        nu_old, visited = nu.detach(), [True] * (2 * n)
        with torch.no_grad():  # move the embeddings so that step 2 sees new estimates
            z1.add_(0.3)
    assert int(loss_fn.num_updates) == 2
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[idx] = False
    assert not loss_fn.visited[untouched].any()
    assert (loss_fn.log_nu[untouched] == 0).all()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_hard", [False, True])
def test_query_document_matches_loop(symmetric, with_hard):
    q, d = _data(n=5, d=4, seed=1)
    hard = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True) if with_hard else None
    n_cols = 5 * (3 if with_hard else 1)
    mask = torch.zeros(5, n_cols, dtype=torch.bool)
    mask[1, 3] = mask[4, 0] = True
    if with_hard:
        mask[2, 7] = True
    loss_fn = GlobalInfoNCE(9, temperature=TAU, gamma=0.5, form="query_document", symmetric=symmetric).double()
    idx = torch.tensor([8, 0, 4, 2, 6])
    anchors = query_document_anchors(q, d, hard, mask, symmetric)
    ref, nu, nce, _, _ = reference_step(anchors, None, [False] * len(anchors), 0.5)
    out = loss_fn(q, d, idx, hard, mask=mask)
    torch.testing.assert_close(out, ref.mean())
    inputs = (q, d) + ((hard,) if with_hard else ())
    for g, g_ref in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref.mean(), inputs)):
        torch.testing.assert_close(g, g_ref)
    roles = 2 if symmetric else 1
    assert loss_fn.log_nu.shape == (9, roles)
    torch.testing.assert_close(loss_fn.log_nu[idx], torch.log(nu).view(roles, 5).t())
    torch.testing.assert_close(loss_fn.last_infonce, nce.mean())
    # reduction="none": one term per anchor, queries first (the state's column order).
    per_anchor = GlobalInfoNCE(9, temperature=TAU, gamma=0.5, form="query_document", symmetric=symmetric,
                               reduction="none").double()(q, d, idx, hard, mask=mask)
    torch.testing.assert_close(per_anchor, ref)


def test_sampled_negatives_use_the_selected_ones():
    z1, z2 = _data(n=7, seed=2)
    k = 4
    loss_fn = GlobalInfoNCE(7, temperature=TAU, gamma=1.0, negatives=k).double()
    out = loss_fn(z1, z2, torch.arange(7), generator=torch.Generator().manual_seed(5))
    # The same draw, replayed: two_view layout (bank = [view 1; view 2]).
    n = 7
    rows = torch.arange(2 * n)
    sel = select_negatives(torch.cat([rows[n:], rows[:n]]), 2 * n, k, self_index=rows,
                           generator=torch.Generator().manual_seed(5))
    bank = torch.cat([_unit(z1), _unit(z2)])
    anchors = [(bank[r], bank[(r + n) % (2 * n)], [bank[c] for c in sel.index[r, 1:].tolist()]) for r in range(2 * n)]
    ref, nu, _, _, _ = reference_step(anchors, None, [False] * (2 * n), 1.0)
    torch.testing.assert_close(out, ref.mean())
    torch.testing.assert_close(loss_fn.log_nu, torch.log(nu).view(2, n).t())
    for g, g_ref in zip(torch.autograd.grad(out, (z1, z2)), torch.autograd.grad(ref.mean(), (z1, z2))):
        torch.testing.assert_close(g, g_ref)


def test_e_step_arithmetic_by_hand():
    loss_fn = GlobalInfoNCE(5, gamma=0.25, form="query_document").double()
    loss_fn.e_step(torch.tensor([0, 2]), torch.log(torch.tensor([[4.0], [2.0]], dtype=torch.float64)))
    loss_fn.e_step(torch.tensor([2, 3]), torch.log(torch.tensor([[10.0], [6.0]], dtype=torch.float64)))
    nu = loss_fn.log_nu.exp().squeeze(1)
    # 0: first visit 4; 2: 0.75*2 + 0.25*10 = 4; 3: first visit (gamma=1) 6; 1, 4 untouched.
    torch.testing.assert_close(nu, torch.tensor([4.0, 1.0, 4.0, 6.0, 1.0], dtype=torch.float64))
    assert loss_fn.visited.tolist() == [True, False, True, True, False]
    assert int(loss_fn.num_updates) == 2


def test_e_step_refuses_a_log_zhat_that_is_not_a_float_tensor():
    loss_fn = GlobalInfoNCE(5, form="query_document")
    with pytest.raises(TypeError, match=r"log_zhat must be a floating-point tensor of shape \(2, 1\).*got list"):
        loss_fn.e_step(torch.tensor([0, 2]), [[1.0], [2.0]])
    # An integer tensor would be cast and taken as log values: log Zhat = 1 is not what an int suggests.
    with pytest.raises(TypeError, match="log_zhat.*got dtype torch.int64"):
        loss_fn.e_step(torch.tensor([0, 2]), torch.tensor([[1], [2]]))
    assert not loss_fn.visited.any() and int(loss_fn.num_updates) == 0


def test_gamma_schedule_and_first_visit_per_sample():
    seen_steps = []

    def schedule(step):
        seen_steps.append(step)
        return 0.5 if step == 0 else 0.1

    loss_fn = GlobalInfoNCE(4, gamma=schedule, form="query_document").double()
    log = lambda *v: torch.log(torch.tensor(v, dtype=torch.float64))[:, None]  # noqa: E731
    loss_fn.e_step(torch.tensor([0]), log(8.0))  # first visit: 8 regardless of gamma
    loss_fn.e_step(torch.tensor([0, 1]), log(2.0, 3.0))  # 0: 0.9*8 + 0.1*2; 1: first visit
    torch.testing.assert_close(loss_fn.log_nu.exp()[:2, 0], torch.tensor([7.4, 3.0], dtype=torch.float64))
    assert seen_steps == [0, 1]
    loss_fn.gamma = 1.0  # set attribute
    loss_fn.e_step(torch.tensor([0]), log(5.0))
    assert float(loss_fn.log_nu[0, 0].exp()) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="gamma"):
        loss_fn.gamma = 0.0
        loss_fn.e_step(torch.tensor([0]), log(5.0))
    with pytest.raises(ValueError, match="gamma"):
        GlobalInfoNCE(4, gamma=1.5)


def test_numpy_scalars_are_taken_for_the_float_arguments():
    """gamma=np.float32(0.9) was refused ("must be a float") while 0.9 was taken: numpy's float32
    is no Python float. Every float argument takes numbers.Real (the temperature, the filter's
    margin and fraction, gamma and what a gamma schedule returns); bools stay refused."""
    z1, z2 = _data(seed=4)
    plain = GlobalInfoNCE(20, temperature=0.5, gamma=0.9, filter_margin=-0.5, filter_top=0.125).double()
    numpy = GlobalInfoNCE(20, temperature=np.float32(0.5), gamma=np.float32(0.9), filter_margin=np.float32(-0.5),
                          filter_top=np.float32(0.125)).double()
    scheduled = GlobalInfoNCE(20, temperature=0.5, gamma=lambda step: np.float32(0.9), filter_margin=-0.5,
                              filter_top=0.125).double()
    assert numpy.temperature == 0.5 and numpy.filter_top == 0.125 and type(numpy.gamma) is float
    for step in range(2):
        idx = torch.arange(len(z1)) + step
        want = plain(z1, z2, idx)
        torch.testing.assert_close(numpy(z1, z2, idx), want, rtol=1e-6, atol=0)
        torch.testing.assert_close(scheduled(z1, z2, idx), want, rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="gamma must be a float"):
        GlobalInfoNCE(4, gamma=np.True_)
    with pytest.raises(TypeError, match="temperature must be a positive float"):
        GlobalInfoNCE(4, temperature=True)


def _describe(form="two_view", symmetric=False):
    return "form='two_view'" if form == "two_view" else f"form='query_document', symmetric={symmetric}"


@pytest.mark.parametrize("saved, loading", [
    (dict(), dict(form="query_document", symmetric=True)),  # both R = 2: this one loaded silently
    (dict(form="query_document", symmetric=True), dict()),
    (dict(form="query_document"), dict()),
    (dict(), dict(form="query_document")),
    (dict(form="query_document", symmetric=True), dict(form="query_document")),
])
def test_a_state_of_another_form_is_refused_naming_both_forms(saved, loading):
    a = GlobalInfoNCE(6, **saved)
    a(torch.randn(4, 3), torch.randn(4, 3), torch.arange(4))
    b = GlobalInfoNCE(6, **loading)
    with pytest.raises(RuntimeError, match=re.escape(f"belongs to a GlobalInfoNCE with {_describe(**saved)}, this "
                                                     f"one has {_describe(**loading)}") + ".*build the loss with "
                                           + re.escape(_describe(**saved))):
        b.load_state_dict(a.state_dict())
    assert not b.visited.any() and int(b.num_updates) == 0 and not b.log_nu.any()
    GlobalInfoNCE(6, **saved).load_state_dict(a.state_dict())  # its own form loads


@pytest.mark.parametrize("refused", ["another form", "a diverged state"])
@pytest.mark.parametrize("nested", [False, True])
def test_a_refused_state_loads_nothing_not_even_the_learnable_temperature(refused, nested):
    """torch loads a module's children even where the module refused its own part: the learnable
    temperature took the refused checkpoint's value. Called on the loss itself, nothing loads; inside a
    larger module torch's semantics stand (the loss's own state still refused)."""
    form = dict(form="query_document") if refused == "another form" else {}
    saved = GlobalInfoNCE(6, learnable_temperature=True, temperature=0.5, **form)
    saved(torch.randn(4, 3), torch.randn(4, 3), torch.arange(4))
    state = saved.state_dict()
    if refused == "a diverged state":
        state["log_nu"][0, 0] = float("nan")
    loss = GlobalInfoNCE(6, learnable_temperature=True, temperature=0.1)
    before = loss.logit_scale.log_scale.detach().clone()
    target = torch.nn.ModuleDict({"loss": loss}) if nested else loss
    if nested:
        state = {"loss." + k: v for k, v in state.items()}
    with pytest.raises(RuntimeError, match="belongs to a GlobalInfoNCE with" if form else "holds NaN or inf"):
        target.load_state_dict(state)
    assert not loss.visited.any() and int(loss.num_updates) == 0 and not loss.log_nu.any()
    if not nested:  # inside a larger module, torch's semantics: its children load
        assert torch.equal(loss.logit_scale.log_scale, before)


def test_a_state_saved_without_its_form_loads_and_is_judged_by_its_columns():
    """Checkpoints of earlier versions have no state_form: they load strictly into their form, and
    one whose column count fits no form of this loss is refused naming the forms it fits (two-view
    and symmetric query-document, both of two columns, cannot be told apart there)."""
    a = GlobalInfoNCE(6)
    a(torch.randn(4, 3), torch.randn(4, 3), torch.arange(4))
    old = {k: v for k, v in a.state_dict().items() if k != "state_form"}
    b = GlobalInfoNCE(6)
    b.load_state_dict(old)
    assert torch.equal(b.log_nu, a.log_nu) and int(b.num_updates) == 1
    with pytest.raises(RuntimeError, match=re.escape("with form='two_view' or form='query_document', symmetric=True, "
                                                     "this one has form='query_document', symmetric=False")):
        GlobalInfoNCE(6, form="query_document").load_state_dict(old)


def test_update_false_leaves_state_and_several_calls_update_several_times():
    z1, z2 = _data(seed=3)
    loss_fn = GlobalInfoNCE(6, temperature=TAU, gamma=0.5).double()
    idx = torch.arange(6)
    plain = loss_fn.minibatch_loss(z1, z2)
    out = loss_fn(z1, z2, idx, update=False)  # unvisited: nu = Zhat, the plain loss
    torch.testing.assert_close(out, plain)
    assert int(loss_fn.num_updates) == 0 and not loss_fn.visited.any()
    loss_fn(z1, z2, idx)
    loss_fn(z1, z2, idx)
    assert int(loss_fn.num_updates) == 2


def test_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g), torch.randperm(30, generator=g)[:8])
               for _ in range(6)]
    a = GlobalInfoNCE(30, temperature=0.2, gamma=lambda s: 1.0 / (1 + s))
    for z1, z2, idx in batches[:3]:
        a(z1, z2, idx)
    b = GlobalInfoNCE(30, temperature=0.2, gamma=lambda s: 1.0 / (1 + s))
    b.load_state_dict(a.state_dict())
    for z1, z2, idx in batches[3:]:
        la, lb = a(z1, z2, idx), b(z1, z2, idx)
        assert torch.equal(la, lb)
    for name in ("log_nu", "visited", "num_updates"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    with pytest.raises(RuntimeError, match="size mismatch"):
        GlobalInfoNCE(31).load_state_dict(a.state_dict())
    # A diverged run's state is refused before anything is copied; its advice works.
    diverged = a.state_dict()
    diverged["log_nu"] = diverged["log_nu"].clone()
    diverged["log_nu"][int(batches[0][2][0]), 0] = float("nan")
    c = GlobalInfoNCE(30, temperature=0.2)
    with pytest.raises(RuntimeError, match="log_nu: the checkpoint's per-sample state holds NaN or inf"):
        c.load_state_dict(diverged)
    assert not c.visited.any() and torch.isfinite(c.log_nu).all()
    rest = {k: v for k, v in diverged.items() if k not in ("log_nu", "visited")}
    c.load_state_dict(rest, strict=False)
    assert int(c.num_updates) == int(a.num_updates) and not c.visited.any()


def test_small_temperature_no_overflow():
    # Nearly identical embeddings: s/tau close to 100, exp(100) overflows float32.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 16, generator=g)
    z1 = (base + 1e-3 * torch.randn(8, 16, generator=g)).requires_grad_(True)
    z2 = (base + 1e-3 * torch.randn(8, 16, generator=g)).requires_grad_(True)
    loss_fn = GlobalInfoNCE(8, temperature=0.01, gamma=0.7)
    for _ in range(2):
        out = loss_fn(z1, z2, torch.arange(8))
        grads = torch.autograd.grad(out, (z1, z2))
        assert torch.isfinite(out) and all(torch.isfinite(x).all() for x in grads)
        assert torch.isfinite(loss_fn.log_nu).all() and loss_fn.log_nu.max() > 80  # nu itself > float32 max
    ref_fn = GlobalInfoNCE(8, temperature=0.01, gamma=0.7).double()
    z1d, z2d = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    for _ in range(2):
        ref = ref_fn(z1d, z2d, torch.arange(8))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(loss_fn.log_nu.double(), ref_fn.log_nu, rtol=1e-5, atol=1e-3)


def test_full_batch_augmented_gradient_is_the_global_gradient():
    # Batch = whole data set and nu = Z (first visit): grad of the surrogate is
    # grad mean_a [-s/tau + log Z_a], computed here by the float64 loop.
    z1, z2 = _data(n=8, seed=4)
    loss_fn = GlobalInfoNCE(8, temperature=TAU, gamma=0.3).double()
    out = loss_fn(z1, z2, torch.randperm(8))  # any order of the whole data set
    pos, zhat, _ = reference_terms(two_view_anchors(z1, z2))
    global_loss = (-pos + torch.log(zhat)).mean()
    for g, g_ref in zip(torch.autograd.grad(out, (z1, z2)), torch.autograd.grad(global_loss, (z1, z2))):
        torch.testing.assert_close(g, g_ref)


def test_duplicates_raise_or_average():
    z1, z2 = _data(n=4, seed=5)
    idx = torch.tensor([1, 2, 1, 3])
    loss_fn = GlobalInfoNCE(5, temperature=TAU)
    with pytest.raises(ValueError, match="duplicates"):
        loss_fn(z1.float(), z2.float(), idx)
    assert not loss_fn.visited.any() and int(loss_fn.num_updates) == 0
    avg = GlobalInfoNCE(5, temperature=TAU, gamma=1.0, on_duplicate="mean").double()
    avg(z1, z2, idx)
    _, zhat, _ = reference_terms(two_view_anchors(z1, z2))
    zhat = zhat.view(2, 4).t()
    torch.testing.assert_close(avg.log_nu[1].exp(), (zhat[0] + zhat[2]) / 2)
    torch.testing.assert_close(avg.log_nu[3].exp(), zhat[3])


def test_bad_inputs_name_the_argument():
    loss_fn = GlobalInfoNCE(10)
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"num_samples=10"):
        loss_fn(z1, z2, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="indices must lie"):
        loss_fn(z1, z2, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(TypeError, match="indices"):
        loss_fn(z1, z2, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="indices"):
        loss_fn(z1, z2, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="1-d"):
        loss_fn(z1, z2, torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="4 samples"):
        loss_fn(z1, z2, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        loss_fn(torch.full((4, 3), float("nan")), z2, torch.arange(4))
    with pytest.raises(ValueError, match=r"no negatives.*N mod the batch size is 1.*drop_last=True"):
        loss_fn(z1[:1], z2[:1], torch.tensor([0]))
    with pytest.raises(TypeError, match="num_samples"):
        GlobalInfoNCE(10.0)
    with pytest.raises(ValueError, match="on_duplicate"):
        GlobalInfoNCE(10, on_duplicate="ignore")
    assert not loss_fn.visited.any()


def test_module_moves_state_with_dtype():
    loss_fn = GlobalInfoNCE(10).double()
    assert loss_fn.log_nu.dtype == torch.float64 and loss_fn.visited.dtype == torch.bool
    assert loss_fn.num_updates.dtype == torch.long


@pytest.mark.cuda
def test_cuda_state_follows_module():
    loss_fn = GlobalInfoNCE(10).cuda()
    z1, z2 = torch.randn(4, 3, device="cuda"), torch.randn(4, 3, device="cuda")
    loss_fn(z1, z2, torch.arange(4))  # CPU indices are moved to the state's device
    assert loss_fn.log_nu.is_cuda and loss_fn.visited[:4].all()
    with pytest.raises(ValueError, match="loss.to"):
        loss_fn(z1.cpu(), z2.cpu(), torch.arange(4))


def test_bfloat16_embeddings_keep_a_float32_state():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    loss32 = GlobalInfoNCE(8, temperature=0.05)
    loss16 = GlobalInfoNCE(8, temperature=0.05)
    out32 = loss32(z1, z2, torch.arange(8))
    out16 = loss16(z1.bfloat16(), z2.bfloat16(), torch.arange(8))
    assert out16.dtype == torch.bfloat16 and loss16.log_nu.dtype == torch.float32
    torch.testing.assert_close(loss16.log_nu, loss32.log_nu, rtol=0.02, atol=0.5)
    torch.testing.assert_close(out16.float(), out32, rtol=0.05, atol=0.5)


def test_dense_fused_backward_runs_once():
    loss_fn = GlobalInfoNCE(num_samples=10, temperature=0.5)
    z1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(z1, z2, torch.arange(4))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_use_all_with_k_at_least_the_bank_size_equals_all_negatives():
    # A short tail batch (B = 8: 16 columns) with K = 16 or more: every candidate, densely.
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(2))
    idx = torch.arange(8)
    full = GlobalInfoNCE(num_samples=8, temperature=0.2)
    want = full(z1, z2, idx)
    for k in (16, 40):
        loss = GlobalInfoNCE(num_samples=8, temperature=0.2, negatives=k, on_shortage="use_all")
        torch.testing.assert_close(loss(z1, z2, idx), want, rtol=1e-12, atol=0)
        torch.testing.assert_close(loss.state_dict(), full.state_dict(), rtol=1e-12, atol=0)


def test_cpu_autocast_takes_the_autograd_path():
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(8, 4, generator=g, requires_grad=True) for _ in range(2))
    want = GlobalInfoNCE(num_samples=8, temperature=0.2)(z1.double(), z2.double(), torch.arange(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = GlobalInfoNCE(num_samples=8, temperature=0.2)(z1, z2, torch.arange(8))
    loss.backward()
    assert torch.allclose(loss.double(), want, rtol=5e-2)
    assert torch.isfinite(z1.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rows_with_more_negatives_than_float16_can_count(dtype):
    # One query, 65536 hard negatives: the count and the sum of the negatives' terms
    # exceed float16's largest value (65504); they are accumulated in float32.
    g = torch.Generator().manual_seed(0)
    q, d, h = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g), torch.randn(1, 65536, 8, generator=g)
    want = GlobalInfoNCE(4, temperature=0.1, form="query_document").double()(q.double(), d.double(), torch.tensor([0]), h.double())
    loss_fn = GlobalInfoNCE(4, temperature=0.1, form="query_document")
    got = loss_fn(q.to(dtype), d.to(dtype), torch.tensor([0]), h.to(dtype))
    assert got.dtype == dtype and torch.isfinite(loss_fn.log_nu[0]).all()
    assert abs(float(got) - float(want)) < 0.02 * abs(float(want))
    plain = GlobalInfoNCE(4, temperature=0.1, form="query_document").minibatch_loss(q.to(dtype), d.to(dtype), None, h.to(dtype))
    assert abs(float(plain) - float(want)) < 0.02 * abs(float(want))


def test_the_value_to_report_is_kept_beside_the_surrogate_and_documented():
    # Well-aligned views: the surrogate (what a call returns) is negative, which a
    # user reads as a broken loss; the batch InfoNCE kept beside it is the value
    # to report, equal to negbatch.InfoNCE's on the same batch.
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(16, 8, generator=g, dtype=torch.float64)
    z2 = z1 + 0.1 * torch.randn(16, 8, generator=g, dtype=torch.float64)
    loss_fn = GlobalInfoNCE(40, temperature=0.1, gamma=0.5).double()
    first = loss_fn(z1, z2, torch.arange(16))
    assert float(first) < 0
    torch.testing.assert_close(loss_fn.last_minibatch_loss, first)  # nu = Zhat on a first visit
    torch.testing.assert_close(loss_fn.last_infonce, InfoNCE(temperature=0.1)(z1, z2), rtol=1e-12, atol=0)
    assert float(loss_fn.last_infonce) > 0
    labels = torch.arange(16) % 5  # several positives: SupCon's L_out, as InfoNCE(positives="mask") gives it
    supcon = GlobalInfoNCE(40, temperature=0.1, positives="mask").double()
    supcon(z1, z2, torch.arange(16), labels=labels)
    want = InfoNCE(temperature=0.1, positives="mask")(z1, z2, labels=labels)
    torch.testing.assert_close(supcon.last_infonce, want, rtol=1e-12, atol=0)
    second = loss_fn(z1.flip(0), z2.flip(0), torch.arange(16))  # other negatives' mix: nu != Zhat
    assert float(second) >= float(loss_fn.last_minibatch_loss) - 1e-12  # x/nu + log nu - 1 >= log x

    # ... and help(GlobalInfoNCE) says so before its Parameters.
    intro = GlobalInfoNCE.__doc__.split("Parameters\n")[0]
    for phrase in ("surrogate", "negative", "last_infonce", "last_minibatch_loss"):
        assert phrase in intro, phrase
    assert "last_infonce : Tensor" in GlobalInfoNCE.__doc__  # listed under Attributes


def test_the_state_stays_float32_when_the_module_is_cast_to_half_precision():
    loss = GlobalInfoNCE(6, temperature=0.05)
    loss(torch.randn(3, 4), torch.randn(3, 4), torch.arange(3))
    before = loss.log_nu.clone()
    for dtype in (torch.bfloat16, torch.float16):
        cast = copy.deepcopy(loss).to(dtype)
        assert cast.log_nu.dtype == torch.float32 and torch.equal(cast.log_nu, before)  # not rounded either
        assert cast.visited.dtype == torch.bool
    assert copy.deepcopy(loss).double().log_nu.dtype == torch.float64
    assert copy.deepcopy(loss).half().log_nu.dtype == torch.float32


@pytest.mark.parametrize("bad", ["no", 0, None])
def test_update_must_be_a_bool(bad):
    # update="no" is truthy: it ran the E-step it was meant to skip.
    z1, z2 = _data(seed=3)
    loss_fn = GlobalInfoNCE(6, temperature=TAU).double()
    with pytest.raises(TypeError, match="update must be True or False"):
        loss_fn(z1, z2, torch.arange(6), update=bad)
    assert int(loss_fn.num_updates) == 0 and not loss_fn.visited.any()
