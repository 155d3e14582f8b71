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


# ----------------------------------------------------------------------------
# The losses of issue 15, from their papers' formulas: every anchor's positives
# P and negatives N written out as lists of candidate rows.


def _log_softmax_terms(anchor, cands, tau):
    return torch.stack([(anchor * c).sum() / tau for c in cands])


def softmax_anchor(anchor, positives, negatives, tau, *, decoupled=False, weight=1.0):
    """InfoNCE / SupCon's L_out (decoupled=False): -1/|P| sum_p log(exp(l_p) / sum_{P+N} exp(l));
    DCL: -weight * mean_p l_p + log sum_N exp(l)."""
    pos = _log_softmax_terms(anchor, positives, tau)
    neg = _log_softmax_terms(anchor, negatives, tau) if negatives else pos.new_zeros(0)
    if decoupled:
        return -weight * pos.mean() + torch.logsumexp(neg, 0)
    return -(pos - torch.logsumexp(torch.cat([pos, neg]), 0)).mean()


def two_view_sets(n, positive_samples=None, excluded_samples=None):
    """For each anchor a of [view1; view2] (2n rows): its positive columns and
    its candidate negative columns of the [view1; view2] bank.
    ``positive_samples[i][j]`` / ``excluded_samples[i][j]`` (bool, sample level)
    make every view of sample j a positive / not a candidate for sample i."""
    out = []
    for a in range(2 * n):
        i, pair = a % n, (a + n) % (2 * n)
        pos, neg = [pair], []
        for c in range(2 * n):
            j = c % n
            if c in (a, pair):
                continue
            if positive_samples is not None and bool(positive_samples[i][j]):
                pos.append(c)
            elif excluded_samples is not None and bool(excluded_samples[i][j]):
                continue
            else:
                neg.append(c)
        out.append((pos, neg))
    return out


def softmax_two_view(z1, z2, tau, *, positive_samples=None, excluded_samples=None, neg_sets=None,
                     decoupled=False, weights=None, extra=None):
    """Mean over the 2n anchors. ``neg_sets[a]`` restricts anchor a's negatives;
    ``extra``: a list of (embedding, is_positive_fn(a) -> bool, excluded_fn(a) -> bool)
    columns appended to the bank (a queue's entries)."""
    z1, z2 = _norm(z1), _norm(z2)
    n = z1.shape[0]
    bank = torch.cat([z1, z2])
    terms = []
    for a, (pos, neg) in enumerate(two_view_sets(n, positive_samples, excluded_samples)):
        negatives = [bank[c] for c in neg]
        positives = [bank[c] for c in pos]
        for e, (row, is_pos, is_excl) in enumerate(extra or []):
            if is_excl(a):
                continue
            (positives if is_pos(a) else negatives).append(row)
        if neg_sets is not None:
            allowed = set(neg) | {2 * n + e for e, (_, is_pos, is_excl) in enumerate(extra or [])
                                  if not is_excl(a) and not is_pos(a)}
            assert set(neg_sets[a]) <= allowed, "sampled a column that is not a negative"
            negatives = [bank[c] if c < 2 * n else extra[c - 2 * n][0] for c in neg_sets[a]]
        w = 1.0 if weights is None else weights[a]
        terms.append(softmax_anchor(bank[a], positives, negatives, tau, decoupled=decoupled, weight=w))
    return torch.stack(terms).mean()


