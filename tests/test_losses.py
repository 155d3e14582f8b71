"""InfoNCE and ReLIC against the per-anchor float64 loops of tests/_reference.py."""

from __future__ import annotations

import pytest
import torch

import _reference as ref
from _inputs import float64_views
from _profile import matrix_products
import negbatch.losses._layout as layout_module
import negbatch.negatives as negatives_module
from negbatch import InfoNCE, ReLIC, info_nce_per_anchor, same_id_mask, select_negatives

TAU = 0.3


def _data(n=7, d=5, seed=0, hard=0):
    return float64_views(n, d, seed, hard)


def _label_mask(n, seed=1):
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))
    return same_id_mask(labels, labels)


def _two_view_sets(n, k, seed, mask=None, on_shortage="use_all"):
    """The sets InfoNCE(two_view) draws: rows [view1; view2], bank [view1; view2]."""
    local = torch.arange(n)
    rows = torch.cat([local, local + n])
    sel = select_negatives(
        torch.cat([local + n, local]), 2 * n, k, self_index=rows,
        mask=None if mask is None else mask.repeat(2, 2),
        generator=torch.Generator().manual_seed(seed), row_index=rows, n_rows_global=2 * n,
        on_shortage=on_shortage,
    )
    return [r[v].tolist() for r, v in zip(sel.index[:, 1:], sel.valid[:, 1:])]


def _assert_match(loss, reference, inputs):
    assert torch.allclose(loss, reference, rtol=1e-6, atol=0), (loss.item(), reference.item())
    got = torch.autograd.grad(loss, inputs, retain_graph=True)
    want = torch.autograd.grad(reference, inputs)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("use_mask", [False, True])
def test_two_view_all(use_mask, dense_path):
    z1, z2 = _data()
    mask = _label_mask(7) if use_mask else None
    loss = InfoNCE(temperature=TAU)(z1, z2, mask=mask)
    _assert_match(loss, ref.infonce_two_view(z1, z2, TAU, mask=mask), [z1, z2])


@pytest.mark.parametrize("k,use_mask", [(1, False), (3, False), (9, False), (2, True)])
def test_two_view_sampled(k, use_mask, dense_path):
    z1, z2 = _data()
    mask = _label_mask(7) if use_mask else None
    loss = InfoNCE(temperature=TAU, negatives=k)(z1, z2, mask=mask, generator=torch.Generator().manual_seed(5))
    sets = _two_view_sets(7, k, 5, mask)
    assert all(len(s) == k for s in sets)
    _assert_match(loss, ref.infonce_two_view(z1, z2, TAU, neg_sets=sets, mask=mask), [z1, z2])


@pytest.mark.parametrize("path", ["short", "layout"])
def test_sampled_two_views_run_one_backward_product(monkeypatch, path):
    """The anchors are the bank: the sampled gradient and its transpose are
    scattered into one matrix, so the backward runs one product where the
    two uses of each row took two (3 products a call before, 2 now)."""
    if path == "layout":
        monkeypatch.setattr(layout_module, "SMALL_DENSE_LOGITS", 0)
    z1, z2 = _data(n=16)
    loss = InfoNCE(temperature=TAU, negatives=3)
    assert matrix_products(lambda: loss(z1, z2, generator=torch.Generator().manual_seed(1)).backward()) == 2


def test_sampled_two_views_past_the_caches_run_both_backward_products(monkeypatch):
    """Past ``TRANSPOSED_SCATTER_CELLS`` the scattered transpose would miss
    the caches: the two products again, with the same gradients."""
    monkeypatch.setattr(layout_module, "SMALL_DENSE_LOGITS", 0)
    z1, z2 = _data(n=16)
    loss = InfoNCE(temperature=TAU, negatives=3)

    def grads():
        value = loss(z1, z2, generator=torch.Generator().manual_seed(1))
        return torch.autograd.grad(value, [z1, z2])

    one_product = grads()
    monkeypatch.setattr(negatives_module, "TRANSPOSED_SCATTER_CELLS", 0)
    assert matrix_products(lambda: grads()) == 3
    for got, want in zip(grads(), one_product):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("form, n", [("two_view", 6), ("two_view", 100), ("query_document", 16),
                                     ("query_document", 300)])
