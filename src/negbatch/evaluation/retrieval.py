"""Retrieval metrics of a dual encoder: Recall@k, MRR@10, nDCG@10, by exact search.

What decides every metric is the rank of each relevant document among all
documents, sorted by score (cosine similarity by default):

    rank_i = 1 + #{j : s_ij > s_i,rel} + #{j < rel : s_ij = s_i,rel}

Ties are broken deterministically in favour of the lower document index (as a
stable sort by descending score would). With one relevant document per query
(a pair), Recall@k = mean(rank <= k), MRR@10 = mean(1/rank if rank <= 10 else
0) and (ideal DCG = 1) nDCG@10 = mean(1/log2(1 + rank) if rank <= 10 else 0).
A query with R relevant documents (``query_ids``: one row per relevant
document) counts once, as trec_eval does with binary judgements: Recall@k is
the share of its R found in the top k, MRR@10 takes its best rank, and
nDCG@10 = sum over its ranks <= 10 of 1/log2(1 + rank), divided by the ideal
sum over 1..min(R, 10).

**Which score.** ``s_ij`` is a fixed function of the two embeddings alone: the
products of their coordinates in float64 (exact for float32 and narrower
inputs), summed pairwise in a fixed order. So an exact duplicate of the
relevant document ties with it exactly, and the ranks do not depend on the
block sizes, on where a document sits in the corpus or on the device's matrix
kernels. The search itself runs on fast matrix products, block by block
(``query_chunk`` x ``doc_chunk``, bounded memory for corpora of 100,000
documents and more): a product can be off by at most ``gamma_d |q| |d|``
(``gamma_d = d u / (1 - d u)``, u the unit roundoff of the product's dtype), so
every candidate whose product lies farther than four such bounds from the
relevant score is decided by it, and only the few candidates inside that window
are re-scored with the fixed function above. The search is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_embeddings, check_positive_int, is_int
from ..allocator import freed_memory_kept

__all__ = [
    "relevant_ranks",
    "fixed_order_scores",
    "metrics_from_ranks",
    "retrieval_metrics",
    "encode_texts",
    "evaluate_retrieval",
]


#: Rows of products re-scored at a time (memory: this many x d float64 values).
_PAIRS_PER_PASS = 1 << 14


def fixed_order_scores(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products ``a[k] . b[k]`` by one fixed rule: float64
    products (exact for float32 and narrower inputs), summed pairwise.

    Only elementwise additions are used, so the result is the same bits for the
    same pair of rows whatever the number of rows, their position or the device
    (a matrix product or a reduction may change its summation order with the
    shapes). This is the score of :func:`relevant_ranks`.

    Examples
    --------
    >>> a = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 1.0]])
    >>> fixed_order_scores(a, a).tolist()
    [14.0, 1.25]
    """
    prods = a.to(torch.float64) * b.to(torch.float64)
    while prods.shape[1] > 1:
        if prods.shape[1] % 2:  # pad with an exact zero to an even width
            prods = torch.cat([prods, prods.new_zeros(prods.shape[0], 1)], dim=1)
        prods = prods[:, 0::2] + prods[:, 1::2]
    return prods[:, 0]


def _normalized(x: Tensor) -> Tensor:
    """``x`` scaled to unit rows by the fixed-order norm (F.normalize's norm is
    a reduction whose summation order follows the memory layout and device),
    ``_PAIRS_PER_PASS`` rows at a time: the float64 work stays the size of one
    block, not of the corpus."""
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], _PAIRS_PER_PASS):
        block = x[start : start + _PAIRS_PER_PASS]
        norm = fixed_order_scores(block, block).sqrt().clamp_min(1e-12)
        out[start : start + _PAIRS_PER_PASS] = block.to(torch.float64) / norm[:, None]
    return out


