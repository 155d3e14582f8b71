"""The trainer's ``sampler`` field (random, gcbs, hard) and its per-epoch
diagnostics, against independent references."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import reverse_cuthill_mckee

from _runs import without_times
from negbatch.data import load_digits
from negbatch.lab import TrainConfig, read_metrics, train
from negbatch.lab.run import CHECKPOINT
from negbatch.lab.tasks.image import build_model, build_sampler
from negbatch.sampling import RandomBatchSampler

TINY = dict(n_train=96, n_test=64, batch_size=16, epochs=3, encoder_widths=(16,), head_widths=(16, 8), knn_k=5,
            gcbs_q=0.95)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def tiny(**kw):
    return TrainConfig(**{**TINY, **kw})




def batches(sampler):
    """The sampler's current epoch, as LongTensors."""
    return [torch.as_tensor(b) for b in sampler.plan()]


def random_sampler(n, batch_size, seed):
    """The image task's random batches: a permutation per (seed, epoch), tail dropped."""
    return RandomBatchSampler(n, batch_size, seed=seed, drop_last=True, shuffle_batches=False, num_replicas=1, rank=0)


def reference_gap(z: torch.Tensor, batches, tau: float) -> float:
    """mean over anchors of log-sum-exp over all N minus over the anchor's batch, float64 loop."""
    z = torch.nn.functional.normalize(z.double(), dim=1)
    total, count = 0.0, 0
    for batch in batches:
        batch = [int(i) for i in batch]
        for i in batch:
            s_all = [float(z[i] @ z[j]) / tau for j in range(z.shape[0])]
            s_in = [float(z[i] @ z[j]) / tau for j in batch]
            m = max(s_all)
            total += (m + math.log(sum(math.exp(s - m) for s in s_all))) - (m + math.log(sum(math.exp(s - m) for s in s_in)))
            count += 1
    return total / count


def reference_gcbs_batches(z: torch.Tensor, q: float, batch_size: int) -> set:
    """The paper's dense pseudocode: S = Z Zᵀ, keep S > its q-quantile, RCM on A + Aᵀ, cut, drop the tail.

    With both sides equal, S is symmetric and every off-diagonal value occurs
    twice, so the quantile often falls on a mirrored pair, which ``S >
    quantile`` drops (docs/gcbs.md "Ties"), as the library does.
    """
    zn = torch.nn.functional.normalize(z.double(), dim=1).numpy()
    s = zn @ zn.T
    a = sp.csr_matrix(s > np.quantile(s, q))
    order = reverse_cuthill_mckee((a + a.T).tocsr(), symmetric_mode=True)
    n_full = len(order) // batch_size
    return {frozenset(order[i * batch_size:(i + 1) * batch_size].tolist()) for i in range(n_full)}


def test_random_with_gap_logging_trains_identically(tmp_path, digits):
    plain = train(tiny(), tmp_path / "plain", data=digits)
    logged = train(tiny(log_gap=True), tmp_path / "logged", data=digits)
    rows_p, rows_l = without_times(read_metrics(tmp_path / "plain")), without_times(read_metrics(tmp_path / "logged"))
    # The diagnostic reads the model without changing it or any random stream.
    assert [{k: r[k] for k in rp} for rp, r in zip(rows_p, rows_l)] == rows_p
    for key in ("linear_acc", "knn_acc", "final_loss", "silhouette"):
        assert plain[key] == logged[key]
    assert "sampler_seconds" not in plain and "gap" not in rows_p[0]
    steps_per_epoch = 96 // 16
    gap_rows = [r for r in rows_l if "gap" in r]
    assert [r["step"] for r in gap_rows] == [1 + e * steps_per_epoch for e in range(3)]
    assert all(r["gap"] >= 0 for r in gap_rows) and logged["final_gap"] == gap_rows[-1]["gap"]


def test_gcbs_batches_equal_the_dense_pseudocode(digits):
    cfg = tiny(sampler="gcbs", gcbs_q=0.9)
    data = digits.subset(96, 64)
    torch.manual_seed(0)
    model = build_model(cfg, data.image_shape)
    model.train()
    sampler = build_sampler(cfg, data.x_train, model)
    sampler.set_epoch(0)
    got = {frozenset(b.tolist()) for b in batches(sampler)}
    assert model.training and all(m.training for m in model.modules())  # mode restored
    model.eval()
    with torch.no_grad():
        z = model(data.x_train)
    assert got == reference_gcbs_batches(z, 0.9, 16)
    assert len(got) == 96 // 16


def test_hard_batches_are_the_library_plan_on_eval_embeddings(digits):
    # The library's k-means batching is tested in test_baselines.py; here the trainer's wiring:
    # which embeddings (projections of the un-augmented images, eval mode), seed, tail dropped.
    from negbatch.sampling import HardNegativeBatchSampler

    cfg = tiny(sampler="hard", seed=3)
    data = digits.subset(100, 64)
    model = build_model(cfg, data.image_shape)
    model.train()
    sampler = build_sampler(cfg, data.x_train, model)
    sampler.set_epoch(0)
    got = [b.tolist() for b in batches(sampler)]
    model.eval()
    with torch.no_grad():
        z = model(data.x_train)
    reference = HardNegativeBatchSampler(lambda i: z[i], 100, 16, drop_last=True, seed=3, num_replicas=1, rank=0)
    assert got == list(reference)
    # and the batches are tighter than random ones: mean in-batch cosine distance
    # (an untrained model's embeddings are nearly collinear, hence a ratio)
    zn = torch.nn.functional.normalize(z, dim=1)
    spread = lambda bs: float(sum(1 - (zn[b] @ zn[b].T).mean() for b in bs) / len(bs))  # noqa: E731
    assert spread(got) < 0.8 * spread(batches(random_sampler(100, 16, 3)))