def test_k_equal_to_candidates_is_the_standard_loss_bit_for_bit_without_a_draw(form, n):
    # Both sides of SMALL_DENSE_LOGITS (the short path of small plain calls and the layout's):
    # K = |C| took the layout below it while "all" took the short path, 5e-7 apart in float32.
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, 8, generator=g, requires_grad=True)
    z2 = torch.randn(n, 8, generator=g, requires_grad=True)
    k = 2 * n - 2 if form == "two_view" else n - 1
    full = InfoNCE(temperature=TAU, form=form)(z1, z2)
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state()
    by_count = InfoNCE(temperature=TAU, form=form, negatives=k)(z1, z2, generator=gen)
    assert torch.equal(full, by_count) and torch.equal(gen.get_state(), before)


def test_sampled_all_candidates_with_mask_equals_standard():
    z1, z2 = _data(n=6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # pairs share a label: 12 - 2 - 2 = 8 candidates each
    mask = same_id_mask(labels, labels)
    full = InfoNCE(temperature=TAU)(z1, z2, mask=mask)
    sampled = InfoNCE(temperature=TAU, negatives=8)(z1, z2, mask=mask, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(full, sampled, rtol=1e-12)


def test_shortage_raises_by_default_and_use_all_takes_every_candidate():
    z1, z2 = _data(n=5)
    labels = torch.tensor([0, 0, 0, 1, 2])
    mask = same_id_mask(labels, labels)
    with pytest.raises(ValueError, match="on_shortage='use_all'"):
        InfoNCE(temperature=TAU, negatives=6)(z1, z2, mask=mask)
    loss = InfoNCE(temperature=TAU, negatives=6, on_shortage="use_all")(z1, z2, mask=mask, generator=torch.Generator().manual_seed(1))
    sets = _two_view_sets(5, 6, 1, mask)
    # samples 0-2 have 4 candidates (< 6): all of them; samples 3-4 have 8: 6 sampled.
    assert [len(s) for s in sets] == [4, 4, 4, 6, 6] * 2
    _assert_match(loss, ref.infonce_two_view(z1, z2, TAU, neg_sets=sets, mask=mask), [z1, z2])


@pytest.mark.parametrize("k", [10, 11, 12, 40])
@pytest.mark.parametrize("use_mask", [False, True])
def test_use_all_with_k_at_least_the_bank_size_takes_every_candidate(k, use_mask):
    # A short tail batch: B = 6 gives a 12-column bank; K >= 12 cannot fit a sampled row.
    z1, z2 = _data(n=6)
    mask = _label_mask(6) if use_mask else None
    gen = torch.Generator().manual_seed(0)
    loss = InfoNCE(temperature=TAU, negatives=k, on_shortage="use_all")(z1, z2, mask=mask, generator=gen)
    _assert_match(loss, ref.infonce_two_view(z1, z2, TAU, mask=mask), [z1, z2])
    relic = ReLIC(temperature=TAU, alpha=1.0, negatives=k, on_shortage="use_all")(z1, z2, mask=mask)
    torch.testing.assert_close(relic, ReLIC(temperature=TAU, alpha=1.0)(z1, z2, mask=mask), rtol=1e-12, atol=0)


def test_fused_dense_path_steps_aside_under_cpu_autocast():
    # float32 embeddings inside a CPU autocast region: the matmul runs in bfloat16,
    # which the fused float32 kernel cannot take; the autograd path must run instead.
    z1, z2 = (t.detach().float().requires_grad_() for t in _data(n=6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = InfoNCE(temperature=TAU)(z1, z2)
    loss.backward()
    want = ref.infonce_two_view(z1.double(), z2.double(), TAU)
    assert torch.allclose(loss.double(), want, rtol=5e-2)
    assert z1.grad is not None and torch.isfinite(z1.grad).all()


@pytest.mark.parametrize("hard,symmetric,use_mask", [(0, False, False), (2, False, True), (2, True, False), (0, True, True)])
def test_query_document_all(hard, symmetric, use_mask, dense_path):
    xs = _data(hard=hard)
    q, d = xs[0], xs[1]
    h = xs[2] if hard else None
    n_cols = 7 * (1 + hard)
    mask = None
    if use_mask:
        mask = torch.rand(7, n_cols, generator=torch.Generator().manual_seed(3)) < 0.2
    loss = InfoNCE(temperature=TAU, form="query_document", symmetric=symmetric)(q, d, h, mask=mask)
    want = ref.infonce_query_document(q, d, TAU, hard=h, mask=mask, symmetric=symmetric)
    _assert_match(loss, want, xs)


@pytest.mark.parametrize("symmetric", [False, True])
def test_query_document_sampled(symmetric):
    q, d, h = _data(hard=3)
    k, seed = 4, 11
    loss = InfoNCE(temperature=TAU, negatives=k, form="query_document", symmetric=symmetric)(
        q, d, h, generator=torch.Generator().manual_seed(seed)
    )
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(7)
    fwd = select_negatives(rows, 28, k, generator=gen, row_index=rows, n_rows_global=7)
    sets = fwd.index[:, 1:].tolist()
    rev_sets = None
    if symmetric:
        rev = select_negatives(rows, 7, k, generator=gen, row_index=rows, n_rows_global=7)
        rev_sets = rev.index[:, 1:].tolist()
    want = ref.infonce_query_document(q, d, TAU, hard=h, neg_sets=sets, symmetric=symmetric, neg_sets_rev=rev_sets)
    _assert_match(loss, want, [q, d, h])


@pytest.mark.parametrize("k,use_mask,detach", [("all", False, False), ("all", True, True), (3, False, False), (2, True, False)])
def test_relic(k, use_mask, detach):
    z1, z2 = _data()
    mask = _label_mask(7) if use_mask else None
    seed = 4
    loss = ReLIC(temperature=TAU, alpha=0.7, negatives=k, detach_target=detach)(
        z1, z2, mask=mask, generator=torch.Generator().manual_seed(seed)
    )
    sets = None
    if k != "all":
        gen = torch.Generator().manual_seed(seed)
        rows = torch.arange(7)
        sets = []
        for direction in range(2):
            sel = select_negatives(rows, 7, k, mask=mask, generator=gen, row_index=rows + 7 * direction, n_rows_global=14)
            sets.append(sel.index[:, 1:].tolist())
    want = ref.relic(z1, z2, TAU, 0.7, neg_sets=sets, mask=mask, detach_target=detach)
    _assert_match(loss, want, [z1, z2])


def test_reductions():
    z1, z2 = _data()
    per = InfoNCE(temperature=TAU, reduction="none")(z1, z2)
    assert per.shape == (14,)
    assert torch.allclose(per.mean(), InfoNCE(temperature=TAU)(z1, z2))
    assert torch.allclose(per.sum(), InfoNCE(temperature=TAU, reduction="sum")(z1, z2))
    assert ReLIC(temperature=TAU, reduction="none")(z1, z2).shape == (14,)


def test_float32_matches_float64():
    z1, z2 = _data(n=16, d=8)
    for loss in (InfoNCE(temperature=0.1, negatives=5), ReLIC(temperature=0.1, negatives=5)):
        a = loss(z1, z2, generator=torch.Generator().manual_seed(0))
        b = loss(z1.float(), z2.float(), generator=torch.Generator().manual_seed(0))
        assert abs(a.item() - b.item()) < 1e-5


def test_seeded_generator_reproduces_loss_and_different_seeds_differ():
    z1, z2 = _data(n=32, d=8)
    loss = InfoNCE(temperature=TAU, negatives=3)
    a = loss(z1, z2, generator=torch.Generator().manual_seed(7))
    b = loss(z1, z2, generator=torch.Generator().manual_seed(7))
    c = loss(z1, z2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampled_loss_is_unbiased_for_the_mean_over_subsets_of_exp_terms():
    """E over uniform K-subsets of the sampled denominator's negative part is
    K/|C| times the full one: checks the draws are uniform through the loss."""
    z1, z2 = _data(n=5, d=4)
    z = torch.cat([z1, z2]).detach()
    z = z / z.norm(dim=1, keepdim=True)
    n, k = 5, 3
    acc = torch.zeros(2 * n, dtype=torch.float64)
    draws = 4000
    sets = _two_view_sets_many(n, k, draws)
    for a in range(2 * n):
        cols = torch.tensor(sets[a])
        acc[a] = torch.exp(z[cols] @ z[a] / TAU).sum(dim=1).mean()
    full = torch.tensor([
        torch.exp(z[ref.two_view_candidates(a, n)] @ z[a] / TAU).sum() for a in range(2 * n)
    ], dtype=torch.float64)
    rel = (acc / (full * k / (2 * n - 2)) - 1).abs().max()
    assert rel < 0.03


def _two_view_sets_many(n, k, draws):
    local = torch.arange(n)
    rows = torch.cat([local, local + n])
    pos = torch.cat([local + n, local]).repeat(draws)
    self_idx = rows.repeat(draws)
    sel = select_negatives(pos, 2 * n, k, self_index=self_idx, generator=torch.Generator().manual_seed(0))
    idx = sel.index[:, 1:].view(draws, 2 * n, k)
    return [idx[:, a, :].tolist() for a in range(2 * n)]


def test_dense_backward_twice_raises_clearly(fused_only):
    z1, z2 = _data()
    loss = InfoNCE(temperature=TAU)(z1, z2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_dense_paths_match_autograd_of_the_plain_formula_float32(dense_path):
    z1, z2 = (t.float().detach().requires_grad_() for t in _data(n=33, d=9))
    got = InfoNCE(temperature=0.07)(z1, z2)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.t() / 0.07).masked_fill(torch.eye(66, dtype=torch.bool), float("-inf"))
    want = torch.nn.functional.cross_entropy(sim, torch.arange(66).roll(33))
    _assert_match_f32(got, want, [z1, z2])


def _assert_match_f32(loss, reference, inputs):
    assert torch.allclose(loss, reference, rtol=1e-5)
    for g, w in zip(torch.autograd.grad(loss, inputs, retain_graph=True), torch.autograd.grad(reference, inputs)):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


def test_empty_batches_are_refused():
    from negbatch import GlobalInfoNCE

    empty = torch.zeros(0, 4)
    for loss_fn, args in [(InfoNCE(temperature=TAU), ()), (InfoNCE(temperature=TAU, form="query_document"), ()), (ReLIC(temperature=TAU), ()),
                          (GlobalInfoNCE(5, temperature=TAU), (torch.zeros(0, dtype=torch.long),))]:
        with pytest.raises(ValueError, match="empty batch"):
            loss_fn(empty, empty, *args)


@pytest.mark.parametrize("form,symmetric", [("two_view", False), ("query_document", False), ("query_document", True)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("negatives,learnable", [("all", False), ("all", True), (3, False), (7, True)])
def test_small_plain_calls_equal_the_layout_path(monkeypatch, form, symmetric, reduction, negatives, learnable):
    # A small batch with nothing but in-batch candidates takes InfoNCE's short
    # path (all or K sampled negatives, a fixed or learnable temperature);
    # forcing the layout (no size counts as small) must give the same loss,
    # the same draws from the same generator, and the same gradients.
    z1, z2 = _data(n=9)
    loss = InfoNCE(temperature=TAU, form=form, symmetric=symmetric, reduction=reduction, negatives=negatives,
                   learnable_temperature=learnable)
    leaves = [z1, z2, *loss.parameters()]

    def run():
        value = loss(z1, z2, generator=torch.Generator().manual_seed(2))
        return value, torch.autograd.grad(value.sum(), leaves)

    def no_layout(*args, **kwargs):
        raise AssertionError("a small plain call took the layout")

    with monkeypatch.context() as patch:
        patch.setattr(layout_module, "build_layout", no_layout)
        short, short_grads = run()
    monkeypatch.setattr(layout_module, "SMALL_DENSE_LOGITS", 0)
    full, full_grads = run()
    torch.testing.assert_close(short, full, rtol=1e-12, atol=1e-14)
    for g, w in zip(short_grads, full_grads):  # the log-scale is float32: its own rounding
        torch.testing.assert_close(g, w, rtol=1e-10 if g.dtype == torch.float64 else 1e-5, atol=1e-13)


@pytest.mark.parametrize("where", ["first", "second"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_small_plain_calls_refuse_and_name_a_non_finite_input(where, bad):
    for form, names in (("two_view", ("view1", "view2")), ("query_document", ("queries", "documents"))):
        z1, z2 = (t.detach().clone() for t in _data(n=5))
        (z1 if where == "first" else z2)[2, 1] = bad
        name = names[0] if where == "first" else names[1]
        for reduction in ("mean", "none"):
            with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
                InfoNCE(temperature=TAU, form=form, reduction=reduction)(z1, z2)
        InfoNCE(temperature=TAU, form=form, check_finite=False)(z1, z2)  # the user's choice: no look


def test_second_order_gradients_are_right_on_autograd_paths_and_refused_by_fused_kernels():
    from negbatch import DCL, GlobalInfoNCE, SigLIP

    def penalty_gradient(loss_of, z1, z2):
        g, = torch.autograd.grad(loss_of(z1, z2), z1, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), z1)[0]

    def nt_xent(z1, z2, tau=0.1):  # written out: two-view InfoNCE on cosine similarities
        z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
        logits = (z @ z.T / tau).fill_diagonal_(float("-inf"))
        n = z1.shape[0]
        return torch.nn.functional.cross_entropy(logits, torch.arange(2 * n).roll(n))

    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    small = InfoNCE(temperature=0.1)  # 16 x 16 logits: autograd's cross-entropy
    torch.testing.assert_close(penalty_gradient(small, z1, z2), penalty_gradient(nt_xent, z1, z2), rtol=1e-10, atol=1e-14)

    z1, z2 = (torch.randn(200, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fused = {
        "_DenseSoftmax": lambda a, b: InfoNCE(temperature=0.1)(a, b),
        "_DenseSoftmax ": lambda a, b: DCL(temperature=0.1)(a, b),
        "_DenseSigmoid": lambda a, b: SigLIP()(a, b, mask=torch.zeros(200, 200, dtype=torch.bool)),
        "_SampledDot": lambda a, b: InfoNCE(temperature=0.1, negatives=4)(a, b, generator=torch.Generator().manual_seed(1)),
        "_DenseTerms": lambda a, b: GlobalInfoNCE(num_samples=200, temperature=0.1)(a, b, torch.arange(200)),
    }
    for name, loss_of in fused.items():
        with pytest.raises(RuntimeError, match=f"{name.strip()} gives first-order gradients only"):
            penalty_gradient(loss_of, z1, z2)
        loss_of(z1, z2).backward()  # the first order is untouched


@pytest.mark.parametrize("form", ["two_view", "query_document"])
def test_sampled_negatives_of_float32_embeddings_under_autocast(form):
    # Embeddings cast back to float32 inside a bf16 autocast region (enc(x).float()): the dense
    # read-off product is bf16 there, and the backward (outside the region) must not mix it in.
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(32, 8, generator=g, requires_grad=True) for _ in range(2))
    loss = InfoNCE(temperature=0.1, negatives=8, form=form)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(z1, z2, generator=torch.Generator().manual_seed(1))
    value.backward()
    assert z1.grad.dtype == torch.float32 and torch.isfinite(z1.grad).all()
    got = z1.grad.clone()
    z1.grad = z2.grad = None
    loss(z1, z2, generator=torch.Generator().manual_seed(1)).backward()  # the same draw, in float32
    torch.testing.assert_close(got, z1.grad, rtol=0.05, atol=2e-3)  # bf16 logits


def test_under_autocast_every_loss_computes_and_returns_float32():
    # The products run in bf16; the per-anchor arithmetic (SigLIP's bias, DCL's and the global
    # loss's sums) ran in bf16 too and was off by 3e-4 to 1.6e-3 at B = 256.
    from negbatch import DCL, GlobalInfoNCE, SigLIP

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(256, 32, generator=g), torch.randn(256, 32, generator=g)
    r1, r2 = z1.bfloat16().double(), z2.bfloat16().double()  # what the bf16 products see
    for make, extra in [(lambda: InfoNCE(temperature=0.1), ()), (lambda: DCL(temperature=0.1), ()),
                        (lambda: SigLIP(), ()), (lambda: GlobalInfoNCE(256, temperature=0.1), (torch.arange(256),))]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = make()(z1, z2, *extra)
        want = make().double()(r1, r2, *extra)
        assert value.dtype == torch.float32
        assert float(value.detach()) == pytest.approx(float(want.detach()), rel=1e-4)


@pytest.mark.parametrize("several_positives", [False, True])
def test_per_anchor_function_takes_zero_anchors(several_positives):
    # A rank's share of a split batch can be empty: no values, no gradient, no error.
    anchors = torch.zeros(0, 4, requires_grad=True)
    options = {"positives": torch.zeros(0, 5, dtype=torch.bool)} if several_positives else {}
    values = info_nce_per_anchor(anchors, torch.randn(5, 4), torch.zeros(0, dtype=torch.long), temperature=0.1,
                                 **options)
    values.sum().backward()
    assert values.shape == (0,) and anchors.grad.shape == (0, 4)