def _product_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the block products: half precision is widened to float32
    (whose products of half values are exact), and float32 is widened to
    float64 where the settings let float32 products run in reduced precision
    (TF32 or bfloat16 passes), whose error the bound below would not cover."""
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    if dtype == torch.float32:
        reduced = torch.get_float32_matmul_precision() != "highest"
        if device.type == "cuda":
            reduced = reduced or bool(torch.backends.cuda.matmul.allow_tf32)
        if reduced:
            dtype = torch.float64
    return dtype


@torch.no_grad()
def relevant_ranks(
    queries: Tensor,
    documents: Tensor,
    relevant: Tensor,
    *,
    normalize: bool = True,
    query_chunk: int = 1024,
    doc_chunk: int = 16384,
) -> Tensor:
    """1-based rank of each query's relevant document among all documents (exact, chunked).

    Parameters
    ----------
    queries : Tensor, shape (nq, d)
    documents : Tensor, shape (nd, d)
    relevant : LongTensor, shape (nq,)
        Index into ``documents`` of query i's relevant document.
    normalize : bool, default True
        Score by cosine similarity (L2-normalise both sides); False: dot product.
    query_chunk, doc_chunk : int
        Block sizes; peak extra memory is about ``query_chunk * doc_chunk``
        scores. The ranks do not depend on them (see the module docstring).

    Returns
    -------
    LongTensor, shape (nq,), on the queries' device. Ties go to the lower index.

    Examples
    --------
    >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> d = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    >>> relevant_ranks(q, d, torch.tensor([1, 2])).tolist()
    [2, 1]

    An exact duplicate of the relevant document ties with it, in any block:

    >>> d = torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.6, 0.8]])
    >>> [relevant_ranks(q[:1], d, torch.tensor([2]), doc_chunk=c).item() for c in (1, 2, 3)]
    [2, 2, 2]
    """
    check_embeddings(queries, "queries")
    check_embeddings(documents, "documents")
    if queries.shape[1] != documents.shape[1]:
        raise ValueError(
            f"queries and documents must have the same width, got {tuple(queries.shape)} and {tuple(documents.shape)}"
        )
    if documents.shape[0] == 0:
        raise ValueError("documents is empty; the corpus needs at least one document")
    if not isinstance(relevant, Tensor) or relevant.dim() != 1 or relevant.shape[0] != queries.shape[0]:
        raise ValueError(f"relevant must be a 1-d LongTensor with one index per query ({queries.shape[0]})")
    if relevant.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"relevant must hold integer indices, got dtype {relevant.dtype}")
    if relevant.numel() and (int(relevant.min()) < 0 or int(relevant.max()) >= documents.shape[0]):
        raise ValueError(f"relevant holds indices outside [0, {documents.shape[0]}): unknown documents")
    query_chunk, doc_chunk = check_positive_int(query_chunk, "query_chunk"), check_positive_int(doc_chunk, "doc_chunk")
    device = queries.device
    # The wider of the two dtypes: casting float32 documents to a float16 model's queries
    # would merge near-duplicates and move ranks.
    dtype = torch.promote_types(queries.dtype, documents.dtype)
    queries, documents = queries.to(dtype), documents.to(device=device, dtype=dtype)
    relevant = relevant.to(device=device, dtype=torch.long)
    if normalize:
        queries, documents = _normalized(queries), _normalized(documents)
    work = _product_dtype(queries.dtype, device)
    width = queries.shape[1]
    u = torch.finfo(work).eps / 2
    gamma = width * u / (1 - width * u)
    # Every block product lies within gamma |q| |d| of the true score; the fixed-order
    # score within far less. Four bounds leave room for both and for the subtraction.
    doc_norm_max = max(float(documents[s : s + _PAIRS_PER_PASS].to(torch.float64).norm(dim=1).max())
                       for s in range(0, documents.shape[0], _PAIRS_PER_PASS))
    ranks = torch.empty(queries.shape[0], dtype=torch.long, device=device)
    # On a CPU every block's scores come back from the heap, not from fresh pages (negbatch/allocator.py).
    with freed_memory_kept(device):
        _rank_blocks(queries, documents, relevant, ranks, query_chunk, doc_chunk, work, gamma, doc_norm_max)
    return ranks


def _rank_blocks(queries: Tensor, documents: Tensor, relevant: Tensor, ranks: Tensor, query_chunk: int,
                 doc_chunk: int, work: torch.dtype, gamma: float, doc_norm_max: float) -> None:
    """:func:`relevant_ranks`' search, block by block, into ``ranks``."""
    device = queries.device
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs : qs + query_chunk]
        rel = relevant[qs : qs + query_chunk]
        target = fixed_order_scores(q, documents[rel])
        window = 4.0 * gamma * q.to(torch.float64).norm(dim=1) * doc_norm_max
        qw = q.to(work)
        before = torch.zeros(q.shape[0], dtype=torch.long, device=device)
        for ds in range(0, documents.shape[0], doc_chunk):
            block = documents[ds : ds + doc_chunk]
            diff = (qw @ block.to(work).T).to(torch.float64) - target[:, None]
            index = torch.arange(ds, ds + block.shape[0], device=device)
            other = index[None, :] != rel[:, None]
            before += ((diff > window[:, None]) & other).sum(1)
            rows, cols = torch.nonzero((diff.abs() <= window[:, None]) & other, as_tuple=True)
            for start in range(0, rows.numel(), _PAIRS_PER_PASS):
                r, c = rows[start : start + _PAIRS_PER_PASS], cols[start : start + _PAIRS_PER_PASS]
                score = fixed_order_scores(q[r], block[c])
                ahead = (score > target[r]) | ((score == target[r]) & (c + ds < rel[r]))
                before.index_add_(0, r, ahead.long())
        ranks[qs : qs + query_chunk] = before + 1


