"""Training runs under several processes (2 real gloo processes on CPU): the final
parameters equal a one-process run of the same global batch, for each loss and
each sampler of both tasks, with gradient caching, and across an interruption
(resumed on 2 processes, or on 1). One spawn runs every case."""

import os

import pytest
import torch

from _dist import run_distributed
from _runs import without_times
from negbatch.lab import TrainConfig, read_metrics, train

pytestmark = pytest.mark.distributed

# norm="none": BatchNorm normalises each process's rows by their own statistics (SyncBatchNorm
# needs CUDA), which is a different computation from one process's.
IMAGE = dict(n_train=96, n_test=64, batch_size=16, epochs=2, encoder_widths=(16,), head_widths=(16, 8), knn_k=5,
             norm="none")
# SGD for text: attention's key bias has a zero gradient that float rounding makes +-1e-9, and Adam
# scales any gradient to the step size, so the two runs' key biases would differ by the learning rate.
TEXT = dict(dataset="builtin", test_fraction=0.25, batch_size=8, steps=6, text_dim=16, text_heads=2, vocab_size=600,
            dropout=0.0, optimizer="sgd", lr=0.1)
CASES = {
    "image-simclr-random": dict(IMAGE),
    "image-relic-k-gcbs": dict(IMAGE, loss="relic", negatives=5, sampler="gcbs", gcbs_q=0.9),
    "image-global-hard": dict(IMAGE, loss="global", sampler="hard"),
    "image-simclr-k-cache": dict(IMAGE, negatives=3, chunk_size=4),
    "text-infonce-random": dict(TEXT),
    "text-global-gcbs": dict(TEXT, loss="global", sampler="gcbs", gcbs_q=0.9),
    "text-infonce-k-noduplicates": dict(TEXT, negatives=3, sampler="no-duplicates"),
    "text-infonce-hard-cache": dict(TEXT, sampler="hard", chunk_size=3),
    # Every rank's queue holds every rank's batch; the temperature's gradient is averaged over the ranks.
    "image-dcl-queue-temperature": dict(IMAGE, loss="dcl", queue_size=40, negatives=20, learnable_temperature=True),
    "image-siglip": dict(IMAGE, loss="siglip"),
    "text-infonce-queue-temperature-cache": dict(TEXT, queue_size=12, learnable_temperature=True, chunk_size=3),
    # MoCo: each rank's momentum encoder follows the same averaged parameters, so the copies stay equal.
    "image-moco": dict(IMAGE, queue_size=32, key_momentum=0.9),
    "text-moco": dict(TEXT, queue_size=16, key_momentum=0.9),
}
STOP = 5  # mid-epoch for both tasks


def _two_processes(rank, world_size, out):
    if tokenizers_missing():
        return
    for name, kw in CASES.items():
        assert train(TrainConfig(**kw), os.path.join(out, name))["world_size"] == 2
    # Interrupted and resumed on two processes; interrupted here, resumed on one below.
    cfg = TrainConfig(**CASES["image-relic-k-gcbs"])
    assert train(cfg, os.path.join(out, "resumed-2"), stop_after=STOP) is None
    train(cfg, os.path.join(out, "resumed-2"))
    assert train(cfg, os.path.join(out, "resumed-1"), stop_after=STOP) is None
    text = TrainConfig(**{**TEXT, "dropout": 0.1})
    assert train(text, os.path.join(out, "text-dropout"), stop_after=3) is None
    accumulated = TrainConfig(**{**IMAGE, "chunk_size": 4, "chunk_method": "accumulate"})
    assert train(accumulated, os.path.join(out, "image-accumulate"), stop_after=3) is None
    per_process_norm = TrainConfig(**{**IMAGE, "norm": "batch"})
    assert train(per_process_norm, os.path.join(out, "image-batchnorm"), stop_after=3) is None
    # Accumulated chunks split over the processes: refused before the folder is claimed (it was refused at
    # the first step, and the folder then refused the corrected command as another configuration's).
    with pytest.raises(ValueError, match="chunk_size=5 .* must be divisible by the 2 processes"):
        train(TrainConfig(**{**IMAGE, "chunk_size": 5, "chunk_method": "accumulate"}), os.path.join(out, "odd-chunks"))


def tokenizers_missing():
    import importlib.util

    return importlib.util.find_spec("tokenizers") is None


def _parameters(folder):
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    return {**state["model"], **{f"loss:{k}": v for k, v in state["loss"].items()},
            **{f"keys:{k}": v for k, v in state.get("key_encoder", {}).items()}}


def _assert_same_run(two, one):
    a, b = _parameters(two), _parameters(one)
    assert a.keys() == b.keys()
    for k in a:
        # float32 sums in another order; the loss's state too (a queue, a learned temperature, SigLIP's bias)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{two.name}: {k}")
    rows_two, rows_one = without_times(read_metrics(two)), without_times(read_metrics(one))
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]  # every row once: rank 0 alone writes
    for r2, r1 in zip(rows_two, rows_one):
        assert r2.keys() == r1.keys(), two.name
        # Every logged value, not only the loss: the global loss's infonce and minibatch_loss were rank 0's.
        for key in r1.keys() - {"step", "epoch"}:
            if isinstance(r1[key], float):
                # The SNR of the first steps rests on few, nearly equal gradients: their rounding shows.
                rel = 1e-2 if key.startswith("snr") else 1e-4
                assert r2[key] == pytest.approx(r1[key], rel=rel, abs=1e-5), (two.name, key, r1["step"])


