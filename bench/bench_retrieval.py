"""Exact retrieval metrics: chunked search against one full score matrix.

Goal (issue 7): a corpus of 100,000 documents evaluates exactly in bounded memory. The chunked
search must give the same ranks as one block while its largest score block stays
query_chunk x doc_chunk.

    python bench/bench_retrieval.py [N_DOCS [N_QUERIES [DIM]]]   (default 100000 2000 384)
    NEGBATCH_BENCH_QUICK=1 python bench/bench_retrieval.py        (20000 500 64)
"""

from __future__ import annotations

import os
import sys
import time

import torch

from negbatch.evaluation.retrieval import relevant_ranks


def main(argv: list[str]) -> None:
    quick = os.environ.get("NEGBATCH_BENCH_QUICK") == "1"
    n_docs, n_queries, dim = (20_000, 500, 64) if quick else (100_000, 2_000, 384)
    sizes = [int(a) for a in argv[:3]]
    n_docs, n_queries, dim = (sizes + [n_docs, n_queries, dim][len(sizes):])[:3]
    g = torch.Generator().manual_seed(0)
    docs = torch.randn(n_docs, dim, generator=g)
    relevant = torch.randint(0, n_docs, (n_queries,), generator=g)
    queries = docs[relevant] + 1.5 * torch.randn(n_queries, dim, generator=g)
    variants = {
        "chunked 1024 x 16384 (default)": dict(query_chunk=1024, doc_chunk=16384),
        "chunked 256 x 4096": dict(query_chunk=256, doc_chunk=4096),
        "one block (nq x nd)": dict(query_chunk=n_queries, doc_chunk=n_docs),
    }
    print(f"documents={n_docs} queries={n_queries} dim={dim} threads={torch.get_num_threads()}")
    print(f"{'variant':34s} {'seconds':>8s} {'largest block MB':>17s} {'ranks equal':>12s}")
    results = {}
    for name, kw in variants.items():
        start = time.perf_counter()
        ranks = relevant_ranks(queries, docs, relevant, **kw)
        seconds = time.perf_counter() - start
        block_mb = min(kw["query_chunk"], n_queries) * min(kw["doc_chunk"], n_docs) * 4 / 2**20
        results[name] = (seconds, block_mb, ranks)
    reference = results["one block (nq x nd)"][2]
    for name, (seconds, block_mb, ranks) in results.items():
        print(f"{name:34s} {seconds:8.2f} {block_mb:17.1f} {str(torch.equal(ranks, reference)):>12s}")
    differ = [name for name, (_, _, ranks) in results.items() if not torch.equal(ranks, reference)]
    if differ:  # a time ratio of two different results would compare two computations
        raise SystemExit(f"ranks differ from one block's: {differ}")
    base_s, base_mb, _ = results["one block (nq x nd)"]
    for name, (seconds, block_mb, _) in results.items():
        print(f"ratio vs one block, {name}: time x{seconds / base_s:.2f}, memory x{block_mb / base_mb:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