def check_ks(ks: object) -> None:
    """The k of Recall@k: a sequence of positive ints (a float k counted
    documents at a fractional rank; k <= 0 reported a recall of 0)."""
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or not ks:
        raise ValueError(f"ks must be a non-empty sequence of positive ints (the k of Recall@k), got {ks!r}")
    bad = [k for k in ks if not is_int(k) or k < 1]
    if bad:
        raise ValueError(f"ks must hold positive ints (the k of Recall@k), got {bad[0]!r} in {list(ks)!r}")


def metrics_from_ranks(
    ranks: Tensor, ks: Sequence[int] = (1, 5, 10), cutoff: int = 10, query_ids: Tensor | None = None
) -> dict[str, float]:
    """Recall@k for each k, MRR@cutoff and nDCG@cutoff from 1-based ranks of relevant documents.

    ``query_ids`` (n,) names the query of each rank (a query with several
    relevant documents has one rank per document, each among all documents);
    None: one relevant document per query. See the module docstring.

    Examples
    --------
    >>> metrics_from_ranks(torch.tensor([1, 3, 20]), ks=(1, 5))
    {'recall@1': 0.3333333333333333, 'recall@5': 0.6666666666666666, 'mrr@10': 0.4444444444444444, 'ndcg@10': 0.5}
    >>> metrics_from_ranks(torch.tensor([1, 2]), ks=(1,), query_ids=torch.tensor([7, 7]))  # both relevant on top
    {'recall@1': 0.5, 'mrr@10': 1.0, 'ndcg@10': 1.0}
    """
    if not isinstance(ranks, Tensor):
        raise ValueError(f"ranks must be a 1-d integer tensor of 1-based ranks (>= 1), as relevant_ranks returns, "
                         f"got {type(ranks).__name__}; pass torch.tensor(ranks)")
    if ranks.numel() == 0:
        raise ValueError("ranks is empty: no queries to evaluate")
    check_ks(ks)
    if not is_int(cutoff) or cutoff < 1:
        # 0 reported MRR and nDCG of 0 (and, with query_ids, indexed the ideal gains at -1).
        raise ValueError(f"cutoff must be a positive int (the rank depth of MRR@cutoff and nDCG@cutoff), got {cutoff!r}")
    if ranks.dim() != 1 or ranks.dtype.is_floating_point or int(ranks.min()) < 1:
        raise ValueError("ranks must be a 1-d integer tensor of 1-based ranks (>= 1), as relevant_ranks returns")
    r = ranks.double()
    hit = r <= cutoff
    gain = torch.where(hit, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))
    if query_ids is None:
        out = {f"recall@{k}": float((r <= k).double().mean()) for k in ks}
        out[f"mrr@{cutoff}"] = float(torch.where(hit, 1.0 / r, torch.zeros_like(r)).mean())
        out[f"ndcg@{cutoff}"] = float(gain.mean())
        return out
    if not isinstance(query_ids, Tensor) or query_ids.shape != ranks.shape:
        got = tuple(query_ids.shape) if isinstance(query_ids, Tensor) else type(query_ids).__name__
        raise ValueError(f"query_ids must be a tensor of the shape of ranks {tuple(ranks.shape)}, got {got}")
    _, group = torch.unique(query_ids.to(r.device), return_inverse=True)
    n = int(group.max()) + 1
    # Distinct documents of one query have distinct ranks (ties go to the lower index),
    # so a repeated (query, rank) is one relevant document listed twice.
    if torch.unique(group * (int(r.max()) + 1) + ranks.to(r.device)).numel() != ranks.numel():
        raise ValueError(
            "a query lists the same relevant document twice (two rows with the same query_ids entry and rank); "
            "give each relevant document of a query once"
        )
    relevant = torch.bincount(group, minlength=n).double()

    def per_query(values: Tensor) -> Tensor:
        return torch.zeros(n, dtype=torch.float64, device=r.device).index_add_(0, group, values)

    out = {f"recall@{k}": float((per_query((r <= k).double()) / relevant).mean()) for k in ks}
    best = torch.full((n,), float("inf"), dtype=torch.float64, device=r.device).scatter_reduce_(0, group, r, "amin")
    out[f"mrr@{cutoff}"] = float(torch.where(best <= cutoff, 1.0 / best, torch.zeros_like(best)).mean())
    ideal = torch.cumsum(1.0 / torch.log2(torch.arange(2, cutoff + 2, dtype=torch.float64, device=r.device)), 0)
    out[f"ndcg@{cutoff}"] = float((per_query(gain) / ideal[relevant.clamp(max=cutoff).long() - 1]).mean())
    return out


