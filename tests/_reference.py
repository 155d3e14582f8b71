"""Independent references for the losses: plain per-anchor Python loops.

Written for the tests from the formulas in DESIGN.md, sharing no code with
negbatch. Each returns a scalar tensor (mean over anchors) built with autograd
so that gradients can be compared too. ``neg_sets[a]`` optionally gives the
negatives of anchor ``a`` as candidate-bank columns; otherwise every valid
candidate is used.
"""

from __future__ import annotations


import torch


def _norm(x):
    return x / x.norm(dim=-1, keepdim=True)


def _term(anchor, positive, negatives, tau):
    pos = (anchor * positive).sum() / tau
    others = [pos] + [(anchor * n).sum() / tau for n in negatives]
    return -pos + torch.logsumexp(torch.stack(others), 0)


def two_view_candidates(a: int, n: int, mask=None) -> list[int]:
    """Columns of the [view1; view2] bank that anchor a may use as negatives."""
    i, pos = a % n, (a + n) % (2 * n)
    return [c for c in range(2 * n) if c not in (a, pos) and not (mask is not None and bool(mask[i, c % n]))]


def infonce_two_view(z1, z2, tau, neg_sets=None, mask=None):
    z1, z2 = _norm(z1), _norm(z2)
    n = z1.shape[0]
    bank = torch.cat([z1, z2])
    terms = []
    for a in range(2 * n):
        allowed = two_view_candidates(a, n, mask)
        negs = allowed if neg_sets is None else [int(c) for c in neg_sets[a]]
        assert set(negs) <= set(allowed), "sampled a forbidden candidate"
        terms.append(_term(bank[a], bank[(a + n) % (2 * n)], [bank[c] for c in negs], tau))
    return torch.stack(terms).mean()


def query_document_candidates(i: int, n_docs: int, mask=None) -> list[int]:
    return [c for c in range(n_docs) if c != i and not (mask is not None and bool(mask[i, c]))]


def infonce_query_document(q, d, tau, hard=None, neg_sets=None, mask=None, symmetric=False, neg_sets_rev=None):
    q, d = _norm(q), _norm(d)
    n = q.shape[0]
    bank = d if hard is None else torch.cat([d, _norm(hard).reshape(-1, d.shape[1])])
    terms = []
    for i in range(n):
        allowed = query_document_candidates(i, bank.shape[0], mask)
        negs = allowed if neg_sets is None else [int(c) for c in neg_sets[i]]
        assert set(negs) <= set(allowed)
        terms.append(_term(q[i], d[i], [bank[c] for c in negs], tau))
    if symmetric:
        for i in range(n):
            rev_mask = None if mask is None else mask[:, :n].t()
            allowed = query_document_candidates(i, n, rev_mask)
            negs = allowed if neg_sets_rev is None else [int(c) for c in neg_sets_rev[i]]
            assert set(negs) <= set(allowed)
            terms.append(_term(d[i], q[i], [q[c] for c in negs], tau))
    return torch.stack(terms).mean()


def relic(z1, z2, tau, alpha, neg_sets=None, mask=None, detach_target=False):
    """ReLIC eq. 3; neg_sets[direction][i] are view-w columns (0..n-1)."""
    z1, z2 = _norm(z1), _norm(z2)
    n = z1.shape[0]
    terms = []
    for direction, (zv, zw) in enumerate(((z1, z2), (z2, z1))):
        for i in range(n):
            allowed = [m for m in range(n) if m != i and not (mask is not None and bool(mask[i, m]))]
            negs = allowed if neg_sets is None else [int(c) for c in neg_sets[direction][i]]
            assert set(negs) <= set(allowed)
            cand = [i] + negs
            lv = torch.stack([(zv[i] * zw[m]).sum() / tau for m in cand])
            lw = torch.stack([(zw[i] * zw[m]).sum() / tau for m in cand])
            if detach_target:
                lw = lw.detach()
            log_p = lv - torch.logsumexp(lv, 0)
            log_q = lw - torch.logsumexp(lw, 0)
            kl = sum(log_p[k].exp() * (log_p[k] - log_q[k]) for k in range(len(cand)))
            terms.append(-log_p[0] + alpha * kl)
    return torch.stack(terms).mean()
