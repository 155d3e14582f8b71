"""Retrieval metrics against a brute-force reference (full sort in numpy, Python loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from negbatch.evaluation import retrieval
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


def brute_force_judged(q: np.ndarray, d: np.ndarray, judged: dict[int, set[int]]) -> dict[str, float]:
    """trec_eval's binary-judgement measures per query, from a full sort of the
    documents (descending cosine, ties by lower index), averaged over queries."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    per = {key: [] for key in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")}
    for i, rel in judged.items():
        scores = [float(np.dot(q[i], d[j])) for j in range(len(d))]
        order = sorted(range(len(d)), key=lambda j: (-scores[j], j))
        for k in (1, 5, 10):
            per[f"recall@{k}"].append(len(rel & set(order[:k])) / len(rel))
        first = next(pos for pos, j in enumerate(order, 1) if j in rel)
        per["mrr@10"].append(1 / first if first <= 10 else 0.0)
        dcg = sum(1 / math.log2(pos + 1) for pos, j in enumerate(order[:10], 1) if j in rel)
        per["ndcg@10"].append(dcg / sum(1 / math.log2(pos + 1) for pos in range(1, min(len(rel), 10) + 1)))
    return {key: sum(v) / len(v) for key, v in per.items()}


def test_several_relevant_documents_per_query_match_trec_eval_measures():
    g = np.random.default_rng(3)
    d = g.normal(size=(50, 6))
    judged = {i: set(g.choice(50, size=int(g.integers(1, 14)), replace=False).tolist()) for i in range(25)}
    q = np.stack([d[sorted(judged[i])].mean(0) + 0.8 * g.normal(size=6) for i in range(25)])
    rows = [(i, j) for i in judged for j in sorted(judged[i])]
    qi = torch.tensor([i for i, _ in rows])
    got = retrieval_metrics(torch.tensor(q)[qi], torch.tensor(d), torch.tensor([j for _, j in rows]), query_ids=qi)
    want = brute_force_judged(q, d, judged)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < got["ndcg@10"] < 1 and max(map(len, judged.values())) > 10  # more relevant than the cutoff too


@pytest.mark.cuda
def test_several_relevant_documents_on_cuda_equal_the_cpu():
    """retrieval_scores keeps a GPU model's embeddings on the GPU: the per-query sums run there."""
    g = torch.Generator().manual_seed(5)
    d, q = torch.randn(40, 6, generator=g), torch.randn(10, 6, generator=g)
    rows = torch.arange(10).repeat_interleave(3)
    relevant = torch.randint(0, 40, (30,), generator=g)
    cpu = retrieval_metrics(q[rows], d, relevant, query_ids=rows)
    gpu = retrieval_metrics(q[rows].cuda(), d.cuda(), relevant.cuda(), query_ids=rows)
    assert gpu == pytest.approx(cpu, abs=1e-12)


def test_a_query_text_in_several_pairs_is_one_query_with_several_relevant_documents():
    """A perfect encoder (the same embedding for a query and its documents)
    scores 1 everywhere but recall@1 (two relevant documents, one slot)."""
    from negbatch.data.text import TextPairs
    from negbatch.evaluation.retrieval import evaluate_retrieval

    vectors = {"q": [1.0, 0.0], "d1": [1.0, 0.0], "d2": [1.0, 0.0], "x": [0.0, 1.0], "dx": [0.0, 1.0]}

    def tokenize(texts):
        return {"x": torch.tensor([vectors[t] for t in texts])}

    class Lookup(torch.nn.Module):
        def forward(self, features):
            return features["x"]

    pairs = TextPairs(["q", "q", "x"], ["d1", "d2", "dx"])
    m = evaluate_retrieval(Lookup(), tokenize, pairs, ks=(1, 10))
    assert m["num_queries"] == 2 and m["num_documents"] == 3
    assert m["mrr@10"] == 1.0 and m["ndcg@10"] == 1.0 and m["recall@10"] == 1.0
    assert m["recall@1"] == pytest.approx((0.5 + 1.0) / 2)


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


def exact_rule_ranks(q: torch.Tensor, d: torch.Tensor, relevant, normalize: bool) -> list[int]:
    """Reference ranks, written for the test: every score by math.fsum of the exact products
    (one rounding, whatever the order), a full Python sort by (-score, index)."""
    if normalize:
        q, d = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
    qs, ds = q.double().tolist(), d.double().tolist()
    ranks = []
    for i, row in enumerate(qs):
        scores = [math.fsum(a * b for a, b in zip(row, doc)) for doc in ds]
        order = sorted(range(len(ds)), key=lambda j: (-scores[j], j))
        ranks.append(order.index(int(relevant[i])) + 1)
    return ranks


def test_duplicate_in_another_block_ties_as_documented():
    # The case of issue 14: the relevant document 20 has a copy at 12, in another 13-document block.
    g = torch.Generator().manual_seed(10)
    d = torch.randn(26, 16, generator=g, dtype=torch.float64)
    d[12] = d[20]
    q = torch.randn(1, 16, generator=g, dtype=torch.float64)
    expected = exact_rule_ranks(q, d, [20], normalize=True)
    assert expected == [4]
    for chunk in (1, 5, 13, 20, 26, 16384):
        assert relevant_ranks(q, d, torch.tensor([20]), doc_chunk=chunk).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