def retrieval_metrics(
    queries: Tensor,
    documents: Tensor,
    relevant: Tensor | None = None,
    *,
    ks: Sequence[int] = (1, 5, 10),
    normalize: bool = True,
    query_chunk: int = 1024,
    doc_chunk: int = 16384,
    query_ids: Tensor | None = None,
) -> dict[str, float]:
    """Recall@k, MRR@10 and nDCG@10 of query embeddings against a document corpus.

    ``relevant`` (nq,) gives each query's relevant document; None means query
    i's is document i (aligned pairs). A query with several relevant
    documents takes one row per document, all with the same ``query_ids``
    entry (nq,). See the module docstring for the definitions and the tie rule.

    Examples
    --------
    >>> import torch
    >>> from negbatch import retrieval_metrics
    >>> g = torch.Generator().manual_seed(0)
    >>> docs = torch.randn(1000, 16, generator=g)
    >>> queries = docs + 0.1 * torch.randn(1000, 16, generator=g)
    >>> retrieval_metrics(queries, docs)["recall@1"]
    1.0
    """
    if relevant is None:
        if queries.shape[0] > documents.shape[0]:
            raise ValueError("relevant=None pairs query i with document i, so there must be as many documents")
        relevant = torch.arange(queries.shape[0])
    ranks = relevant_ranks(
        queries, documents, relevant, normalize=normalize, query_chunk=query_chunk, doc_chunk=doc_chunk
    )
    return metrics_from_ranks(ranks, ks, query_ids=query_ids)


@torch.no_grad()
def encode_texts(
    encoder: nn.Module,
    tokenize: Callable[[list[str]], Mapping[str, Tensor]],
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Embed texts in batches with the encoder in eval mode (restored afterwards); returns (n, d) on CPU."""
    batch_size = check_positive_int(batch_size, "batch_size")
    was_training = encoder.training
    encoder.eval()
    try:
        out = []
        for start in range(0, len(texts), batch_size):
            features = tokenize(list(texts[start : start + batch_size]))
            features = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in features.items()}
            out.append(encoder(features).float().cpu())
        return torch.cat(out)
    finally:
        encoder.train(was_training)


def evaluate_retrieval(
    encoder: nn.Module,
    tokenize: Callable[[list[str]], Mapping[str, Tensor]],
    pairs,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Retrieval metrics of ``pairs`` (a :class:`negbatch.data.text.TextPairs`, usually the test side).

    The corpus is the pairs' distinct documents (a document text shared by
    several queries is one corpus entry, relevant to each of them); the queries
    are the pairs' distinct query texts, each relevant to every document it is
    paired with (a query text in several pairs is one query with several
    relevant documents). Adds ``num_queries`` and ``num_documents``.

    Examples
    --------
    >>> from negbatch.data.text import builtin_pairs
    >>> from negbatch.models.text import TextTokenizer, TransformerTextEncoder
    >>> pairs = builtin_pairs()
    >>> tok = TextTokenizer.train(pairs.queries + pairs.documents, vocab_size=400, min_frequency=1)
    >>> enc = TransformerTextEncoder(tok.vocab_size, dim=32, depth=1, heads=2)
    >>> m = evaluate_retrieval(enc, tok, pairs)
    >>> m["num_documents"], 0.0 <= m["recall@10"] <= 1.0
    (40, True)
    """
    corpus: dict[str, int] = {}
    query_texts: dict[str, int] = {}
    judged: dict[tuple[int, int], None] = {}  # (query, document), each once, in order
    for query, doc in zip(pairs.queries, pairs.documents):
        judged[query_texts.setdefault(query, len(query_texts)), corpus.setdefault(doc, len(corpus))] = None
    rows = torch.tensor(list(judged), dtype=torch.long).reshape(-1, 2)
    q = encode_texts(encoder, tokenize, list(query_texts), batch_size=batch_size, device=device)
    d = encode_texts(encoder, tokenize, list(corpus), batch_size=batch_size, device=device)
    out = retrieval_metrics(q[rows[:, 0]], d, rows[:, 1], ks=ks, query_ids=rows[:, 0])
    out["num_queries"], out["num_documents"] = len(query_texts), len(corpus)
    return out
