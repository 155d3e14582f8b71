"""GCBS: exactness against the paper's dense pseudocode, cluster purity, the
gap, the sampler's epoch/resume/mode behaviour, bad input and DDP."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import reverse_cuthill_mckee
from torch.utils.data import DataLoader, TensorDataset

from negbatch.diagnostics import global_train_gap
from negbatch.sampling import GCBSampler, RandomBatchSampler, gcbs_order, num_kept_entries, similarity_graph
from negbatch.sampling import gcbs as gcbs_module

from _dist import run_distributed


def dense_reference_order(x: torch.Tensor, y: torch.Tensor, q: float) -> np.ndarray:
    """The paper's pseudocode, literally: dense S = XYᵀ, its q-quantile, RCM."""
    xn = torch.nn.functional.normalize(x.double(), dim=1).numpy()
    yn = torch.nn.functional.normalize(y.double(), dim=1).numpy()
    s = xn @ yn.T
    a = sp.csr_matrix(s > np.quantile(s, q))
    return reverse_cuthill_mckee((a + a.T).tocsr(), symmetric_mode=True)


def dense_reference_graph(x, y, q, normalize=True):
    if normalize:
        x, y = torch.nn.functional.normalize(x.double(), dim=1), torch.nn.functional.normalize(y.double(), dim=1)
    s = x.double().numpy() @ y.double().numpy().T
    return s > np.quantile(s, q)


def planted(n_clusters=8, per=50, d=16, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g, dtype=torch.float64) * 2
    labels = torch.arange(n_clusters).repeat_interleave(per)
    perm = torch.randperm(len(labels), generator=g)
    labels = labels[perm]
    x = centres[labels] + noise * torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    y = x + 0.1 * noise * torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    return x, y, labels


def purity(batches, labels):
    return float(np.mean([np.bincount(labels[np.asarray(b)].numpy()).max() / len(b) for b in batches]))


@pytest.mark.parametrize("n,q,block", [(300, 0.99, 64), (257, 0.95, 50), (120, 0.999, 7), (200, 0.9, 1000)])
def test_graph_and_order_equal_dense_pseudocode(n, q, block):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(n, 8, generator=g, dtype=torch.float64)
    graph = similarity_graph(x, y, q, block_size=block)
    dense = dense_reference_graph(x, y, q)
    assert graph.nnz == dense.sum() == num_kept_entries(n * n, q)
    assert np.array_equal(graph.toarray(), dense)
    assert np.array_equal(gcbs_order(x, y, q, block_size=block), dense_reference_order(x, y, q))


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                    (torch.float32, torch.float64)])
def test_half_precision_and_mixed_dtypes_compare_in_float32_or_wider(dtypes):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 8, generator=g).to(dtypes[0])
    y = (x.float() + 0.5 * torch.randn(60, 8, generator=g)).to(dtypes[1])
    wide = torch.promote_types(torch.promote_types(*dtypes), torch.float32)
    graph = similarity_graph(x, y, 0.95)
    assert np.array_equal(graph.toarray(), similarity_graph(x.to(wide), y.to(wide), 0.95).toarray())
    assert graph.nnz == num_kept_entries(60 * 60, 0.95)


def test_pruning_and_fallback_paths_stay_exact(monkeypatch):
    x, y, _ = planted(per=40, seed=3)
    q = 0.97
    dense = dense_reference_graph(x, y, q)
    # no sampled floor (too few samples): the running threshold alone, with many prunes
    small = similarity_graph(x, y, q, block_size=16, estimate_samples=10)
    assert np.array_equal(small.toarray(), dense)
    # a floor above the true threshold must be detected and the pass redone
    monkeypatch.setattr(gcbs_module, "_sampled_floor", lambda *a, **k: 0.99999)
    assert np.array_equal(similarity_graph(x, y, q, block_size=32).toarray(), dense)


@pytest.mark.parametrize("n,q,block,values", [(120, 0.99, 16, 3), (90, 0.9, 1000, 2), (150, 0.999, 32, 4),
                                               (64, 0.95, 8, 1)])
