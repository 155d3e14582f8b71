"""False-negative filtering (GISTEmbed-style) against a brute-force loop over
each anchor's candidates: the mask, the loss with it, the count reported."""

from __future__ import annotations

import pytest
import torch

import _reference as ref
from negbatch import DCL, InfoNCE, ReLIC, SigLIP
from negbatch.losses import false_negative_mask

TAU = 0.3


def _data(n=8, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]


def _two_view_filter(judge1, judge2, margin=None, top=None):
    """Per anchor of [view1; view2]: the bank columns the brute force masks."""
    z = ref._norm(torch.cat([judge1, judge2])).detach()
    n = judge1.shape[0]
    masked = []
    for a in range(2 * n):
        pair = (a + n) % (2 * n)
        candidates = [c for c in range(2 * n) if c not in (a, pair)]
        masked.append(ref.similarity_filter(z[a], z, pair, candidates, margin=margin, top=top))
    return masked


@pytest.mark.parametrize("margin,top", [(0.0, None), (0.2, None), (None, 0.25), (0.1, 0.2)])
def test_mask_of_the_model_itself_matches_brute_force(margin, top):
    z1, z2 = _data()
    loss_fn = InfoNCE(temperature=TAU, filter_margin=margin, filter_top=top)
    loss = loss_fn(z1, z2)
    masked = _two_view_filter(z1, z2, margin, top)
    assert int(loss_fn.last_filtered) == sum(len(m) for m in masked) > 0
    assert float(loss_fn.last_filtered_fraction) == pytest.approx(sum(len(m) for m in masked) / (16 * 14))
    zn = ref._norm(torch.cat([z1, z2]))
    terms = [ref.softmax_anchor(zn[a], [zn[(a + 8) % 16]],
                                [zn[c] for c in range(16) if c not in (a, (a + 8) % 16) and c not in masked[a]], TAU)
             for a in range(16)]
    want = torch.stack(terms).mean()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
    for g, w in zip(torch.autograd.grad(loss, [z1, z2]), torch.autograd.grad(want, [z1, z2])):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_a_guide_model_decides_what_is_masked():
    z1, z2 = _data()
    g1, g2 = _data(seed=5)
    loss_fn = InfoNCE(temperature=TAU, filter_margin=0.05)
    loss_fn(z1, z2, guide=(g1, g2))
    masked = _two_view_filter(g1, g2, margin=0.05)
    assert int(loss_fn.last_filtered) == sum(len(m) for m in masked)
    assert masked != _two_view_filter(z1, z2, margin=0.05)  # the guide's judgement, not the model's
    assert loss_fn.log_values()["filtered_fraction"] == pytest.approx(float(loss_fn.last_filtered_fraction))


def test_a_guide_without_the_loss_hard_negatives_is_refused_with_what_to_pass():
    q, d = _data()
    hard = torch.randn(8, 2, 4, dtype=torch.float64)
    loss_fn = InfoNCE(temperature=TAU, form="query_document", filter_margin=0.1)
    for guide in ((q, d), (q, d, torch.randn(8, 3, 4, dtype=torch.float64))):
        with pytest.raises(ValueError, match=r"\(a, b, hard_negatives\) with as many hard negatives") as caught:
            loss_fn(q, d, hard, guide=guide)
        assert "queue" not in str(caught.value)
    loss_fn(q, d, hard, guide=(q, d, hard))  # the same inputs: accepted


def test_function_by_hand_and_positives_are_never_filtered():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    hit = false_negative_mask(anchors, bank, torch.tensor([0, 1]), self_index=torch.tensor([1, 2]), margin=0.0)
    # anchor 0: positive 0.6; itself column 1 is skipped; column 3 (0.8) is masked.
    # anchor 1: positive column 1 (0.0); column 0 (0.8) and column 3 (0.6) masked; itself (2) skipped.
    assert hit.tolist() == [[False, False, False, True], [True, False, False, True]]
    further = torch.tensor([[False, False, False, True], [False, False, False, False]])
    kept = false_negative_mask(anchors, bank, torch.tensor([0, 1]), positives=further, margin=0.0)
    assert not kept[0, 3]
    with pytest.raises(ValueError, match="give filter_margin or filter_top"):
        false_negative_mask(anchors, bank, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="filter_top must be a fraction"):
        InfoNCE(temperature=TAU, filter_top=1.0)


def test_filter_applies_to_every_loss_and_the_queue_with_its_own_embeddings():
    z1, z2 = _data()
    for loss_fn in (ReLIC(temperature=TAU, filter_top=0.3), SigLIP(form="two_view", filter_top=0.3)):
        loss_fn(z1, z2)
        assert int(loss_fn.last_filtered) > 0
    queue = InfoNCE(temperature=TAU, queue_size=16, filter_margin=0.0)
    queue(z1, z2, indices=torch.arange(8))
    queue(*_data(seed=1), indices=torch.arange(8, 16))
    assert float(queue.last_filtered_fraction) > 0
    with pytest.raises(ValueError, match="guide= cannot be combined with a queue"):
        queue(z1, z2, indices=torch.arange(8), guide=(z1, z2))
    with pytest.raises(ValueError, match="guide= cannot be combined with a queue"):  # not only once it fills
        InfoNCE(temperature=TAU, queue_size=16, filter_margin=0.0)(z1, z2, indices=torch.arange(8), guide=(z1, z2))
    with pytest.raises(ValueError, match="set filter_margin or filter_top"):
        InfoNCE(temperature=TAU)(z1, z2, guide=(z1, z2))


