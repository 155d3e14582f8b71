"""negbatch's cached loss against sentence-transformers' CachedMultipleNegativesRankingLoss.

Both losses compute the same thing (InfoNCE over in-batch documents, cosine,
temperature 0.05 = MNRL's scale 20) with gradient caching in chunks; this
times them side by side on all-MiniLM-L6-v2, one process, one thread, the
variants interleaved (a warm-up round dropped, the median of --repeats):

* plain negbatch:  ``NegbatchLoss(model, InfoNCE(...))``, the whole batch in one graph
* plain MNRL:      ``MultipleNegativesRankingLoss(model, scale=20)``
* cached negbatch: ``NegbatchLoss(model, InfoNCE(...), chunk_size=C)``
* CachedMNRL:      ``CachedMultipleNegativesRankingLoss(model, scale=20, mini_batch_size=C)``

Each step is the loss's forward and backward on pre-tokenized features, as in
the trainer (the optimizer step is the same for all and left out). Printed:
seconds per step (wall, and the process's CPU time: with one thread on a
shared CPU the CPU time leaves out the time other processes held the core,
so the ratios use it there; on a GPU they use wall time), each cached loss
against its plain step, and negbatch's cached step against CachedMNRL's
(goal: no slower). Then peak memory, each
variant in its own process: the peak RSS increase over the step (CPU; the
method of bench_gradcache.py) or ``torch.cuda.max_memory_allocated`` (GPU)
(goal: negbatch cached no more than CachedMNRL). First, as a check that the
two compute the same: the relative difference of their gradients (dropout off).

Usage: python bench/bench_st_cached.py [--quick] [--batch 128] [--chunk 32] [--repeats 5] [--threads 1]
       [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _agree import check_same_gradients
from _order import rounds

import torch

from negbatch.lab.memory import peak_memory  # the gradcache study's and bench's instrument

HERE = Path(__file__).resolve().parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VARIANTS = ("plain negbatch", "plain MNRL", "cached negbatch", "CachedMNRL")


def texts(n: int) -> tuple[list[str], list[str]]:
    """n query/document pairs: Bible verses (ASV -> BBE) with the text extra, else the built-in pairs, cycled."""
    try:
        from negbatch.data.text import bible_pairs

        pairs = bible_pairs(max_pairs=max(2 * n, 200)).train
    except ModuleNotFoundError:
        from negbatch.data.text import builtin_pairs

        pairs = builtin_pairs()
    q = [pairs.queries[i % len(pairs.queries)] for i in range(n)]
    d = [pairs.documents[i % len(pairs.documents)] for i in range(n)]
    return q, d


def load_model(quick: bool, device: str):
    if not quick:
        from negbatch.models.text import load_minilm

        return load_minilm(device)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from _st import build_tiny_model_dir, tiny_model

    return tiny_model(build_tiny_model_dir(Path(tempfile.mkdtemp()))).to(device)


def build(variant: str, model, chunk: int):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from negbatch import InfoNCE
    from negbatch.integrations.sentence_transformers import NegbatchLoss

    infonce = InfoNCE(temperature=0.05, form="query_document")
    return {
        "plain negbatch": lambda: NegbatchLoss(model, infonce),
        "plain MNRL": lambda: MultipleNegativesRankingLoss(model, scale=20.0),
        "cached negbatch": lambda: NegbatchLoss(model, infonce, chunk_size=chunk),
        "CachedMNRL": lambda: CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk),
    }[variant]()


def features(model, batch: int, device: str) -> list[dict]:
    q, d = texts(batch)
    out = []
    for column in (q, d):
        f = dict(model.preprocess(column))
        out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in f.items()})
    return out


def step(loss, feats) -> None:
    value = loss([dict(f) for f in feats], None)
    value.backward()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gradient_check(model, feats, chunk: int) -> float:
    """max |g_negbatch - g_CachedMNRL| / max |g_CachedMNRL| over all parameters, dropout off.

    Also checks, before timing, that each race's two sides give the same
    parameter gradients (cached negbatch / CachedMNRL, plain negbatch / plain
    MNRL; bench/_agree.py), and stops the bench if not."""
    model.eval()
    grads = {}
    for variant in VARIANTS:
        model.zero_grad(set_to_none=True)
        step(build(variant, model, chunk), feats)
        grads[variant] = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.train()
    model.zero_grad(set_to_none=True)
    for ours, peer in (("cached negbatch", "CachedMNRL"), ("plain negbatch", "plain MNRL")):
        print(check_same_gradients(f"{ours} / {peer}", grads[ours], grads[peer]))
    ours, theirs = (torch.cat([g.reshape(-1) for g in grads[v] if g is not None])
                    for v in ("cached negbatch", "CachedMNRL"))
    return float((ours - theirs).abs().max() / theirs.abs().max())


def time_variants(model, feats, chunk: int, repeats: int, device: str) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each variant's step, the variants interleaved."""
    losses = {v: build(v, model, chunk) for v in VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _, order in rounds(list(losses), repeats):
        # A fresh order every round (see _order.py): a variant that always follows another
        # inherits its state of the caches and the allocator.
        for variant in order:
            loss = losses[variant]
            model.zero_grad(set_to_none=True)
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            step(loss, feats)
            sync(device)
            wall[variant].append(time.perf_counter() - start)
            cpu[variant].append(time.process_time() - start_cpu)
    return {v: {"wall": statistics.median(wall[v][1:]), "cpu": statistics.median(cpu[v][1:])} for v in VARIANTS}


def memory_child(variant: str, args) -> None:
    torch.set_num_threads(args.threads)
    model = load_model(args.quick, args.device).train()
    feats = features(model, args.batch, args.device)
    loss = build(variant, model, args.chunk)
    with peak_memory(args.device) as measured:
        step(loss, feats)
    peak, base = measured.peak_bytes, measured.base_bytes
    print(json.dumps({"peak": peak, "base": base}))


def measure_memory(variant: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-child", variant], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny BERT, B=16, chunk 4, one repeat: a smoke run")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 128; --quick: 16)")
    p.add_argument("--chunk", type=int, default=None, help="rows per chunk of both cached losses (default 32; 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after a warm-up (default 5; 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (16 if args.quick else 128)
    args.chunk = args.chunk or (4 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 5)
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    torch.set_num_threads(args.threads)
    import sentence_transformers

    model = load_model(args.quick, args.device).train()
    feats = features(model, args.batch, args.device)
    name = "tiny BERT (--quick)" if args.quick else "all-MiniLM-L6-v2"
    tokens = int(feats[0]["attention_mask"].sum() + feats[1]["attention_mask"].sum())
    print(f"{name}, sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, "
          f"{args.device}, {args.threads} thread(s); B={args.batch}, chunk={args.chunk}, {tokens} tokens per step, "
          f"median of {args.repeats} interleaved rounds")
    print(f"load average before: {open('/proc/loadavg').read().split()[:3] if os.path.exists('/proc/loadavg') else 'n/a'}")
    print(f"gradient check (dropout off): |g_negbatch - g_CachedMNRL| / |g_CachedMNRL| = "
          f"{gradient_check(model, feats, args.chunk):.1e}")
    t = time_variants(model, feats, args.chunk, args.repeats, args.device)
    # On a shared CPU, one thread: the process's CPU time leaves out the time other processes held
    # the core (wall time does not), so it decides; on a GPU, wall time does.
    clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    print(f"{'variant':<16} {'wall s/step':>12} {'CPU s/step':>11}")
    for variant in VARIANTS:
        print(f"{variant:<16} {t[variant]['wall']:12.3f} {t[variant]['cpu']:11.3f}")
    ours = t["cached negbatch"][clock] / t["plain negbatch"][clock]
    theirs = t["CachedMNRL"][clock] / t["plain MNRL"][clock]
    print(f"cached/plain ({clock} time): negbatch {ours:.2f}x, CachedMNRL {theirs:.2f}x")
    ratio = t["cached negbatch"][clock] / t["CachedMNRL"][clock]
    print(f"time negbatch cached / CachedMNRL ({clock} time) = {ratio:.2f}  goal <= 1.00: "
          f"{'met' if ratio <= 1.0 else 'NOT met'}")
    child = [a for a in argv if a != "--memory-child"] + ["--batch", str(args.batch), "--chunk", str(args.chunk),
                                                          "--threads", str(args.threads), "--device", args.device]
    mib = 2.0**20
    runs = {v: measure_memory(v, child) for v in VARIANTS}
    kind = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"memory ({kind}; each variant in its own process): {'variant':<16} {'peak MiB':>9} {'step MiB':>9}")
    for variant, r in runs.items():
        print(f"  {variant:<16} {r['peak'] / mib:9.1f} {(r['peak'] - r['base']) / mib:9.1f}")
    inc = {v: max(1, r["peak"] - r["base"]) for v, r in runs.items()}
    mem = inc["cached negbatch"] / inc["CachedMNRL"]
    print(f"step memory: negbatch cached / plain {inc['cached negbatch'] / inc['plain negbatch']:.2f}, "
          f"CachedMNRL / plain MNRL {inc['CachedMNRL'] / inc['plain MNRL']:.2f}")
    print(f"memory negbatch cached / CachedMNRL = {mem:.2f}  goal <= 1.00: {'met' if mem <= 1.0 else 'NOT met'}")
    print(f"load average after: {open('/proc/loadavg').read().split()[:3] if os.path.exists('/proc/loadavg') else 'n/a'}")


if __name__ == "__main__":
    main(sys.argv[1:])
