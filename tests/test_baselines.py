"""Baselines: random, hard-negative (k-means) and duplicate-free batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from negbatch.sampling import HardNegativeBatchSampler, NoDuplicateBatchSampler, RandomBatchSampler, kmeans


def planted(n_clusters=6, per=40, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g) * 3
    labels = torch.arange(n_clusters).repeat_interleave(per)[torch.randperm(n_clusters * per, generator=g)]
    return centres[labels] + 0.3 * torch.randn(len(labels), d, generator=g), labels


def purity(batches, labels):
    return float(np.mean([np.bincount(labels[np.asarray(b)].numpy()).max() / len(b) for b in batches]))


def test_random_batches_cover_once_and_change_per_epoch():
    s = RandomBatchSampler(23, 5, seed=4)
    e0, e1 = list(s), list(s)
    for e in (e0, e1):
        assert sorted(i for b in e for i in b) == list(range(23))
        assert [len(b) for b in e].count(3) == 1 and len(e) == len(s) == 5
    assert e0 != e1
    assert len(list(RandomBatchSampler(23, 5, drop_last=True))) == 4


def test_kmeans_recovers_planted_clusters():
    x, labels = planted()
    found = kmeans(x, 6, generator=torch.Generator().manual_seed(1))
    # each found cluster maps to exactly one planted label
    pairs = {(int(a), int(b)) for a, b in zip(found, labels)}
    assert len(pairs) == 6 and len({a for a, _ in pairs}) == 6
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="x holds NaN or inf"):  # it labelled every point 0
        kmeans(x * float("nan"), 3)
    with pytest.raises(ValueError, match="iters must be an int >= 1"):  # no Lloyd step: no labels at all
        kmeans(x, 6, iters=0)
    with pytest.raises(ValueError, match="kmeans_iters must be an int >= 1"):
        HardNegativeBatchSampler(lambda i: (x[i], x[i]), len(x), 40, kmeans_iters=0)


def test_hard_negative_batches_are_pure_and_cover_once():
    x, labels = planted()
    s = HardNegativeBatchSampler(lambda i: (x[i], x[i]), len(x), 40, num_clusters=6, seed=0)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(len(x)))
    assert purity(batches, labels) > 0.9
    assert purity(list(RandomBatchSampler(len(x), 40)), labels) < 0.5


def test_hard_negative_bad_input():
    with pytest.raises(ValueError, match="num_clusters"):
        HardNegativeBatchSampler(lambda i: torch.randn(len(i), 2), 10, 2, num_clusters=11)
    with pytest.raises(ValueError, match="NaN"):
        list(HardNegativeBatchSampler(lambda i: torch.full((len(i), 2), float("nan")), 10, 2))


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 4), min_size=3, max_size=30),
    batch=st.integers(1, 8),
    drop_last=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_no_duplicate_batches_property(counts, batch, drop_last, seed):
    keys = [f"k{g}" for g, c in enumerate(counts) for _ in range(c)]
    n = len(keys)
    if batch > n:
        return
    try:
        s = NoDuplicateBatchSampler(keys, batch, drop_last=drop_last, seed=seed)
    except ValueError as e:
        assert "occurs" in str(e)
        # refused only when a key has more copies than the round-robin layout keeps apart
        nb = n // batch if drop_last else -(-n // batch)
        limit = nb - 1 if (not drop_last and n % batch) else nb
        assert max(counts) > max(limit, 1)
        return
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    assert all(len({keys[i] for i in b}) == len(b) for b in batches)
    assert sorted(len(b) for b in batches)[1:] == [batch] * (len(batches) - 1)
    if drop_last:
        assert len(flat) == (n // batch) * batch
    else:
        assert sorted(flat) == list(range(n))


def test_no_duplicate_keeps_copies_apart_and_is_otherwise_random():
    keys = ["same"] * 5 + [f"u{i}" for i in range(45)]
    s = NoDuplicateBatchSampler(keys, 10, seed=0)
    batches = list(s)
    assert all(sum(keys[i] == "same" for i in b) == 1 for b in batches)
    assert list(s) != batches  # a new epoch, another random layout


def test_no_duplicate_refuses_impossible_keys():
    with pytest.raises(ValueError, match="occurs 4 times"):
        NoDuplicateBatchSampler(["a"] * 4 + ["b"] * 4, 4)
    with pytest.raises(TypeError, match="sequence"):
        NoDuplicateBatchSampler("abc", 1)


def test_refreshed_hard_negative_batches_stay_pure():
    # A refresh re-clusters the samples left into proportionally fewer clusters; with the
    # full num_clusters every later batch straddled clusters (purity 0.68 on this data).
    x, labels = planted(n_clusters=8)
    s = HardNegativeBatchSampler(lambda i: (x[i], x[i]), len(x), 40, num_clusters=8, seed=0, refresh_every=1)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(len(x)))
    without_refresh = list(HardNegativeBatchSampler(lambda i: (x[i], x[i]), len(x), 40, num_clusters=8, seed=0))
    assert purity(batches, labels) >= purity(without_refresh, labels) - 0.02 > 0.85  # k-means' own misses: 0.88


@pytest.mark.parametrize("seed", range(6))
def test_a_padded_short_tail_repeats_no_sample_and_no_key_in_the_global_batch(seed):
    # 4 ranks, a tail of 1 or 2 samples: each rank gets one row, the padding comes from
    # the epoch's other samples (it repeated the tail's own when the tail was planned first).
    def global_batches(make):
        per_rank = [list(make(rank)) for rank in range(4)]
        return [sum((batches[step] for batches in per_rank), []) for step in range(len(per_rank[0]))]

    for batch in global_batches(lambda r: RandomBatchSampler(5, 4, seed=seed, num_replicas=4, rank=r)):
        assert len(set(batch)) == len(batch) == 4
    keys = list("abcddefgh")
    for batch in global_batches(lambda r: NoDuplicateBatchSampler(keys, 4, seed=seed, num_replicas=4, rank=r)):
        assert len({keys[i] for i in batch}) == len(batch) == 4


def test_bad_seed_and_sizes_are_refused_before_any_embedding():
    from negbatch.sampling import GCBSampler

    calls = []

    def embed(i):
        calls.append(len(i))
        return torch.randn(len(i), 2), torch.randn(len(i), 2)

    with pytest.raises(ValueError, match="seed must be >= 0"):
        RandomBatchSampler(10, 4, seed=-1)
    for kw in ({"block_size": 0}, {"block_size": 64.0}, {"chunk_size": -1}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            GCBSampler(embed, 20, 4, **kw)
    with pytest.raises(ValueError, match="chunk_size"):
        HardNegativeBatchSampler(embed, 20, 4, chunk_size=0)
    assert calls == []


def test_a_64_bit_seed_such_as_torch_initial_seed_is_accepted_and_a_larger_one_refused():
    # torch.initial_seed() is a 64-bit value; seed * 1_000_003 overflowed torch's
    # manual_seed ("Overflow when unpacking long long") at the first batch.
    from negbatch.sampling import GCBSampler

    seed = 2**64 - 5
    s = RandomBatchSampler(10, 5, seed=seed, shuffle_batches=False)
    order = torch.randperm(10, generator=torch.Generator().manual_seed((seed * 1_000_003) % 2**64))
    assert list(s) == [order[:5].tolist(), order[5:].tolist()]
    data = torch.randn(10, 3)
    for sampler in (GCBSampler(lambda i: (data[i], data[i]), 10, 5, q=0.9, seed=seed),
                    HardNegativeBatchSampler(lambda i: data[i], 10, 5, seed=seed)):
        assert sorted(i for b in sampler for i in b) == list(range(10))
    with pytest.raises(ValueError, match=r"seed must be below 2\*\*64"):
        RandomBatchSampler(10, 5, seed=2**64)
