"""The trainer's chunked steps (``chunk_size``): gradient caching and gradient
accumulation, against references written here."""

import warnings

import pytest
import torch
from torch import nn

from _runs import without_times
from negbatch import InfoNCE
from negbatch.data import load_digits
from negbatch.lab import TrainConfig, read_metrics, train
from negbatch.lab.tasks import image as trainer_module
from negbatch.lab.chunked import accumulated_forward_backward, cached_forward_backward
from negbatch.lab.tasks.image import Batch, PairLoss, build_loss, forward_backward
from negbatch.models import ContrastiveModel

TINY = dict(n_train=96, n_test=64, batch_size=24, epochs=2, encoder_widths=(16,), head_widths=(16, 8), knn_k=5)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def tiny(**kw):
    return TrainConfig(**{**TINY, **kw})


def plain_mlp(cfg, image_shape):
    """The lab's models have BatchNorm (per-chunk statistics: not exact) and no
    dropout; the exactness test uses an MLP without either."""
    c, h, w = image_shape
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 16), nn.ReLU())
    head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    return ContrastiveModel(encoder, head)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def random_batch(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.arange(n), torch.rand(n, 1, 8, 8, generator=g, dtype=dtype),
                 torch.rand(n, 1, 8, 8, generator=g, dtype=dtype))


@pytest.mark.parametrize("kw", [dict(loss="simclr"), dict(loss="simclr", negatives=5), dict(loss="relic", negatives=4)])
@pytest.mark.parametrize("chunk", [1, 5, 30])
def test_cached_step_equals_plain_step_float64(kw, chunk):
    torch.manual_seed(0)
    model = plain_mlp(None, (1, 8, 8)).double()
    loss_fn = build_loss(tiny(**kw))
    batch = random_batch(11)
    plain = forward_backward(model, loss_fn, batch, torch.Generator().manual_seed(3))
    ref = grads(model)
    model.zero_grad()
    g = torch.Generator().manual_seed(3)
    cached = forward_backward(model, loss_fn, batch, g, chunk, "cache")
    assert torch.allclose(cached, plain, rtol=0, atol=1e-12)
    for a, b in zip(grads(model), ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    # The generator advanced as in the plain step (the loss ran once).
    g_plain = torch.Generator().manual_seed(3)
    forward_backward(model, loss_fn, batch, g_plain)
    assert torch.equal(g.get_state(), g_plain.get_state())


def test_accumulated_step_against_a_loop_of_chunk_losses():
    torch.manual_seed(0)
    model = plain_mlp(None, (1, 8, 8)).double()
    loss = InfoNCE(temperature=0.3)
    batch = random_batch(11)
    value = accumulated_forward_backward(model, PairLoss(loss), batch, torch.Generator(), 4)
    got = grads(model)
    model.zero_grad()
    # Reference: the chunk losses (rows 0-3, 4-7, 8-10), weighted by chunk share, in one graph.
    total = 0
    for rows in (range(0, 4), range(4, 8), range(8, 11)):
        rows = list(rows)
        total = total + loss(model(batch.view1[rows]), model(batch.view2[rows])) * len(rows) / 11
    total.backward()
    assert abs(float(value) - float(total.detach())) < 1e-12
    for a, b in zip(got, grads(model)):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    # Fewer negatives: not the full-batch loss (so the test above can fail).
    with torch.no_grad():
        assert abs(float(value) - float(loss(model(batch.view1), model(batch.view2)))) > 1e-3


def test_accumulated_global_loss_counts_one_e_step_per_optimizer_step():
    """Each chunk updates its own samples' state at the step's gamma (a linear
    schedule 0.2 -> 0.8 over 4 steps), against a constant-gamma loss fed the
    same chunks; the schedule's counter advances once per step, not per chunk."""
    from negbatch import GlobalInfoNCE
    from negbatch.lab.global_loss import GammaSchedule, GlobalPairLoss

    torch.manual_seed(0)
    model = plain_mlp(None, (1, 8, 8)).double()
    schedule = GammaSchedule(0.8, "linear", 4)
    scheduled = GlobalPairLoss(30, 0.3, schedule)
    reference_state = None
    for step in range(2):
        batch = random_batch(11, seed=step)  # the same samples again: step 1 moves their state by gamma(1)
        accumulated_forward_backward(model, scheduled, batch, torch.Generator(), 4)
        assert int(scheduled.loss.num_updates) == step + 1
        fixed = GlobalInfoNCE(30, temperature=0.3, gamma=schedule(step))
        if reference_state is not None:
            fixed.load_state_dict({**reference_state, "num_updates": torch.tensor(0)})
        with torch.no_grad():
            for rows in (range(0, 4), range(4, 8), range(8, 11)):
                rows = list(rows)
                fixed(model(batch.view1[rows]), model(batch.view2[rows]), batch.index[rows])
        torch.testing.assert_close(scheduled.loss.log_nu, fixed.log_nu, rtol=1e-12, atol=0)
        reference_state = fixed.state_dict()


def test_chunked_step_rejects_bad_chunk_size():
    model = plain_mlp(None, (1, 8, 8)).double()
    for fn in (cached_forward_backward, accumulated_forward_backward):
        with pytest.raises(ValueError, match="chunk_size"):
            fn(model, build_loss(tiny()), random_batch(4), torch.Generator(), 0)


@pytest.mark.parametrize("kw", [dict(loss="simclr", negatives=7), dict(loss="relic")])
def test_chunked_run_gives_the_plain_runs_metrics(tmp_path, digits, monkeypatch, kw):
    monkeypatch.setattr(trainer_module, "build_model", plain_mlp)
    plain = train(tiny(**kw), tmp_path / "plain", data=digits)
    chunked = train(tiny(chunk_size=7, **kw), tmp_path / "chunked", data=digits)
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "chunked")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert ra["lr"] == rb["lr"]
    assert plain["linear_acc"] == pytest.approx(chunked["linear_acc"], abs=1 / 64 + 1e-9)
    # Control: accumulation over the same chunks sees fewer negatives, so its losses differ
    # (with all negatives: a chunk of 7 pairs has fewer than 7 candidates for SimCLR's last chunk).
    train(tiny(chunk_size=7, chunk_method="accumulate", loss=kw["loss"]), tmp_path / "accum", data=digits)
    ref = train(tiny(loss=kw["loss"]), tmp_path / "plain-all", data=digits)
    assert abs(read_metrics(tmp_path / "accum")[0]["loss"] - read_metrics(tmp_path / "plain-all")[0]["loss"]) > 1e-3
    assert ref is not None


