"""Retrieval metrics against a brute-force reference (full sort in numpy, Python loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from negbatch.evaluation.retrieval import metrics_from_ranks, relevant_ranks, retrieval_metrics


def brute_force(q: np.ndarray, d: np.ndarray, relevant: np.ndarray, normalize: bool) -> dict[str, float]:
    """Sort every document for every query (descending score, ties by lower index); read off the metrics."""
    if normalize:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        d = d / np.linalg.norm(d, axis=1, keepdims=True)
    ranks = []
    for i in range(len(q)):
        scores = [float(np.dot(q[i], d[j])) for j in range(len(d))]
        order = sorted(range(len(d)), key=lambda j: (-scores[j], j))
        ranks.append(order.index(int(relevant[i])) + 1)
    out = {f"recall@{k}": sum(r <= k for r in ranks) / len(ranks) for k in (1, 5, 10)}
    out["mrr@10"] = sum(1 / r for r in ranks if r <= 10) / len(ranks)
    out["ndcg@10"] = sum(1 / math.log2(r + 1) for r in ranks if r <= 10) / len(ranks)
    out["ranks"] = ranks
    return out


@pytest.mark.parametrize("chunks", [(1024, 16384), (7, 5), (1, 1), (3, 64)])
def test_metrics_match_brute_force_on_random_data(chunks):
    g = np.random.default_rng(0)
    d = g.normal(size=(60, 8))
    relevant = g.integers(0, 60, size=45)
    q = d[relevant] + 0.9 * g.normal(size=(45, 8))
    ref = brute_force(q, d, relevant, normalize=True)
    qt, dt = torch.tensor(q), torch.tensor(d)  # float64, so rounding cannot reorder near-ties
    ranks = relevant_ranks(qt, dt, torch.tensor(relevant), query_chunk=chunks[0], doc_chunk=chunks[1])
    assert ranks.tolist() == ref["ranks"]
    got = retrieval_metrics(qt, dt, torch.tensor(relevant), query_chunk=chunks[0], doc_chunk=chunks[1])
    for key in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12)
    assert 0 < got["recall@1"] < got["recall@10"] < 1  # the case is not degenerate


@pytest.mark.parametrize("chunks", [(1024, 16384), (4, 3), (1, 2)])
def test_ties_go_to_the_lower_document_index(chunks):
    # Integer embeddings, dot product: many exact ties, identical in any summation order.
    g = np.random.default_rng(1)
    d = g.integers(-1, 2, size=(40, 3)).astype(np.float32)
    q = g.integers(-1, 2, size=(30, 3)).astype(np.float32)
    relevant = g.integers(0, 40, size=30)
    ref = brute_force(q, d, relevant, normalize=False)
    ranks = relevant_ranks(torch.tensor(q), torch.tensor(d), torch.tensor(relevant), normalize=False,
                           query_chunk=chunks[0], doc_chunk=chunks[1])
    assert ranks.tolist() == ref["ranks"]


def test_duplicate_documents_tie_exactly():
    d = torch.tensor([[1.0, 2.0], [0.3, 0.1], [1.0, 2.0], [1.0, 2.0]])
    q = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    # Relevant document 2 has identical copies at 0 (ahead of it) and 3 (behind it).
    assert relevant_ranks(q, d, torch.tensor([2, 0]), doc_chunk=3).tolist() == [2, 1]


def test_metrics_from_ranks_closed_form():
    ranks = torch.tensor([1, 2, 10, 11])
    m = metrics_from_ranks(ranks)
    assert m["recall@1"] == 0.25 and m["recall@5"] == 0.5 and m["recall@10"] == 0.75
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 0.1) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 4)


def test_large_corpus_in_chunks_agrees_with_one_block():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(20_000, 16, generator=g)
    q = d[:300] + 0.5 * torch.randn(300, 16, generator=g)
    one = relevant_ranks(q, d, torch.arange(300), query_chunk=300, doc_chunk=20_000)
    many = relevant_ranks(q, d, torch.arange(300), query_chunk=64, doc_chunk=1500)
    assert torch.equal(one, many)


def test_rejects_bad_input():
    q, d = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="same width"):
        relevant_ranks(q, torch.randn(5, 3), torch.arange(3))
    with pytest.raises(ValueError, match="outside"):
        relevant_ranks(q, d, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="one index per query"):
        relevant_ranks(q, d, torch.arange(2))
    with pytest.raises(TypeError, match="integer"):
        relevant_ranks(q, d, torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        relevant_ranks(torch.full((3, 4), float("nan")), d, torch.arange(3))
    with pytest.raises(ValueError, match="doc_chunk"):
        relevant_ranks(q, d, torch.arange(3), doc_chunk=0)
    with pytest.raises(ValueError, match="as many documents"):
        retrieval_metrics(torch.randn(6, 4), d)