def test_duplicates_across_blocks_match_the_brute_force_rule_for_every_chunking(dtype, normalize):
    g = torch.Generator().manual_seed(3)
    d = torch.randn(90, 24, generator=g, dtype=torch.float64)
    relevant = torch.randint(0, 90, (40,), generator=g)
    q = d[relevant] + 0.6 * torch.randn(40, 24, generator=g, dtype=torch.float64)
    # Copies of relevant documents before and after them, in other blocks for most chunkings,
    # copies of other documents, and a run of copies spanning several blocks.
    for src, dst in [(int(relevant[0]), 0), (int(relevant[0]), 89), (int(relevant[1]), 45), (int(relevant[2]), 7),
                     (int(relevant[2]), 71), (5, 33), (5, 60)] + [(int(relevant[3]), k) for k in range(50, 58)]:
        d[dst] = d[src]
    q, d = q.to(dtype), d.to(dtype)
    expected = exact_rule_ranks(q, d, relevant, normalize)
    tied = sum(bool((d == d[int(r)]).all(1).sum() > 1) for r in relevant)
    assert tied >= 4  # several queries really have a duplicated relevant document
    for qc, dc in [(1024, 16384), (40, 90), (7, 13), (2, 1), (3, 8), (16, 45), (5, 64)]:
        got = relevant_ranks(q, d, relevant, normalize=normalize, query_chunk=qc, doc_chunk=dc)
        assert got.tolist() == expected, (qc, dc)


def test_near_ties_inside_the_rounding_window_are_decided_by_the_fixed_rule():
    # Documents one float32 step away from the relevant one: their block products may round
    # either way, so the fixed-order score must decide them, as the reference does.
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1, 32, generator=g)
    d = torch.randn(60, 32, generator=g)
    for k, j in enumerate(range(0, 60, 6)):
        d[j] = base[0]
        d[j, k % 32] = torch.nextafter(base[0, k % 32], torch.tensor(10.0 if k % 2 else -10.0))
    d[30] = base[0]
    q = base + 0.01 * torch.randn(5, 32, generator=g)
    relevant = torch.full((5,), 30)
    expected = exact_rule_ranks(q, d, relevant, normalize=False)
    assert len(set(expected)) > 1 or expected[0] > 1  # the perturbed copies do outrank it sometimes
    for dc in (1, 7, 31, 60):
        assert relevant_ranks(q, d, relevant, normalize=False, doc_chunk=dc).tolist() == expected


def test_fixed_order_scores_ignore_batch_shape_and_position():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(50, 37, generator=g), torch.randn(50, 37, generator=g)
    full = retrieval.fixed_order_scores(a, b)
    alone = torch.cat([retrieval.fixed_order_scores(a[i : i + 1], b[i : i + 1]) for i in range(50)])
    assert torch.equal(full, alone)
    ref = torch.tensor([math.fsum(x * y for x, y in zip(r, s)) for r, s in zip(a.double().tolist(), b.double().tolist())],
                       dtype=torch.float64)
    assert torch.allclose(full, ref, rtol=0, atol=1e-13)


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


def _near_duplicates(n_groups=30, per_group=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_groups, d, generator=g)
    docs = (centres.repeat_interleave(per_group, 0) + 1e-3 * torch.randn(n_groups * per_group, d, generator=g))
    queries = docs[::per_group] + 1e-4 * torch.randn(n_groups, d, generator=g)
    return queries, docs, torch.arange(0, n_groups * per_group, per_group)


def test_mixed_dtypes_rank_in_the_wider_one_and_the_layout_does_not_matter():
    queries, docs, relevant = _near_duplicates()
    half = queries.half()
    # float32 documents are not cast down to float16 queries (that merged near-duplicates).
    assert torch.equal(relevant_ranks(half, docs, relevant), relevant_ranks(half.float(), docs, relevant))
    assert torch.equal(relevant_ranks(half, docs.double(), relevant), relevant_ranks(half.double(), docs.double(), relevant))
    # The normalisation is the fixed-order one: a column-major copy ranks the same.
    column_major = docs.T.contiguous().T
    assert not column_major.is_contiguous()
    assert torch.equal(relevant_ranks(queries, column_major, relevant), relevant_ranks(queries, docs, relevant))


def test_metrics_refuse_a_document_listed_twice_and_ranks_below_one():
    with pytest.raises(ValueError, match="same relevant document twice"):
        metrics_from_ranks(torch.tensor([2, 2]), query_ids=torch.tensor([0, 0]))
    metrics_from_ranks(torch.tensor([2, 2]), query_ids=torch.tensor([0, 1]))  # two queries: fine
    with pytest.raises(ValueError, match=">= 1"):
        metrics_from_ranks(torch.tensor([0, 3]))
    for ks in ((0,), (1, -3), (1.5,), (), "5"):
        with pytest.raises(ValueError, match="ks must"):
            metrics_from_ranks(torch.tensor([1, 3]), ks=ks)
    assert metrics_from_ranks(torch.tensor([1, 3]), ks=(np.int64(3),))["recall@3"] == 1.0
    for cutoff in (0, -1, 2.5, True, "10"):  # 0 gave MRR@0 = nDCG@0 = 0 without a word
        with pytest.raises(ValueError, match="cutoff must be a positive int"):
            metrics_from_ranks(torch.tensor([1, 3]), cutoff=cutoff)
    assert metrics_from_ranks(torch.tensor([1, 3]), cutoff=np.int64(1))["mrr@1"] == 0.5
    with pytest.raises(ValueError, match="same relevant document twice"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([2, 2, 1]), query_ids=torch.tensor([0, 0, 1]))


def test_metrics_from_ranks_names_a_list_given_for_a_tensor():
    """A list of ranks (or of query ids) failed with "'list' object has no attribute 'numel'"."""
    with pytest.raises(ValueError, match=r"ranks must be a 1-d integer tensor of 1-based ranks .*got list"):
        metrics_from_ranks([1, 3, 20])
    with pytest.raises(ValueError, match=r"query_ids must be a tensor of the shape of ranks \(2,\), got list"):
        metrics_from_ranks(torch.tensor([1, 2]), query_ids=[7, 7])