def test_ties_at_the_quantile_are_left_out_as_the_dense_pseudocode_does(n, q, block, values):
    """Integer embeddings: XYᵀ takes few values, so the quantile falls on a
    tied value, which ``S > t`` leaves out (fewer than k entries kept). With
    one value (a collapsed encoder) nothing is kept, and nothing near N²
    entries is ever held."""
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, values, (n, 3), generator=g, dtype=torch.float64)
    y = torch.randint(0, values, (n, 3), generator=g, dtype=torch.float64)
    if values == 1:
        x = y = torch.ones(n, 3, dtype=torch.float64)
    dense = dense_reference_graph(x, y, q, normalize=False)
    assert dense.sum() < num_kept_entries(n * n, q)  # the quantile is a tied value here
    for floor in (True, False):
        graph = similarity_graph(x, y, q, block_size=block, normalize=False, estimate_samples=10**6 if floor else 1)
        assert np.array_equal(graph.toarray(), dense), floor


def test_a_collapsed_encoder_holds_o_k_entries(monkeypatch):
    held = []
    prune = gcbs_module._LargestEntries.prune

    def watched(self):
        held.append(self.held)
        prune(self)

    monkeypatch.setattr(gcbs_module._LargestEntries, "prune", watched)
    n, block = 600, 50
    graph = similarity_graph(torch.ones(n, 4), torch.ones(n, 4), 0.999, block_size=block)
    k = num_kept_entries(n * n, 0.999)
    assert graph.nnz == 0 and held and max(held) <= 2 * k + 2 * block * block


def test_num_kept_entries_matches_numpy_quantile():
    v = np.random.default_rng(0).standard_normal(12345)
    for q in (0.5, 0.9, 0.999, 0.12345):
        assert (v > np.quantile(v, q)).sum() == num_kept_entries(v.size, q)


def test_planted_clusters_batches_far_purer_than_random():
    x, y, labels = planted()
    order = gcbs_order(x, y, q=0.95)
    gcbs_batches = [order[i : i + 50] for i in range(0, len(order), 50)]
    rand = list(RandomBatchSampler(len(labels), 50, seed=0))
    assert purity(gcbs_batches, labels) > 0.9
    assert purity(rand, labels) < 0.4


def test_gcbs_shrinks_the_gap_against_random_batches():
    x, y, labels = planted(noise=0.6)
    sampler = GCBSampler(lambda i: (x[i], y[i]), len(x), 40, q=0.95)
    g_gcbs = global_train_gap((x, y), list(sampler), 0.1)
    gaps_random = [global_train_gap((x, y), list(RandomBatchSampler(len(x), 40, seed=s)), 0.1).gap for s in range(3)]
    assert g_gcbs.gap < 0.5 * min(gaps_random)


class _Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.frozen = torch.nn.BatchNorm1d(4)


def test_sampler_in_dataloader_eval_mode_no_grad_and_mode_restored():
    data = torch.randn(103, 4)
    model = _Probe()
    model.train()
    model.frozen.eval()  # a submodule the user froze must stay frozen
    seen = []

    def embed(i):
        assert not model.training and not model.lin.training
        assert not torch.is_grad_enabled()
        seen.append(len(i))
        z = model.lin(data[i])
        return z, z + 0.01

    sampler = GCBSampler(embed, 103, 10, model=model, q=0.9, chunk_size=25, progress=True)
    loader = DataLoader(TensorDataset(data), batch_sampler=sampler)
    sizes = [len(b[0]) for b in loader]
    assert sorted(sizes) == [3] + [10] * 10 and len(loader) == 11
    assert seen == [25, 25, 25, 25, 3]
    assert model.training and model.lin.training and not model.frozen.training
    flat = sorted(i for b in GCBSampler(embed, 103, 10, model=model, q=0.9, drop_last=True) for i in b)
    assert len(flat) == 100 and len(set(flat)) == 100


def test_set_epoch_reshuffles_batches_and_is_deterministic():
    x, y, _ = planted()
    mk = lambda: GCBSampler(lambda i: (x[i], y[i]), len(x), 40, q=0.95, seed=7)
    a, b = mk(), mk()
    e0 = list(a)
    assert list(b) == e0  # same seed, same epoch
    b.set_epoch(0)
    assert list(b) == e0
    b.set_epoch(5)
    e5 = list(b)
    assert sorted(map(tuple, map(sorted, e5))) == sorted(map(tuple, map(sorted, e0)))  # same batches
    assert e5 != e0  # in another order
    # without set_epoch, the next iteration is the next epoch
    c = mk()
    c.set_epoch(1)
    assert list(a) == list(c)