@pytest.mark.parametrize("form,name", [("two_view", "guide view1"), ("query_document", "guide queries")])
def test_a_non_finite_guide_is_named_as_the_guide(form, name):
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    bad = (z1.new_full((4, 3), float("nan")), z2)
    with pytest.raises(ValueError, match=f"^{name} contains NaN or inf"):
        InfoNCE(temperature=0.1, form=form, filter_margin=0.1)(z1, z2, guide=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_filtered_share_is_in_the_embeddings_precision(dtype):
    z1, z2 = (torch.randn(8, 4, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (0, 1))
    loss_fn = InfoNCE(temperature=TAU, filter_top=0.3)
    loss_fn(z1, z2)
    share = loss_fn.last_filtered_fraction
    assert share.dtype == dtype
    exact = int(loss_fn.last_filtered) / (16 * 14)
    assert float(share) == (exact if dtype == torch.float64 else float(torch.tensor(exact, dtype=torch.float32)))


@pytest.mark.parametrize("margin", [2.0, 3.5, -2.0, -10.0])
def test_a_margin_outside_the_cosine_range_is_refused(margin):
    # Cosine similarities lie in [-1, 1]: a margin of 2 or more masked every
    # candidate (InfoNCE returned 0.0 and learnt nothing), -2 or less none.
    from negbatch import DCL, GlobalInfoNCE

    for make in (lambda: InfoNCE(filter_margin=margin), lambda: SigLIP(filter_margin=margin),
                 lambda: DCL(filter_margin=margin), lambda: ReLIC(filter_margin=margin),
                 lambda: GlobalInfoNCE(8, filter_margin=margin)):
        with pytest.raises(ValueError, match=r"filter_margin must lie in \(-2, 2\) when the loss \(normalize=True\)"):
            make()
    # Raw dot products have no such range; a guide's cosines do.
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    raw = InfoNCE(filter_margin=margin, normalize=False)
    assert torch.isfinite(raw(z1, z2))
    with pytest.raises(ValueError, match=r"filter_margin must lie in \(-2, 2\) when the guide judges"):
        raw(z1, z2, guide=(z1, z2))
    InfoNCE(filter_margin=1.99)(z1, z2)


def test_errors_from_a_filter_that_masked_too_much_name_the_filter():
    # A filter that leaves too few candidates was blamed on the batch: K
    # sampled negatives said "Lower negatives, enlarge the batch"; DCL said
    # "a batch of one sample ... drop_last=True" for a batch of 8.
    z1, z2 = _data()
    sampled = InfoNCE(temperature=TAU, negatives=12, filter_top=0.5)
    with pytest.raises(ValueError, match=r"negatives=12 .*filter_top=0.5\) masked \d+ candidates \(\d+% of this call's\)"):
        sampled(z1, z2)
    with pytest.raises(ValueError, match=r"no negatives.*filter_margin=1.5\) masked \d+ candidates") \
            as caught:
        DCL(temperature=TAU, filter_margin=1.5)(z1, z2)
    assert "drop_last" not in str(caught.value)
    with pytest.raises(ValueError, match="negatives=12") as caught:  # short without a filter: no word of one
        InfoNCE(temperature=TAU, negatives=12)(z1[:4], z2[:4], mask=torch.eye(4, dtype=torch.bool))
    assert "filter" not in str(caught.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin,top", [(0.0, None), (None, 0.1)])
def test_half_precision_embeddings_are_judged_in_float32(dtype, margin, top):
    """Similarities of bfloat16 embeddings were products rounded to bfloat16:
    a candidate tied with the positive (margin 0) or swapped places in the
    top fraction by rounding. The mask is the float64 brute force's on the
    same (rounded) embeddings, for the function and for a loss."""
    g = torch.Generator().manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1).to(dtype)
    bank = torch.nn.functional.normalize(torch.randn(128, 32, generator=g), dim=1).to(dtype)
    positive = torch.arange(64)
    got = false_negative_mask(anchors, bank, positive, margin=margin, top=top)
    a64, b64 = anchors.double(), bank.double()
    want = torch.zeros(64, 128, dtype=torch.bool)
    for i in range(64):
        candidates = [c for c in range(128) if c != i]
        for c in ref.similarity_filter(a64[i], b64, i, candidates, margin=margin, top=top):
            want[i, c] = True
    assert torch.equal(got, want)
    # In a loss: the layout's own (normalised, half-precision) embeddings judge.
    z1, z2 = bank[:64], bank[64:]
    loss_fn = InfoNCE(temperature=TAU, filter_margin=margin, filter_top=top)
    layout = loss_fn._layout(z1, z2, None, None)
    loss_fn._filter(layout, None)
    (direction,) = layout.directions
    zn = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).double()  # as the layout normalises, in dtype
    want = torch.zeros(128, 128, dtype=torch.bool)
    for a in range(128):
        candidates = [c for c in range(128) if c not in (a, (a + 64) % 128)]
        for c in ref.similarity_filter(zn[a], zn, (a + 64) % 128, candidates, margin=margin, top=top):
            want[a, c] = True
    assert torch.equal(direction.mask & ~torch.eye(128, dtype=torch.bool), want)
