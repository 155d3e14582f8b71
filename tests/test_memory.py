"""The one memory instrument (negbatch.lab.memory), used by the gradcache study and bench/."""

import importlib.util
from pathlib import Path

import torch

from negbatch.lab import memory


def test_peak_rss_sees_a_known_allocation():
    base, source = memory.baseline_rss()
    x = torch.ones(16 * 2**20)  # 64 MiB, touched
    grown = memory.peak_rss(source) - base
    del x
    assert 60 * 2**20 <= grown <= 80 * 2**20, (grown / 2**20, source)


def test_peak_memory_sees_a_transient_allocation():
    with memory.peak_memory() as m:
        x = torch.ones(8 * 2**20)  # 32 MiB, freed before the block ends
        del x
    assert 28 * 2**20 <= m.step_bytes <= 48 * 2**20, (m.step_bytes / 2**20, m.source)
    assert m.peak_bytes - m.base_bytes == m.step_bytes


def test_the_study_and_the_benchmark_use_this_instrument():
    from negbatch.lab.studies import gradcache_measure

    assert gradcache_measure.peak_memory is memory.peak_memory
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_gradcache.py"
    spec = importlib.util.spec_from_file_location("bench_gradcache", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.peak_memory is memory.peak_memory
    assert "_status_kib" not in vars(bench) and "_peak_rss" not in vars(bench)
