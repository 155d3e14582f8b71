"""Exact retrieval metrics: chunked search against one full score matrix.

Goal (issue 7): a corpus of 100,000 documents evaluates exactly in bounded memory. The chunked
search must give the same ranks as one block while its largest score block stays
query_chunk x doc_chunk.

    python bench/bench_retrieval.py [N_DOCS [N_QUERIES [DIM]]]   (default 100000 2000 384)
    NEGBATCH_BENCH_QUICK=1 python bench/bench_retrieval.py        (20000 500 64)
    NEGBATCH_BENCH_REPEATS=3                                       (timed rounds, after a warm-up)

The variants race in a fresh random order every round (bench/_order.py); the
first round warms up and is not counted; the median of the others is given.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _order import rounds  # noqa: E402

from negbatch.evaluation.retrieval import relevant_ranks  # noqa: E402


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
    repeats = int(os.environ.get("NEGBATCH_BENCH_REPEATS", 3))
    print(f"documents={n_docs} queries={n_queries} dim={dim} threads={torch.get_num_threads()} "
          f"repeats={repeats} (median) load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':34s} {'seconds':>8s} {'largest block MB':>17s} {'ranks equal':>12s}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    ranks_of = {}
    for rep, order in rounds(list(variants), repeats):  # round 0 warms up
        for name in order:
            start = time.perf_counter()
            ranks_of[name] = relevant_ranks(queries, docs, relevant, **variants[name])
            if rep:
                times[name].append(time.perf_counter() - start)
    results = {}
    for name, kw in variants.items():
        block_mb = min(kw["query_chunk"], n_queries) * min(kw["doc_chunk"], n_docs) * 4 / 2**20
        results[name] = (statistics.median(times[name]), block_mb, ranks_of[name])
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
