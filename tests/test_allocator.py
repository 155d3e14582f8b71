"""Freed memory kept in the process during CPU training (negbatch.allocator), read from the
resident set size: a freed block that stays in the heap stays resident; one given back does not."""

import contextlib

import pytest
import torch

from _runs import without_times
from negbatch import allocator
from negbatch.allocator import freed_memory_kept, keeping_freed_memory
from negbatch.data import load_digits
from negbatch.lab import TrainConfig, read_metrics, run, train
from negbatch.lab.memory import status_kib
from negbatch.lab.tasks import image

glibc = pytest.mark.skipif(allocator._glibc() is None or status_kib("VmRSS") is None,
                           reason="the setting is glibc's, read from /proc/self/status")
MIB = 2**20


def rss() -> int:
    return status_kib("VmRSS") * 1024


def resident_after_a_freed_block() -> int:
    """Bytes still resident after 64 MiB were written and freed (above any mmap threshold glibc picks)."""
    before = rss()
    x = torch.ones(16 * MIB)
    del x
    return rss() - before


@glibc
def test_a_freed_block_stays_resident_in_the_block_and_is_given_back_after():
    assert resident_after_a_freed_block() < 16 * MIB  # glibc's own settings: unmapped when freed
    with freed_memory_kept() as applied:
        assert applied and keeping_freed_memory()
        kept = resident_after_a_freed_block()
        inside = rss()
    assert kept > 48 * MIB
    assert not keeping_freed_memory()
    assert rss() < inside - 48 * MIB  # trimmed at the end of the block
    assert resident_after_a_freed_block() < 16 * MIB


@glibc
def test_an_inner_block_leaves_the_setting_to_the_outermost():
    with freed_memory_kept():
        with freed_memory_kept() as inner:
            assert inner
        assert keeping_freed_memory()
        assert resident_after_a_freed_block() > 48 * MIB
    assert not keeping_freed_memory()


def test_work_off_the_cpu_runs_unchanged():
    with freed_memory_kept("cuda") as applied:  # the host's heap is not where a GPU's blocks live
        assert not applied and not keeping_freed_memory()


def test_elsewhere_the_block_runs_unchanged(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    with freed_memory_kept() as applied:
        assert not applied and not keeping_freed_memory()


@glibc
def test_a_cpu_training_step_runs_in_the_block_and_computes_the_same_numbers(tmp_path, monkeypatch):
    digits = load_digits()
    cfg = TrainConfig(n_train=96, n_test=64, batch_size=16, epochs=1, encoder_widths=(16,), head_widths=(16, 8))
    seen = []
    step = image.ImageTask.step

    def recording_step(self, batch, streams):
        seen.append(keeping_freed_memory())
        return step(self, batch, streams)

    monkeypatch.setattr(image.ImageTask, "step", recording_step)
    kept = train(cfg, tmp_path / "kept", data=digits)
    assert seen == [True] * kept["steps"] and not keeping_freed_memory()

    seen.clear()
    monkeypatch.setattr(run, "freed_memory_kept", contextlib.nullcontext)
    plain = train(cfg, tmp_path / "plain", data=digits)
    assert seen == [False] * plain["steps"]
    assert without_times(read_metrics(tmp_path / "kept")) == without_times(read_metrics(tmp_path / "plain"))
    assert kept["linear_acc"] == plain["linear_acc"]


@glibc
def test_sentence_transformers_training_on_the_cpu_runs_in_the_block_too(tmp_path, monkeypatch):
    from negbatch.lab import minilm

    seen = []
    monkeypatch.setattr(minilm, "train_minilm", lambda *args, **kwargs: seen.append(keeping_freed_memory()))
    train(TrainConfig(dataset="bible", encoder="minilm"), tmp_path)
    assert seen == [True] and not keeping_freed_memory()


@glibc
def test_the_retrieval_search_on_the_cpu_runs_in_the_block(monkeypatch):
    from negbatch.evaluation import retrieval

    seen = []
    search = retrieval._rank_blocks

    def recording(*args):
        seen.append(keeping_freed_memory())
        return search(*args)

    monkeypatch.setattr(retrieval, "_rank_blocks", recording)
    g = torch.Generator().manual_seed(0)
    docs = torch.randn(50, 8, generator=g)
    ranks = retrieval.relevant_ranks(docs[:5] + 0.1 * torch.randn(5, 8, generator=g), docs, torch.arange(5),
                                     query_chunk=2, doc_chunk=16)
    assert seen == [True] and not keeping_freed_memory() and ranks.shape == (5,)
