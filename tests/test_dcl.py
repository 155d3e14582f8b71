"""DCL and DCL-W (Yeh et al. 2022) against float64 per-anchor loops written
from the paper's formula: the positive out of the denominator."""

from __future__ import annotations

import pytest
import torch

import _reference as ref
from _inputs import float64_views
from negbatch import DCL, same_id_mask
from negbatch.losses._layout import build_layout

TAU = 0.3


def _data(n=7, d=5, seed=0, hard=0):
    return float64_views(n, d, seed, hard)


def _match(loss, reference, inputs):
    torch.testing.assert_close(loss, reference, rtol=1e-9, atol=0)
    for g, w in zip(torch.autograd.grad(loss, inputs, retain_graph=True), torch.autograd.grad(reference, inputs)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


def _sets(a, b, k, seed, **layout):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for direction in build_layout(a, b, **layout).directions:
        sel = direction.select(k, gen, "raise")
        p = sel.num_positive_slots
        out.append([r[v].tolist() for r, v in zip(sel.index[:, p:], sel.valid[:, p:])])
    return out


@pytest.mark.parametrize("negatives,use_mask", [("all", False), ("all", True), (4, False), (3, True)])
def test_two_view(negatives, use_mask):
    z1, z2 = _data()
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    mask = same_id_mask(labels, labels) if use_mask else None
    loss = DCL(temperature=TAU, negatives=negatives)(z1, z2, mask=mask, generator=torch.Generator().manual_seed(1))
    sets = None if negatives == "all" else _sets(z1, z2, negatives, 1, form="two_view", mask=mask)[0]
    want = ref.softmax_two_view(z1, z2, TAU, excluded_samples=mask, neg_sets=sets, decoupled=True)
    _match(loss, want, [z1, z2])


@pytest.mark.parametrize("symmetric,hard", [(False, 0), (True, 2)])
def test_query_document(symmetric, hard):
    xs = _data(hard=hard)
    h = xs[2] if hard else None
    loss = DCL(temperature=TAU, form="query_document", symmetric=symmetric)(xs[0], xs[1], h)
    _match(loss, ref.softmax_query_document(xs[0], xs[1], TAU, hard=h, symmetric=symmetric, decoupled=True), xs)


@pytest.mark.parametrize("negatives", ["all", 5])
def test_dcl_w_weights_the_positive_by_the_von_mises_fisher_weight(negatives):
    z1, z2 = _data()
    loss = DCL(temperature=TAU, sigma=0.5, negatives=negatives)(z1, z2, generator=torch.Generator().manual_seed(2))
    w = ref.dcl_w_weights(z1, z2, 0.5)
    sets = None if negatives == "all" else _sets(z1, z2, negatives, 2, form="two_view")[0]
    want = ref.softmax_two_view(z1, z2, TAU, decoupled=True, weights=w + w, neg_sets=sets)
    _match(loss, want, [z1, z2])
    assert abs(sum(w) / len(w) - 1.0) < 1e-12  # the weights average to one


def test_positives_leave_the_denominator_all_of_them():
    z1, z2 = _data()
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    loss = DCL(temperature=TAU, positives="mask")(z1, z2, labels=labels)
    want = ref.softmax_two_view(z1, z2, TAU, positive_samples=same_id_mask(labels, labels), decoupled=True)
    _match(loss, want, [z1, z2])


def test_fused_path_equals_the_autograd_path_in_float32():
    z1, z2 = (t.detach().float().requires_grad_() for t in _data(n=33, d=9))
    loss = DCL(temperature=0.1)(z1, z2)
    want = ref.softmax_two_view(z1.double(), z2.double(), 0.1, decoupled=True)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autograd path
        low = DCL(temperature=0.1)(z1, z2)
    torch.testing.assert_close(low.double(), want, rtol=5e-2, atol=0)


def test_an_anchor_without_negatives_is_refused():
    z1, z2 = _data(n=3)
    everything = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="no negatives"):
        DCL(temperature=TAU)(z1, z2, mask=everything)
    with pytest.raises(ValueError, match=r"no negatives.*N mod the batch size is 1.*dataloader_drop_last=True"):
        DCL(temperature=TAU, form="query_document")(z1[:1], z2[:1])  # an epoch's last batch of one
    with pytest.raises(ValueError, match="sigma must be a float > 0"):
        DCL(temperature=TAU, sigma=0.0)
    with pytest.raises(ValueError, match="does not apply to positives='mask'"):
        DCL(temperature=TAU, sigma=0.5, positives="mask")