def test_resume_mid_epoch_continues_with_the_saved_plan(tmp_path):
    x, y, _ = planted()
    sampler = GCBSampler(lambda i: (x[i], y[i]), len(x), 40, q=0.95, seed=1)
    it = iter(sampler)
    first = [next(it) for _ in range(3)]
    state = sampler.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"sampler": state}, path)
    rest = list(it)
    # the resumed run has a different model: the saved plan, not a new one, must be used
    resumed = GCBSampler(lambda i: (torch.randn(len(i), 16), torch.randn(len(i), 16)), len(x), 40, q=0.95, seed=1)
    resumed.load_state_dict(torch.load(path, weights_only=True)["sampler"])
    assert list(resumed) == rest
    assert sorted(i for b in first + rest for i in b) == list(range(len(x)))
    # the trainer may override the position (prefetching DataLoaders run ahead)
    again = GCBSampler(lambda i: (x[i], y[i]), len(x), 40, q=0.95, seed=1)
    again.load_state_dict(state | {"position": 1})
    assert list(again) == first[1:] + rest


def test_a_checkpoint_taken_while_the_loader_runs_ahead_resumes_the_trainer_epoch():
    """A DataLoader with workers drains the sampler before training ends the
    epoch (and past refresh points): the trainer's epoch and position decide."""
    x, y, _ = planted()
    sampler = GCBSampler(lambda i: (x[i], y[i]), len(x), 40, q=0.95, seed=1, refresh_every=2)
    batches = list(sampler)  # the loader has finished epoch 0; the trainer has done 3 steps of it
    assert sampler.epoch == 1
    state = sampler.state_dict(position=3, epoch=0)
    assert state["epoch"] == 0 and state["position"] == 3
    # Another model: the saved plan, refreshed at 2, 4, 6 and 8, must be used as it is.
    resumed = GCBSampler(lambda i: (torch.randn(len(i), 16), torch.randn(len(i), 16)), len(x), 40, q=0.95,
                         seed=1, refresh_every=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    assert list(resumed) == batches[3:]
    following = sampler.state_dict(position=0, epoch=1)  # the trainer finished epoch 0 too
    assert following["epoch"] == 1 and following["plan"] is None
    with pytest.raises(ValueError, match="pass the trainer's epoch"):
        sampler.state_dict(position=0, epoch=3)



def test_state_dict_refuses_a_position_the_epoch_does_not_have():
    """position=100 in an epoch of 10 batches (or -1, or 2.7) was saved as is: the
    checkpoint was written, and the run failed only when it resumed from it."""
    sampler = RandomBatchSampler(40, 4, seed=0)
    it = iter(sampler)
    next(it)
    assert sampler.state_dict(position=10)["position"] == 10  # the epoch's end is a position
    for bad in (11, 100):
        with pytest.raises(ValueError, match=f"position={bad} is past the end of epoch 0, which has 10 batches"):
            sampler.state_dict(position=bad)
    for bad in (-1, 2.7, "3", True):
        with pytest.raises(ValueError, match=r"position must be an int >= 0"):
            sampler.state_dict(position=bad)
    with pytest.raises(ValueError, match=r"epoch must be an int >= 0"):
        sampler.state_dict(position=1, epoch="0")
    list(it)  # the epoch is finished: a position in it is still checked against its plan
    assert sampler.state_dict(position=10, epoch=0)["position"] == 10
    with pytest.raises(ValueError, match="past the end of epoch 0"):
        sampler.state_dict(position=11, epoch=0)


def test_a_state_of_another_seed_is_refused():
    # Loaded, it resumed this epoch as saved and then planned every later epoch with the other seed.
    sampler = RandomBatchSampler(40, 4, seed=0)
    next(iter(sampler))
    state = sampler.state_dict(position=1)
    with pytest.raises(ValueError, match="state was saved with seed=0 but this sampler has seed=1"):
        RandomBatchSampler(40, 4, seed=1).load_state_dict(state)
    RandomBatchSampler(40, 4, seed=0).load_state_dict(state)


def test_a_state_of_another_kind_of_sampler_is_refused_by_name():
    """A GCBSampler's state loaded into a RandomBatchSampler (and back) without
    a word: the GCBS plan resumed as random batches, and every later epoch
    was planned by the other kind. The refused load changes nothing; a state
    saved before the kind was recorded still loads."""
    x, y, _ = planted(n_clusters=4, per=10)
    kinds = {"GCBSampler": lambda: GCBSampler(lambda i: (x[i], y[i]), 40, 4, q=0.9, seed=0),
             "RandomBatchSampler": lambda: RandomBatchSampler(40, 4, seed=0)}
    for saved, loading in (("GCBSampler", "RandomBatchSampler"), ("RandomBatchSampler", "GCBSampler")):
        sampler = kinds[saved]()
        next(iter(sampler))
        state = sampler.state_dict(position=1)
        assert state["kind"] == saved
        other = kinds[loading]()
        with pytest.raises(ValueError, match=f"state was saved by a {saved}, but this sampler is a {loading}: "
                                             f"resume with a {saved}"):
            other.load_state_dict(state)
        assert other.state_dict()["plan"] is None and other.epoch == 0
        resumed = kinds[saved]()
        resumed.load_state_dict({k: v for k, v in state.items() if k != "kind"})  # saved before kinds were recorded
        assert len(list(resumed)) == 9  # the rest of the saved epoch


def test_a_state_of_another_drop_last_is_refused():
    # Loaded, the resumed epoch yielded the saved short tail (41 = 4 x 10 + 1) from a
    # drop_last=True sampler whose len() said 4 batches, or lost the tail the other way round.
    for saved, loading in ((False, True), (True, False)):
        sampler = RandomBatchSampler(41, 10, drop_last=saved)
        next(iter(sampler))
        state = sampler.state_dict()
        with pytest.raises(ValueError, match=f"saved with drop_last={saved} but this sampler has drop_last={loading}"):
            RandomBatchSampler(41, 10, drop_last=loading).load_state_dict(state)
        resumed = RandomBatchSampler(41, 10, drop_last=saved)
        resumed.load_state_dict(state)
        assert len(list(resumed)) == len(resumed) - 1

def counting_embed():
    """The planted data's embed_fn, and the list of how many samples each call embedded."""
    x, y, _ = planted()
    calls = []

    def embed(i):
        calls.append(len(i))
        return x[i], y[i]

    return embed, calls, len(x)


def test_refresh_every_replans_the_rest_and_covers_once():
    embed, calls, n = counting_embed()
    sampler = GCBSampler(embed, n, 40, q=0.95, refresh_every=3, chunk_size=1000)
    batches = list(sampler)
    assert len(batches) == 10
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert calls == [400, 280, 160, 40]


@pytest.mark.parametrize("via_set_epoch", [False, True])
def test_refresh_every_refreshes_in_every_epoch(via_set_epoch):
    # 10 batches and refresh_every=6: one refresh per epoch, at batch 6, in every epoch.
    embed, calls, n = counting_embed()
    sampler = GCBSampler(embed, n, 40, q=0.95, refresh_every=6, chunk_size=1000)
    for epoch in range(3):
        if via_set_epoch:
            sampler.set_epoch(epoch)
        assert sorted(i for b in sampler for i in b) == list(range(n))
    assert calls == [400, 160] * 3


def test_drop_last_leaves_out_other_samples_each_epoch():
    # 400 samples, batches of 64: 16 left out per epoch. With fixed embeddings the GCBS
    # order is the same every epoch; the left-out run must move with the epoch's stream.
    x, y, _ = planted()
    sampler = GCBSampler(lambda i: (x[i], y[i]), len(x), 64, q=0.95, drop_last=True)
    left_out = []
    for _ in range(4):
        batches = list(sampler)
        assert all(len(b) == 64 for b in batches) and len(batches) == 6
        seen = [i for b in batches for i in b]
        assert len(set(seen)) == len(seen)
        left_out.append(frozenset(range(len(x))) - set(seen))
    assert all(len(s) == 16 for s in left_out) and len(set(left_out)) == 4


def test_cut_into_batches_leaves_out_a_consecutive_run_at_a_random_place():
    from negbatch.sampling.epoch_sampler import cut_into_batches

    order = np.arange(100)[::-1].copy()
    starts = set()
    for seed in range(20):
        kept = np.concatenate(cut_into_batches(order, 16, True, np.random.default_rng(seed)))
        out = sorted(set(order) - set(kept.tolist()))
        assert len(kept) == 96 and len(out) == 4 and out == list(range(out[0], out[0] + 4))
        assert kept.tolist() == [v for v in order.tolist() if v not in out]  # order otherwise kept
        starts.add(out[0])
    assert len(starts) > 5
    assert np.concatenate(cut_into_batches(order, 16, True)).tolist() == order[:96].tolist()  # no rng: the tail
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        cut_into_batches(order, 0, False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch_size": 500}, "batch_size"),
        ({"q": 0.0}, "q must be"),
        ({"q": 1.0}, "q must be"),
        ({"q": 1.5}, "q must be"),
        ({"method": "dense"}, "method"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"embed_fn": lambda i: (torch.randn(len(i), 3),) * 2, "num_samples": 100, "batch_size": 10} | kwargs
    GCBSampler(lambda i: (torch.randn(len(i), 3),) * 2, 100, 10, q=np.float32(0.9))  # a numpy float q is a float
    with pytest.raises(ValueError, match=match):
        GCBSampler(**args)


@pytest.mark.parametrize(
    "embed,exc,match",
    [
        (lambda i: (torch.randn(len(i) - 1, 3), torch.randn(len(i) - 1, 3)), ValueError, "expected"),
        (lambda i: (torch.randn(len(i), 3), torch.randn(len(i), 4)), ValueError, "widths"),
        (lambda i: torch.randn(len(i), 3), TypeError, "pair"),
        (lambda i: (torch.full((len(i), 3), float("nan")), torch.randn(len(i), 3)), ValueError, "NaN"),
        (lambda i: (torch.randn(len(i)), torch.randn(len(i))), ValueError, "shape"),
    ],
)
def test_bad_embeddings_get_clear_errors(embed, exc, match):
    with pytest.raises(exc, match=match):
        list(GCBSampler(embed, 50, 10, q=0.9))


def test_similarity_graph_rejects_nan_and_mismatch():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="NaN"):
        similarity_graph(x.clone().fill_(float("nan")), x)
    with pytest.raises(ValueError, match="same shape"):
        similarity_graph(x, x[:5])


def _entries_at_least_kth(dense: torch.Tensor, k: int) -> set[tuple[int, int]]:
    """Brute force: every entry >= the k-th largest of a dense matrix, less
    the value tied across the k-th and (k+1)-th largest (S > quantile's rule)."""
    ordered = torch.sort(dense.reshape(-1), descending=True).values
    kth = ordered[k - 1]
    kept = dense > kth if k < ordered.numel() and ordered[k] == kth else dense >= kth
    return {(int(r), int(c)) for r, c in kept.nonzero().tolist()}


@pytest.mark.parametrize("k, slack", [(1, 0), (37, 0), (37, 50), (400, 10)])
def test_largest_entries_streamed_in_pieces_equal_a_full_sort(k, slack):
    from negbatch.sampling.gcbs import _LargestEntries

    g = torch.Generator().manual_seed(k + slack)
    dense = torch.randint(-4, 5, (30, 20), generator=g).float()  # integers: many exact ties
    top = _LargestEntries(k, slack=slack)
    for i in range(0, 30, 7):  # uneven pieces, pruned along the way
        r, c = torch.meshgrid(torch.arange(i, min(i + 7, 30)), torch.arange(20), indexing="ij")
        top.add(dense[i : i + 7].reshape(-1), r.reshape(-1), c.reshape(-1))
    v, r, c = top.result()
    assert set(zip(r.tolist(), c.tolist())) == _entries_at_least_kth(dense, k)
    assert torch.equal(v, dense[r.long(), c.long()])


def test_faiss_search_in_blocks_with_every_neighbour_is_exact():
    pytest.importorskip("faiss")
    from negbatch.sampling.gcbs import _faiss_top

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (300, 8), generator=g).float()  # integer products: faiss and torch agree exactly
    y = torch.randint(-3, 4, (300, 8), generator=g).float()
    for k, block in ((50, 16), (2000, 64), (2000, 300)):
        v, r, c = _faiss_top(x, y, k, neighbours=300, nprobe=10_000, seed=0, block=block)
        assert set(zip(r.tolist(), c.tolist())) == _entries_at_least_kth(x @ y.T, k)