def test_two_processes_equal_one_process_for_every_loss_sampler_and_resume(tmp_path):
    pytest.importorskip("tokenizers", reason="the text cases need the text extra")
    # The one-process runs first: the forked workers then inherit what they imported (scikit-learn for the
    # digits, torch._dynamo that the optimisers load on first use) instead of both loading it at once.
    for name, kw in CASES.items():
        train(TrainConfig(**kw), tmp_path / f"{name}-one")
    run_distributed(_two_processes, 2, str(tmp_path))
    for name in CASES:
        _assert_same_run(tmp_path / name, tmp_path / f"{name}-one")
        assert not any(p.name.startswith(".") and p.suffix == ".tmp" for p in (tmp_path / name).iterdir())
    assert not (tmp_path / "odd-chunks" / "config.json").exists()
    # Resumed on two processes: the uninterrupted run.
    _assert_same_run(tmp_path / "resumed-2", tmp_path / "image-relic-k-gcbs-one")
    # Written by two processes, resumed by one: the image task draws nothing per process, so it continues exactly.
    cfg = TrainConfig(**CASES["image-relic-k-gcbs"])
    assert torch.load(tmp_path / "resumed-1" / "checkpoint.pt", weights_only=True)["world_size"] == 2
    train(cfg, tmp_path / "resumed-1")
    _assert_same_run(tmp_path / "resumed-1", tmp_path / "image-relic-k-gcbs-one")
    # Text with dropout draws per process: another number of processes is refused, with the way out.
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1.*torchrun --nproc-per-node 2"):
        train(TrainConfig(**{**TEXT, "dropout": 0.1}), tmp_path / "text-dropout")
    # So do accumulated chunks: chunk_size / N rows of each process.
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1.*accumulation"):
        train(TrainConfig(**{**IMAGE, "chunk_size": 4, "chunk_method": "accumulate"}), tmp_path / "image-accumulate")
    # And BatchNorm over each process's rows (the default norm): it silently differed on resume.
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1.*BatchNorm"):
        train(TrainConfig(**{**IMAGE, "norm": "batch"}), tmp_path / "image-batchnorm")


def _mismatched_processes(rank, world_size, out):
    import numpy as np

    from negbatch.data import from_arrays

    # Rank 1 read another configuration (a node's own --config file): with another learning rate its model
    # left rank 0's without a word (with another batch size it trained half the steps on other batches,
    # then hung or failed in a collective with a bare gloo error). Now every rank refuses.
    own = dict(IMAGE, lr=0.01, temperature=0.3) if rank == 1 else IMAGE
    with pytest.raises(ValueError, match=r"rank 1 differs from rank 0 in lr, temperature; give every process the "):
        train(TrainConfig(**own), os.path.join(out, "options"))
    # log_every and device are not part of a run's identity, but the processes must agree on them: log_every
    # decides which steps take the metrics' collective (ranks logging at other steps would mismatch them).
    own = dict(IMAGE, log_every=2) if rank == 1 else IMAGE
    with pytest.raises(ValueError, match=r"rank 1 differs from rank 0 in log_every; give every process the "):
        train(TrainConfig(**own), os.path.join(out, "log-every"))
    # Other data on rank 1 (a stale copy on one node), the same options.
    rng = np.random.default_rng(rank)
    data = from_arrays(rng.random((32, 1, 4, 4)), np.arange(32) % 2, rng.random((16, 1, 4, 4)), np.arange(16) % 2)
    with pytest.raises(ValueError, match=r"rank 1 differs from rank 0 in the data \(fingerprint\)"):
        train(TrainConfig(**{**IMAGE, "n_train": None, "n_test": None}), os.path.join(out, "data"), data=data)


def test_processes_given_different_runs_are_refused_by_every_process(tmp_path):
    run_distributed(_mismatched_processes, 2, str(tmp_path))
    assert not (tmp_path / "options" / "config.json").exists() and not (tmp_path / "data" / "config.json").exists()
    assert not (tmp_path / "log-every" / "config.json").exists()


def _unshareable_batches(rank, world_size, out):
    from negbatch.cli import main

    # B = 5 on 2 processes (and B = 2 on more processes than rows): refused before the data are loaded and
    # before the folder is claimed, naming the option and what to do.
    with pytest.raises(ValueError, match=r"batch_size=5 does not split over the 2 processes: each trains an equal "
                                         r"share .* a multiple of 2 \(e.g. 4 or 6\); change it, or the number of "
                                         r"processes \(torchrun --nproc-per-node\)"):
        train(TrainConfig(**{**IMAGE, "batch_size": 5}), os.path.join(out, "b5"))
    # A study sweeping such a batch size is refused before it writes anything: it trained the runs before that
    # one, then stopped with the sampler's error, leaving a study that could never finish on 2 processes.
    code = main(["study", "batch-size", "--data", "digits", "--n-train", "64", "--n-test", "48", "--epochs", "1",
                 "--encoder-widths", "16", "--head-widths", "16,8", "--knn-k", "5", "--norm", "none", "--methods",
                 "infonce", "--batch-sizes", "4,5", "--seeds", "0", "--workers", "1", "--out", os.path.join(out, "s")])
    assert code == 2


def test_a_batch_the_processes_cannot_share_is_refused_up_front(tmp_path, capfd):
    run_distributed(_unshareable_batches, 2, str(tmp_path))
    assert not (tmp_path / "b5").exists() and not (tmp_path / "s").exists()
    err = capfd.readouterr().err
    assert "negbatch study: error: a run of this study: batch_size=5 does not split over the 2 processes" in err, err
