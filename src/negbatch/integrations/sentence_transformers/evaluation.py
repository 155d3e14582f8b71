"""negbatch's retrieval metrics on the inputs of sentence-transformers' ``InformationRetrievalEvaluator``.

Both compute Recall@k, MRR@10 and nDCG@10 from each query's ranking of the
corpus by the model's similarity (cosine for all-MiniLM-L6-v2). With one
relevant document per query, the evaluator's ``accuracy@k`` and ``recall@k``
are both negbatch's ``recall@k``, and its ``mrr@10`` and ``ndcg@10`` (binary
relevance, ideal DCG 1) are negbatch's.

Where no two documents tie with a query's relevant document, the two agree
exactly. Ties are ruled differently:

* negbatch (:func:`negbatch.evaluation.retrieval.relevant_ranks`): the score of
  a pair is a fixed function of the two embeddings (float64 products summed in a
  fixed order), so an exact duplicate of the relevant document always ties with
  it, whatever block it falls in; ties go to the **lower position in the
  corpus**.
* ``InformationRetrievalEvaluator`` (sentence-transformers 6): scores come from
  float32 matrix products, one per ``corpus_chunk_size`` block, and ties among
  the float32 values go to the **smaller corpus id** (Python's ordering of the
  ids: ``"d10" < "d9"`` for strings). A duplicate in another block, or at
  another place in the product, may round differently and not tie at all.

So with corpus ids that sort in corpus order, exact ties agree too; otherwise
a query whose relevant document has an exact duplicate may get another rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...evaluation.retrieval import check_ks, retrieval_metrics

__all__ = ["retrieval_scores"]


def _encode(model: Any, texts: list[str], kind: str, batch_size: int) -> Tensor:
    encode = getattr(model, f"encode_{kind}", None) or model.encode  # encode_query/encode_document: ST >= 5
    return encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)


def retrieval_scores(
    model: Any,
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    relevant_docs: Mapping[str, Any],
    *,
    ks: Sequence[int] = (1, 3, 5, 10),
    batch_size: int = 32,
    corpus_embeddings: Tensor | None = None,
) -> dict[str, float]:
    """Recall@k, MRR@10 and nDCG@10 of ``model`` on an ``InformationRetrievalEvaluator``'s inputs.

    Parameters
    ----------
    model : SentenceTransformer
        Its ``similarity_fn_name`` must be ``"cosine"`` or ``"dot"``.
    queries, corpus : dict id -> text
        As for the evaluator; the corpus order is the dict's order.
    relevant_docs : dict query id -> set of corpus ids
        One or more relevant documents per query (with several, Recall@k is
        the share of them in the top k, as the evaluator's ``recall@k``);
        queries without any are left out, as the evaluator does. A bare
        string (one id not in a set) is refused.
    ks : sequence of int
        The k of Recall@k.
    batch_size : int
        Texts per encoding batch.
    corpus_embeddings : Tensor, optional
        Precomputed corpus embeddings (as the evaluator accepts).

    Returns
    -------
    dict
        ``recall@k`` for each k, ``mrr@10``, ``ndcg@10``, ``num_queries``.

    Examples
    --------
    >>> from negbatch.models.text import load_minilm  # doctest: +SKIP
    >>> retrieval_scores(load_minilm("cpu"), {"q": "a cat sleeps"}, {"d0": "the cat is asleep", "d1": "rain"},
    ...                  {"q": {"d0"}})["recall@1"]  # doctest: +SKIP
    1.0
    """
    similarity = getattr(model, "similarity_fn_name", None) or "cosine"
    if similarity not in ("cosine", "dot"):
        raise ValueError(
            f"the model scores by {similarity!r}; negbatch's retrieval metrics rank by cosine or dot product"
        )
    for qid, ids in relevant_docs.items():
        if isinstance(ids, (str, bytes)):
            # Iterating a bare id would make each of its characters a relevant id.
            raise TypeError(f"relevant_docs[{qid!r}] is the string {ids!r}; give a set of corpus ids: {{{ids!r}}}")
    qids = [q for q in queries if q in relevant_docs and len(relevant_docs[q]) > 0]
    if not qids:
        raise ValueError("no query has a relevant document in relevant_docs")
    position = {cid: i for i, cid in enumerate(corpus)}
    rows, relevant = [], []  # one row per (query, relevant document)
    for row, qid in enumerate(qids):
        for cid in relevant_docs[qid]:
            if cid not in position:
                raise ValueError(f"query {qid!r}'s relevant document {cid!r} is not in the corpus")
            rows.append(row)
            relevant.append(position[cid])
    check_ks(ks)
    if corpus_embeddings is not None and (not isinstance(corpus_embeddings, Tensor) or corpus_embeddings.dim() != 2
                                          or corpus_embeddings.shape[0] != len(corpus)):
        shape = tuple(corpus_embeddings.shape) if isinstance(corpus_embeddings, Tensor) else \
            type(corpus_embeddings).__name__
        raise ValueError(f"corpus_embeddings must be a 2-d tensor with one row per corpus document, in the corpus's "
                         f"order ({len(corpus)} rows), got {shape}")
    q = _encode(model, [queries[i] for i in qids], "query", batch_size)
    d = corpus_embeddings if corpus_embeddings is not None else _encode(model, list(corpus.values()), "document",
                                                                         batch_size)
    rows_t = torch.tensor(rows)
    out = retrieval_metrics(q[rows_t.to(q.device)], d.to(q.device), torch.tensor(relevant), ks=ks,
                            normalize=similarity == "cosine", query_ids=rows_t)
    out["num_queries"] = len(qids)
    return out