def test_gcbs_and_hard_cover_each_sample_at_most_once_per_epoch(digits):
    data = digits.subset(100, 64)  # 100 = 6 * 16 + 4: the short tail is dropped like the random sampler's
    for name in ("gcbs", "hard"):
        cfg = tiny(sampler=name)
        model = build_model(cfg, data.image_shape)
        sampler = build_sampler(cfg, data.x_train, model)
        assert len(sampler) == len(random_sampler(100, 16, 0)) == 6
        for epoch in range(2):
            sampler.set_epoch(epoch)
            flat = torch.cat(list(batches(sampler)))
            assert flat.numel() == 96 and flat.unique().numel() == 96, name


@pytest.mark.parametrize(
    "kw, stop",
    [
        (dict(sampler="gcbs", checkpoint_every=4), 5),  # mid-epoch: the saved plan and position are used
        (dict(sampler="gcbs", refresh_every=2, log_gap=True), 8),  # mid-epoch at a refresh point
        (dict(sampler="hard", log_gap=True), 6),  # epoch boundary
        # workers: the loader drains the epoch's batches (and refreshes) before step 5 of 6 ends
        (dict(sampler="gcbs", refresh_every=2, num_workers=2), 5),
    ],
)
def test_resumed_run_equals_uninterrupted(tmp_path, digits, kw, stop):
    cfg = tiny(**kw)
    full = train(cfg, tmp_path / "full", data=digits)
    assert train(cfg, tmp_path / "cut", data=digits, stop_after=stop) is None
    ckpt = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert {"epoch", "position", "plan", "plan_sizes"} <= set(ckpt["sampler"])
    resumed = train(cfg, tmp_path / "cut", data=digits)
    assert without_times(read_metrics(tmp_path / "full")) == without_times(read_metrics(tmp_path / "cut"))
    for key in ("linear_acc", "knn_acc", "silhouette", "final_loss"):
        assert full[key] == resumed[key], key


@pytest.mark.parametrize("sampler, learnable", [("random", False), ("gcbs", False), ("random", True)])
def test_logged_gap_equals_a_loop_on_the_epoch_start_model(tmp_path, digits, sampler, learnable):
    cfg = tiny(sampler=sampler, log_gap=True, epochs=2, learnable_temperature=learnable)
    per_epoch = 96 // 16
    # The model at the start of epoch 1, then the plan of epoch 1 (after its first step).
    train(cfg, tmp_path / "a", data=digits, stop_after=per_epoch)
    state = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)
    train(cfg, tmp_path / "b", data=digits, stop_after=per_epoch + 1)
    plan_state = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["sampler"]
    logged = [r for r in read_metrics(tmp_path / "b") if r["step"] == per_epoch + 1][0]

    data = digits.subset(96, 64)
    model = build_model(cfg, data.image_shape)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        z = model(data.x_train)
    if sampler == "random":
        rs = random_sampler(96, 16, cfg.seed)
        rs.set_epoch(1)
        batches = [torch.as_tensor(b) for b in rs.plan()]
    else:
        batches = torch.split(plan_state["plan"], plan_state["plan_sizes"].tolist())
        assert {frozenset(b.tolist()) for b in batches} == reference_gcbs_batches(z, cfg.gcbs_q, 16)
    # The temperature the loss trains at then (a learnable one's value at the epoch start, not its first).
    log_scale = {k: v for k, v in state["loss"].items() if k.endswith("log_scale")}
    temperature = math.exp(-float(next(iter(log_scale.values())).clamp(0, math.log(100)))) if learnable \
        else cfg.temperature
    assert not learnable or abs(temperature - cfg.temperature) > 1e-4  # it has moved: the case can fail
    assert logged["gap"] == pytest.approx(reference_gap(z, batches, temperature), rel=1e-5, abs=1e-6)
    assert logged["gap_global_loss"] - logged["gap_train_loss"] == pytest.approx(logged["gap"], abs=1e-5)
    y = data.y_train.tolist()
    pairs = [(i, j) for b in batches for i in b.tolist() for j in b.tolist() if i != j]
    assert logged["same_class_pairs"] == pytest.approx(sum(y[i] == y[j] for i, j in pairs) / len(pairs))
    if sampler == "gcbs":
        assert logged["order_seconds"] >= 0 and logged["embed_seconds"] >= 0


def test_sampler_timings_in_summary(tmp_path, digits):
    s = train(tiny(sampler="gcbs", epochs=2), tmp_path, data=digits)
    assert 0 <= s["sampler_seconds"] <= s["train_seconds"] and s["gap_seconds"] == 0
    assert "final_gap" not in s  # the gap is only logged with log_gap


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(sampler="nope"), "sampler"),
        (dict(gcbs_q=1.0), "gcbs_q"),
        (dict(gcbs_q=0), "gcbs_q"),
        (dict(refresh_every=-1), "refresh_every"),
    ],
)
def test_bad_sampler_options(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def test_batch_larger_than_data_rejected(digits):
    cfg = tiny(sampler="gcbs", batch_size=200)
    data = digits.subset(96, 64)
    with pytest.raises(ValueError, match="batch_size"):
        build_sampler(cfg, data.x_train, build_model(cfg, data.image_shape))