@pytest.mark.parametrize("method", ["cache", "accumulate"])
def test_resumed_chunked_run_equals_uninterrupted(tmp_path, digits, method):
    # The lab's own model (BatchNorm: per-chunk statistics, one warning).
    cfg = tiny(chunk_size=10, chunk_method=method, loss="simclr", negatives=5, checkpoint_every=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        full = train(cfg, tmp_path / "full", data=digits)
        assert train(cfg, tmp_path / "cut", data=digits, stop_after=5) is None
        resumed = train(cfg, tmp_path / "cut", data=digits)
    assert without_times(read_metrics(tmp_path / "full")) == without_times(read_metrics(tmp_path / "cut"))
    for key in ("linear_acc", "knn_acc", "final_loss", "silhouette"):
        assert full[key] == resumed[key], key


def test_batchnorm_model_warns_once_in_the_labs_terms(tmp_path, digits):
    """The library's warning names its batchnorm='eval' argument, which the
    command line does not have: the lab says --norm none, once."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny(chunk_size=8, epochs=1), tmp_path, data=digits)
    said = [str(w.message) for w in caught if "BatchNorm" in str(w.message)]
    assert len(said) == 1 and "--norm none" in said[0] and "batchnorm='eval'" not in said[0], said


def test_chunk_config_keys():
    assert TrainConfig.from_dict({"chunk-size": "16"}).chunk_size == 16
    assert TrainConfig.from_dict({"chunk_size": 0}).chunk_size is None  # 0: no chunking, one spelling
    assert TrainConfig.from_dict({"chunk_size": "none"}).chunk_size is None
    assert TrainConfig.from_dict({"chunk_size": 8, "chunk_method": "accumulate"}).chunk_method == "accumulate"
    for bad in ({"chunk_size": -1}, {"chunk_size": "x"}, {"chunk_size": True}, {"chunk_method": "cached"}):
        with pytest.raises(ValueError, match="chunk"):
            TrainConfig.from_dict(bad)


def test_accumulation_checks_k_against_the_smallest_chunk_before_training():
    # batch 24 in chunks of 5: the last chunk has 4 rows, 2*4 - 2 = 6 SimCLR candidates.
    with pytest.raises(ValueError, match="chunk_size=5"):
        build_loss(tiny(loss="simclr", negatives=7, chunk_size=5, chunk_method="accumulate"))
    build_loss(tiny(loss="simclr", negatives=6, chunk_size=5, chunk_method="accumulate"))
    build_loss(tiny(loss="simclr", negatives=20, chunk_size=5, chunk_method="cache"))  # the cache sees the batch


def _accumulate_on_two_ranks(rank, world):
    from negbatch.distributed import gather_with_grad

    seen = []

    class Recording(nn.Module):  # records each chunk's rows on this rank and over all ranks
        def forward(self, z1, z2, batch, generator):
            gathered, _ = gather_with_grad(z1)
            seen.append((z1.shape[0], gathered.shape[0]))
            return z1.pow(2).mean() + z2.pow(2).mean()

    loss_fn = Recording()

    model = nn.Linear(4, 3)
    batch = Batch(torch.arange(6), torch.randn(6, 4), torch.randn(6, 4))  # this rank's 6 of 12 rows
    accumulated_forward_backward(model, loss_fn, batch, torch.Generator(), 4)
    assert seen == [(2, 4)] * 3  # a chunk's loss has chunk_size = 4 rows over the two ranks
    with pytest.raises(ValueError, match="divisible by the 2 processes"):
        accumulated_forward_backward(model, loss_fn, batch, torch.Generator(), 3)


@pytest.mark.distributed
def test_accumulated_chunks_hold_chunk_size_rows_over_all_processes():
    from _dist import run_distributed

    run_distributed(_accumulate_on_two_ranks, 2)
