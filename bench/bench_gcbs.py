"""GCBS ordering: time and peak memory against N, blockwise vs the paper's
dense pseudocode.

Each (method, N) runs in its own subprocess so that its peak resident memory
(ru_maxrss) is its own. The timed part is the ordering only (similarity graph
+ reverse Cuthill-McKee), not generating the embeddings; the peak includes the
interpreter, torch and the embeddings (the "base" column).

Goals (issue 6): N = 100k, d = 128 in <= 60 s and <= 2 GiB peak; where the
dense version fits, no slower than it.

Usage: python bench/bench_gcbs.py [N ...]        (default 10000 50000 100000 200000)
Env:   GCBS_BENCH_D (128), GCBS_BENCH_Q (0.999), GCBS_BENCH_DENSE_MAX (20000: largest N
       for the dense version, which needs ~3 x 4 N^2 bytes), GCBS_BENCH_BLOCK (4096)
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
D = int(os.environ.get("GCBS_BENCH_D", 128))
Q = float(os.environ.get("GCBS_BENCH_Q", 0.999))
DENSE_MAX = int(os.environ.get("GCBS_BENCH_DENSE_MAX", 20000))
BLOCK = int(os.environ.get("GCBS_BENCH_BLOCK", 4096))
GOAL_N, GOAL_S, GOAL_GIB = 100_000, 60.0, 2.0


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _data(n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(max(1, n // 100), D, generator=g)
    labels = torch.randint(len(centres), (n,), generator=g)
    x = centres[labels] + 0.5 * torch.randn(n, D, generator=g)
    y = x + 0.2 * torch.randn(n, D, generator=g)
    return x, y


def _one(method: str, n: int) -> dict:
    import numpy as np
    import scipy.sparse as sp
    import torch
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    from negbatch.sampling import gcbs_order

    x, y = _data(n)
    base = _rss_gib()
    t0 = time.perf_counter()
    if method == "blockwise":
        order = gcbs_order(x, y, Q, block_size=BLOCK)
    elif method == "faiss":
        order = gcbs_order(x, y, Q, method="faiss")
    else:  # the paper's pseudocode: dense similarity, its quantile, RCM
        xn = torch.nn.functional.normalize(x, dim=1)
        yn = torch.nn.functional.normalize(y, dim=1)
        s = (xn @ yn.T).numpy()
        a = sp.csr_matrix(s > np.quantile(s, Q))
        del s
        order = reverse_cuthill_mckee((a + a.T).tocsr(), symmetric_mode=True)
    elapsed = time.perf_counter() - t0
    assert len(order) == n
    # The order itself, as a digest: the exact methods must give the same one (checked in main).
    digest = hashlib.sha256(np.asarray(order, dtype=np.int64).tobytes()).hexdigest()
    return {"method": method, "n": n, "seconds": elapsed, "peak_gib": _rss_gib(), "base_gib": base, "order": digest}


def _measure(method: str, n: int) -> dict | None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--one", method, str(n)], capture_output=True, text=True, env=env)
    if proc.returncode:
        print(f"  {method} N={n} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        print(json.dumps(_one(argv[1], int(argv[2]))))
        return 0
    sizes = [int(a) for a in argv] or [10_000, 50_000, 100_000, 200_000]
    try:
        import faiss  # noqa: F401
        methods = ["blockwise", "faiss"]
    except ImportError:
        methods = ["blockwise"]
    print(f"GCBS ordering, d={D}, q={Q}, block={BLOCK}, threads={os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'N':>8} {'method':>10} {'seconds':>9} {'peak GiB':>9} {'base GiB':>9} {'vs dense':>9}")
    rows = []
    for n in sizes:
        results = {m: _measure(m, n) for m in methods}
        results["dense"] = _measure("dense", n) if n <= DENSE_MAX else None
        dense = results["dense"]
        if dense and results["blockwise"] and results["blockwise"]["order"] != dense["order"]:
            # a time ratio of two different orders would compare two computations
            raise SystemExit(f"N={n}: the blockwise order differs from the dense pseudocode's")
        for m in methods + ["dense"]:
            r = results[m]
            if r is None:
                if m == "dense":
                    print(f"{n:>8} {'dense':>10} {'(does not fit: ~' + format(12 * n * n / 2**30, '.0f') + ' GiB)':>40}")
                continue
            ratio = f"{r['seconds'] / dense['seconds']:.2f}x" if dense and m != "dense" else ""
            print(f"{n:>8} {m:>10} {r['seconds']:>9.2f} {r['peak_gib']:>9.2f} {r['base_gib']:>9.2f} {ratio:>9}", flush=True)
        rows.append(results)
    print("\nscaling (blockwise): " + ", ".join(
        f"N={r['blockwise']['n']}: {r['blockwise']['seconds']:.1f}s/{r['blockwise']['peak_gib']:.2f}GiB"
        for r in rows if r.get("blockwise")))
    for r in rows:
        b = r.get("blockwise")
        for m in methods:
            g = r.get(m)
            if g and g["n"] == GOAL_N:
                ok = g["seconds"] <= GOAL_S and g["peak_gib"] <= GOAL_GIB
                label = "exact" if m == "blockwise" else "approximate"
                print(f"goal N={GOAL_N} ({m}, {label}): {g['seconds']:.1f}s (<= {GOAL_S:.0f}s), "
                      f"{g['peak_gib']:.2f} GiB (<= {GOAL_GIB} GiB): {'met' if ok else 'NOT met'}")
        if b and r.get("dense"):
            ratio = b["seconds"] / r["dense"]["seconds"]
            print(f"goal N={b['n']}: blockwise/dense time {ratio:.2f} (<= 1): {'met' if ratio <= 1 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