def softmax_query_document(q, d, tau, *, hard=None, positive_mask=None, excluded_mask=None, symmetric=False,
                           decoupled=False, neg_sets=None):
    """Queries against [documents; hard negatives] (and, symmetric, documents
    against queries with the transposed masks). ``positive_mask`` /
    ``excluded_mask`` (n, D) bool mark further positives / non-candidates."""
    q, d = _norm(q), _norm(d)
    n = q.shape[0]
    bank = d if hard is None else torch.cat([d, _norm(hard).reshape(-1, d.shape[1])])
    terms = []

    def sets(i, columns, pos_m, excl_m):
        pos, neg = [i], []
        for c in range(columns):
            if c == i:
                continue
            if pos_m is not None and bool(pos_m[i, c]):
                pos.append(c)
            elif excl_m is not None and bool(excl_m[i, c]):
                continue
            else:
                neg.append(c)
        return pos, neg

    for i in range(n):
        pos, neg = sets(i, bank.shape[0], positive_mask, excluded_mask)
        if neg_sets is not None:
            assert set(neg_sets[i]) <= set(neg), "sampled a column that is not a negative"
            neg = list(neg_sets[i])
        terms.append(softmax_anchor(q[i], [bank[c] for c in pos], [bank[c] for c in neg], tau, decoupled=decoupled))
    if symmetric:
        pos_t = None if positive_mask is None else positive_mask[:, :n].t()
        excl_t = None if excluded_mask is None else excluded_mask[:, :n].t()
        for i in range(n):
            pos, neg = sets(i, n, pos_t, excl_t)
            terms.append(softmax_anchor(d[i], [q[c] for c in pos], [q[c] for c in neg], tau, decoupled=decoupled))
    return torch.stack(terms).mean()


def dcl_w_weights(z1, z2, sigma):
    """DCL-W's von Mises-Fisher weight of every pair: 2 - exp(s_i/sigma) / mean_j exp(s_j/sigma)."""
    z1, z2 = _norm(z1).detach(), _norm(z2).detach()
    s = [float((z1[i] * z2[i]).sum()) / sigma for i in range(z1.shape[0])]
    import math

    e = [math.exp(v) for v in s]
    mean = sum(e) / len(e)
    return [2.0 - v / mean for v in e]


def siglip_pairs(anchors, bank, pairs, scale, bias):
    """Sum over (row, column, z) of log(1 + exp(-z (scale * s + bias))), per anchor, then the mean."""
    per = {}
    for i, c, z in pairs:
        logit = scale * (anchors[i] * bank[c]).sum() + bias
        per.setdefault(i, []).append(torch.nn.functional.softplus(-z * logit))
    return torch.stack([torch.stack(v).sum() for _, v in sorted(per.items())]).mean()


def siglip_query_document(q, d, scale, bias, *, hard=None, positive_mask=None, excluded_mask=None, neg_sets=None):
    """SigLIP (Zhai et al. eq. 1): -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b))."""
    q, d = _norm(q), _norm(d)
    n = q.shape[0]
    bank = d if hard is None else torch.cat([d, _norm(hard).reshape(-1, d.shape[1])])
    pairs = []
    for i in range(n):
        for c in range(bank.shape[0]):
            positive = c == i or (positive_mask is not None and bool(positive_mask[i, c]))
            if not positive and excluded_mask is not None and bool(excluded_mask[i, c]):
                continue
            if not positive and neg_sets is not None and c not in neg_sets[i]:
                continue
            pairs.append((i, c, 1.0 if positive else -1.0))
    return siglip_pairs(q, bank, pairs, scale, bias)


def siglip_two_view(z1, z2, scale, bias):
    z1, z2 = _norm(z1), _norm(z2)
    n = z1.shape[0]
    bank = torch.cat([z1, z2])
    pairs = [(a, c, 1.0 if c == (a + n) % (2 * n) else -1.0) for a in range(2 * n) for c in range(2 * n) if c != a]
    return siglip_pairs(bank, bank, pairs, scale, bias)


def similarity_filter(anchors, bank, positive, candidates, *, margin=None, top=None):
    """Columns of ``candidates`` (a list) to mask for one anchor: guide
    similarity above the positive's minus ``margin``, or among the
    floor(top * len(candidates)) most similar."""
    sim = {c: float((anchors * bank[c]).sum()) for c in candidates}
    pos = float((anchors * bank[positive]).sum())
    masked = set()
    if margin is not None:
        masked |= {c for c in candidates if sim[c] > pos - margin}
    if top is not None:
        import math

        k = math.floor(top * len(candidates))
        masked |= set(sorted(candidates, key=lambda c: -sim[c])[:k])
    return masked