def test_faiss_path_approximates_the_exact_graph():
    pytest.importorskip("faiss")
    x, y, labels = planted()
    exact = similarity_graph(x, y, 0.95)
    approx = similarity_graph(x, y, 0.95, method="faiss")
    overlap = exact.multiply(approx).nnz / exact.nnz
    assert overlap > 0.95
    order = gcbs_order(x, y, 0.95, method="faiss")
    assert purity([order[i : i + 50] for i in range(0, 400, 50)], labels) > 0.9


# -- DDP ---------------------------------------------------------------------------

def _ddp_body(rank, world, out_dir, n, batch, drop_last):
    x, y, _ = planted(per=n // 8 + 1)
    x, y = x[:n].float(), y[:n].float()
    calls = []

    def embed(i):
        calls.append(i.tolist())
        return x[i], y[i]

    sampler = GCBSampler(embed, n, batch, q=0.95, seed=3, drop_last=drop_last)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    with open(os.path.join(out_dir, f"r{rank}.pkl"), "wb") as f:
        pickle.dump({"epochs": epochs, "calls": calls}, f)


DDP_CASES = [(102, 20, False), (100, 20, True)]


def _ddp_cases(rank, world, out_dir):
    for n, batch, drop_last in DDP_CASES:
        os.makedirs(os.path.join(out_dir, str(n)), exist_ok=True)
        _ddp_body(rank, world, os.path.join(out_dir, str(n)), n, batch, drop_last)
    _baselines_ddp_body(rank, world, out_dir)


@pytest.fixture(scope="module")
def ddp_plans(tmp_path_factory):
    """GCBS's cases and the baselines' in one spawn of two processes (starting them is the slow part)."""
    out = tmp_path_factory.mktemp("ddp")
    run_distributed(_ddp_cases, 2, str(out))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("n,batch,drop_last", DDP_CASES)
def test_ddp_ranks_agree_and_cover_each_sample_once(ddp_plans, n, batch, drop_last):
    tmp_path = ddp_plans / str(n)
    r0, r1 = (pickle.load(open(tmp_path / f"r{r}.pkl", "rb")) for r in (0, 1))
    # each rank embedded only its half of the data, every epoch
    assert sorted(sum(r0["calls"] + r1["calls"], [])) == sorted(list(range(n)) * 2)
    x, y, _ = planted(per=n // 8 + 1)
    single = GCBSampler(lambda i: (x[:n].float()[i], y[:n].float()[i]), n, batch, q=0.95, seed=3,
                        drop_last=drop_last, num_replicas=1, rank=0)
    for epoch in range(2):
        a, b = r0["epochs"][epoch], r1["epochs"][epoch]
        assert len(a) == len(b) == len(single)
        merged = [p + q for p, q in zip(a, b)]
        single.set_epoch(epoch)
        assert merged == list(single)  # the identical global plan on both ranks
        flat = sorted(i for m in merged for i in m)
        expected = list(range(n)) if not drop_last else sorted(i for m in list(single) for i in m)
        assert flat == expected and len(set(flat)) == len(flat)


def _nan_on_one_rank(rank, world):
    import torch.distributed as dist

    from negbatch.sampling.epoch_sampler import EpochBatchSampler

    x, y, _ = planted(per=6)  # 48 samples: rank 0 embeds 0-23, rank 1 24-47

    def embed(i):
        xs = x[i].float()
        if rank == 1:
            xs[0] = float("nan")  # sample 24, embedded by rank 1 only
        return xs, y[i].float()

    with pytest.raises(ValueError, match=r"embed_fn returned NaN or inf in X for 1 sample\(s\) \(e.g. indices "
                                         r"\[24\]\), embedded by rank 1 \(every rank raises"):
        GCBSampler(embed, 48, 8, q=0.9).plan()
    dist.barrier()  # both ranks are in step: neither waits in the embeddings' gather

    class Unplannable(EpochBatchSampler):
        def plan_batches(self, indices, prepared, rng):
            raise ValueError("no plan for these samples")

    # Rank 0 plans alone; its error reaches the ranks waiting for the plan.
    with pytest.raises(ValueError if rank == 0 else RuntimeError, match="no plan for these samples"):
        Unplannable(48, 8).plan()
    dist.barrier()


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_ddp_nan_embeddings_or_a_failed_plan_raise_on_every_rank():
    """NaN in the embeddings of one rank's share: every rank raises, naming the sample and the
    rank (only that rank did, and the other waited in the gather); an error while rank 0 plans
    is sent to the ranks waiting for the plan. Collectives time out after 60 s: a hang fails."""
    run_distributed(_nan_on_one_rank, 2, timeout=60)


def _baselines_ddp_body(rank, world, out_dir):
    from negbatch.sampling import HardNegativeBatchSampler, NoDuplicateBatchSampler

    x, _, _ = planted(per=12)
    keys = [i % 30 for i in range(96)]
    samplers = {
        "random": RandomBatchSampler(96, 16, seed=2),
        "hard": HardNegativeBatchSampler(lambda i: x[i].float(), 96, 16, seed=2),
        "nodup": NoDuplicateBatchSampler(keys, 16, seed=2),
    }
    out = {}
    for name, s in samplers.items():
        it = iter(s)
        head = [next(it) for _ in range(2)]
        state = s.state_dict()
        s.load_state_dict(state)  # resume on every rank from the saved position
        out[name] = head + list(s)
    with open(os.path.join(out_dir, f"b{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)


@pytest.mark.distributed
def test_ddp_baselines_ranks_agree_and_resume(ddp_plans):
    tmp_path = ddp_plans
    r0, r1 = (pickle.load(open(tmp_path / f"b{r}.pkl", "rb")) for r in (0, 1))
    keys = [i % 30 for i in range(96)]
    for name in r0:
        merged = [a + b for a, b in zip(r0[name], r1[name])]
        assert len(merged) == 6 and all(len(a) == len(b) == 8 for a, b in zip(r0[name], r1[name]))
        assert sorted(i for m in merged for i in m) == list(range(96)), name
        if name == "nodup":
            assert all(len({keys[i] for i in m}) == 16 for m in merged)


@pytest.mark.cuda
def test_cuda_blockwise_graph_equals_cpu():
    x, y, _ = planted()
    cpu = similarity_graph(x, y, 0.97, block_size=64)
    gpu = similarity_graph(x.cuda(), y.cuda(), 0.97, block_size=64)
    assert np.array_equal(cpu.toarray(), gpu.toarray())


def test_load_state_dict_rejects_foreign_state():
    s = RandomBatchSampler(50, 10)
    next(iter(s))
    state = s.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        RandomBatchSampler(50, 5).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        RandomBatchSampler(50, 10).load_state_dict(state | {"position": 9})
    with pytest.raises(ValueError, match="missing"):
        RandomBatchSampler(50, 10).load_state_dict({"epoch": 0})
    # A checkpoint's missing entry (None), or an edited epoch or position: refused by name,
    # not a bare TypeError, a position cut to an int, or a negative epoch that failed a plan later.
    with pytest.raises(TypeError, match="state must be the dict made by state_dict"):
        RandomBatchSampler(50, 10).load_state_dict(None)
    for edit in ({"epoch": -3}, {"position": 0.5}, {"epoch": "1"}, {"position": True}):
        key = next(iter(edit))
        with pytest.raises(ValueError, match=f"state's {key} must be an int >= 0"):
            RandomBatchSampler(50, 10).load_state_dict(state | edit)
    resumed = RandomBatchSampler(50, 10)
    resumed.load_state_dict(state | {"epoch": np.int64(0), "position": torch.tensor(1)})
    assert len(list(resumed)) == 4


@pytest.mark.parametrize("edit, match", [
    (lambda st: st["plan"].__setitem__(-1, 999), r"indices in \[0, 999\], outside this sampler's \[0, 47\)"),
    (lambda st: st["plan"].__setitem__(-1, -3), r"indices in \[-3, "),
    (lambda st: st["plan"].__setitem__(-1, int(st["plan"][-2])), "repeats a data-set index"),
    (lambda st: st.__setitem__("plan_sizes", torch.tensor([5] * 11)), "adding up to the plan's 47 indices"),
    (lambda st: st.__setitem__("plan_sizes", torch.tensor([5] * 8 + [0, 5])), "positive batch sizes"),
    (lambda st: st.__setitem__("plan", st["plan"].double()), "1-d integer tensor"),
])
def test_load_state_dict_checks_the_saved_plan_and_changes_nothing_when_it_refuses(edit, match):
    """An edited or foreign plan would feed a Dataset unknown, negative
    (read from the end) or repeated indices, or an empty batch."""
    s = RandomBatchSampler(47, 5, seed=1)
    next(iter(s))
    state = s.state_dict()
    state["plan"] = state["plan"].clone()
    edit(state)
    target = RandomBatchSampler(47, 5, seed=1)  # the same seed: another would be refused first
    target.set_epoch(3)
    before = target.state_dict()
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    after = target.state_dict()
    assert after["epoch"] == before["epoch"] == 3 and after["plan"] is None and before["plan"] is None
