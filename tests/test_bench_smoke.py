"""The benchmarks with --quick run to the end and print their ratio lines (slow: `make bench`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
