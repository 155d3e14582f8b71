"""Several positives per anchor (positives="mask", SupCon's L_out) and labels,
against the float64 per-anchor loops of tests/_reference.py and against
pytorch-metric-learning's SupConLoss (value and gradient)."""

from __future__ import annotations

import pytest
import torch

import _reference as ref
from _inputs import float64_views
from negbatch import DCL, GlobalInfoNCE, InfoNCE, ReLIC, SigLIP, same_id_mask
from negbatch.losses._layout import build_layout

TAU = 0.3
LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 3])


def _data(n=7, d=5, seed=0, hard=0):
    return float64_views(n, d, seed, hard)


def _match(loss, reference, inputs, rtol=1e-9):
    torch.testing.assert_close(loss, reference, rtol=rtol, atol=0)
    got = torch.autograd.grad(loss, inputs, retain_graph=True)
    want = torch.autograd.grad(reference, inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


def _sampled_sets(a, b, k, seed, *, form="two_view", labels=None, mask=None, hard=None):
    """The negatives a loss draws, read back from the same layout and generator."""
    layout = build_layout(a, b, hard, form=form, labels=labels, mask=mask, mask_as_positives=True)
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for direction in layout.directions:
        sel = direction.select(k, gen, "use_all")
        p = sel.num_positive_slots
        sets.append([r[v].tolist() for r, v in zip(sel.index[:, p:], sel.valid[:, p:])])
    return sets


@pytest.mark.parametrize("negatives", ["all", 3])
def test_two_view_labels_as_positives_is_supcon_l_out(negatives):
    z1, z2 = _data()
    same = same_id_mask(LABELS, LABELS)
    loss = InfoNCE(temperature=TAU, positives="mask", negatives=negatives, on_shortage="use_all")(
        z1, z2, labels=LABELS, generator=torch.Generator().manual_seed(4))
    sets = None if negatives == "all" else _sampled_sets(z1, z2, negatives, 4, labels=LABELS)[0]
    _match(loss, ref.softmax_two_view(z1, z2, TAU, positive_samples=same, neg_sets=sets), [z1, z2])


def test_a_mask_as_positives_equals_the_same_labels():
    z1, z2 = _data()
    by_mask = InfoNCE(temperature=TAU, positives="mask")(z1, z2, mask=same_id_mask(LABELS, LABELS))
    by_labels = InfoNCE(temperature=TAU, positives="mask")(z1, z2, labels=LABELS)
    torch.testing.assert_close(by_mask, by_labels, rtol=1e-14, atol=0)


def test_labels_as_false_negatives_leave_the_softmax():
    z1, z2 = _data()
    loss = InfoNCE(temperature=TAU)(z1, z2, labels=LABELS)
    _match(loss, ref.softmax_two_view(z1, z2, TAU, excluded_samples=same_id_mask(LABELS, LABELS)), [z1, z2])
    # The two treatments differ: same-label views in the numerator vs out of the denominator.
    assert not torch.allclose(loss, InfoNCE(temperature=TAU, positives="mask")(z1, z2, labels=LABELS))


@pytest.mark.parametrize("symmetric,hard,negatives", [(False, 0, "all"), (True, 2, "all"), (False, 2, 4)])
def test_query_document_positives(symmetric, hard, negatives):
    xs = _data(hard=hard)
    q, d = xs[0], xs[1]
    h = xs[2] if hard else None
    loss = InfoNCE(temperature=TAU, form="query_document", symmetric=symmetric, positives="mask", negatives=negatives,
                   on_shortage="use_all")(q, d, h, labels=LABELS, generator=torch.Generator().manual_seed(2))
    columns = 7 * (1 + hard)
    positive_mask = torch.zeros(7, columns, dtype=torch.bool)
    positive_mask[:, :7] = same_id_mask(LABELS, LABELS)
    sets = None
    if negatives != "all":
        sets = _sampled_sets(q, d, negatives, 2, form="query_document", labels=LABELS, hard=h)[0]
    want = ref.softmax_query_document(q, d, TAU, hard=h, positive_mask=positive_mask, symmetric=symmetric,
                                      neg_sets=sets)
    _match(loss, want, xs)


def test_relic_with_positives():
    z1, z2 = _data()
    loss = ReLIC(temperature=TAU, alpha=0.0, positives="mask")(z1, z2, labels=LABELS)
    # alpha = 0: the L_out term of each view against the other view's bank only.
    terms = []
    zn1, zn2 = ref._norm(z1), ref._norm(z2)
    for zv, zw in ((zn1, zn2), (zn2, zn1)):
        for i in range(7):
            pos = [zw[j] for j in range(7) if j == i or LABELS[j] == LABELS[i]]
            neg = [zw[j] for j in range(7) if LABELS[j] != LABELS[i]]
            terms.append(ref.softmax_anchor(zv[i], pos, neg, TAU))
    _match(loss, torch.stack(terms).mean(), [z1, z2])


def test_global_infonce_with_positives_first_visit_is_the_mean_positive_against_the_mean_negative():
    z1, z2 = _data()
    loss_fn = GlobalInfoNCE(7, temperature=TAU, positives="mask").double()
    loss = loss_fn(z1, z2, torch.arange(7), labels=LABELS)
    # First visit: nu = Zhat, the surrogate equals -mean_P l + log mean_N exp(l).
    zn = ref._norm(torch.cat([z1, z2]))
    terms = []
    for a, (pos, neg) in enumerate(ref.two_view_sets(7, positive_samples=same_id_mask(LABELS, LABELS))):
        lp = torch.stack([(zn[a] * zn[c]).sum() / TAU for c in pos])
        ln = torch.stack([(zn[a] * zn[c]).sum() / TAU for c in neg])
        terms.append(-lp.mean() + torch.logsumexp(ln, 0) - torch.log(torch.tensor(float(len(neg)), dtype=torch.float64)))
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(loss_fn.minibatch_loss(z1, z2, labels=LABELS), loss, rtol=1e-10, atol=0)


def test_bad_labels_name_the_argument():
    z1, z2 = _data()
    with pytest.raises(ValueError, match=r"labels must have shape \(7,\)"):
        InfoNCE(temperature=TAU)(z1, z2, labels=LABELS[:3])
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        InfoNCE(temperature=TAU)(z1, z2, labels=LABELS.float())
    with pytest.raises(ValueError, match="positives must be 'pair' or 'mask'"):
        InfoNCE(temperature=TAU, positives="labels")


def test_supcon_against_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    z1, z2 = _data(n=9, d=6, seed=3)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 2])
    ours = InfoNCE(temperature=0.2, positives="mask")(z1, z2, labels=labels)
    theirs = pml.SupConLoss(temperature=0.2)(torch.cat([z1, z2]), torch.cat([labels, labels]))
    _match(ours, theirs, [z1, z2], rtol=1e-10)


@pytest.mark.parametrize("make", [
    lambda: InfoNCE(temperature=TAU, positives="mask"),
    lambda: ReLIC(temperature=TAU, positives="mask"),
    lambda: SigLIP(positives="mask").double(),
    lambda: DCL(temperature=TAU, positives="mask"),
    lambda: GlobalInfoNCE(7, temperature=TAU, positives="mask").double(),
])
def test_mask_positives_without_labels_or_mask_is_refused(make):
    # Without them every candidate is a negative: the loss would be plain InfoNCE, silently.
    z1, z2 = _data()
    kw = {"indices": torch.arange(7)} if isinstance(make(), GlobalInfoNCE) else {}
    with pytest.raises(ValueError, match="labels= or mask="):
        make()(z1, z2, **kw)
    make()(z1, z2, labels=LABELS, **kw)  # either one is enough
    make()(z1, z2, mask=same_id_mask(LABELS, LABELS), **kw)
