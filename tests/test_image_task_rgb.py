"""The image task on the papers' kinds of data, at tiny size: CIFAR-10 / STL-10 /
ImageFolder files written in their exact formats, the user's arrays, ResNets,
SimCLR's augmentation, streaming with DataLoader workers, mixed precision,
channels_last, and the evaluation at scale."""

import math

import numpy as np
import pytest
import torch

from _image_formats import write_cifar10, write_image_folder, write_stl10
from negbatch.lab import TrainConfig, read_metrics, train

pytest.importorskip("kornia", reason="SimCLR's augmentation needs the vision extra")

def losses(folder):
    return [r["loss"] for r in read_metrics(folder)]


RESNET = dict(encoder="resnet18", encoder_widths=(4, 8, 8, 16), head_widths=(8, 4), hflip=True)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar10(folder, per_batch=8, n_test=12)
    return folder


def test_cifar_resnet_gcbs_knn_monitor_and_scale_evaluation(tmp_path, cifar):
    cfg = TrainConfig(dataset="cifar10", data_dir=str(cifar), batch_size=8, epochs=2, sampler="gcbs", gcbs_q=0.9,
                      log_gap=True, knn_every=1, **RESNET)
    s = train(cfg, tmp_path)
    assert s["evaluation"] == "scale" and s["steps"] == 2 * 40 // 8
    assert 0 <= s["linear_acc"] <= 1 and 0 <= s["knn_acc"] <= 1 and math.isfinite(s["final_loss"])
    assert s["data"]["name"] == "cifar10" and s["data"]["splits"]["train"]["images"]["dtype"] == "uint8"
    monitor = [r for r in read_metrics(tmp_path) if "knn_monitor" in r]
    assert [r["epoch"] for r in monitor] == [1] and 0 <= monitor[0]["knn_monitor"] <= 1
    assert [r["step"] for r in read_metrics(tmp_path) if "gap" in r] == [1, 6]


def test_rgb_run_resumes_with_the_same_views(tmp_path, cifar):
    """SimCLR's augmentation draws from the run's generator: an interrupted run (mid-epoch, GCBS
    plan restored) makes the same views after resuming and ends as the uninterrupted one."""
    cfg = TrainConfig(dataset="cifar10", data_dir=str(cifar), batch_size=8, epochs=2, sampler="gcbs", gcbs_q=0.9,
                      **RESNET)
    whole = train(cfg, tmp_path / "whole")
    assert train(cfg, tmp_path / "cut", stop_after=3) is None
    resumed = train(cfg, tmp_path / "cut")
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert resumed["linear_acc"] == whole["linear_acc"] and resumed["knn_acc"] == whole["knn_acc"]


def test_streaming_workers_and_channels_last_give_the_same_run(tmp_path, cifar):
    """The DataLoader path (uint8 on the CPU, 2 workers) and channels_last give the resident path's run."""
    base = dict(dataset="cifar10", data_dir=str(cifar), batch_size=8, epochs=1, norm="none", **RESNET)
    ref = train(TrainConfig(**base), tmp_path / "ref")
    streamed = train(TrainConfig(**base, num_workers=2, channels_last=True), tmp_path / "streamed")
    assert losses(tmp_path / "streamed") == pytest.approx(losses(tmp_path / "ref"), rel=1e-4)
    assert streamed["linear_acc"] == pytest.approx(ref["linear_acc"], abs=1 / 12 + 1e-9)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes(tmp_path, precision):
    """bf16 autocast, and fp16 with a GradScaler whose state is checkpointed: finite losses, and a
    resumed run equals an uninterrupted one. (A small MLP: half-precision convolutions are slow on CPUs.)"""
    cfg = TrainConfig(n_train=64, n_test=32, batch_size=16, epochs=2, encoder_widths=(16,), head_widths=(16, 8),
                      precision=precision)
    whole = train(cfg, tmp_path / "whole")
    assert all(math.isfinite(v) for v in losses(tmp_path / "whole"))
    assert train(cfg, tmp_path / "cut", stop_after=3) is None
    if precision == "fp16":
        assert "scale" in torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["precision"]
    resumed = train(cfg, tmp_path / "cut")
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole") and resumed["final_loss"] == whole["final_loss"]


def test_stl10_pretrains_on_the_unlabeled_split(tmp_path):
    write_stl10(tmp_path / "stl", n_train=8, n_test=6, n_unlabeled=16)
    cfg = TrainConfig(dataset="stl10", data_dir=str(tmp_path / "stl"), batch_size=8, epochs=1, use_unlabeled=True,
                      **RESNET)
    s = train(cfg, tmp_path / "run")
    assert s["steps"] == (8 + 16) // 8 and s["evaluation"] == "scale"
    with pytest.raises(ValueError, match="use_unlabeled: digits has no unlabeled split"):
        train(TrainConfig(use_unlabeled=True), tmp_path / "digits")


def test_stl10_reads_its_unlabeled_split_only_for_a_run_that_trains_on_it(tmp_path, monkeypatch):
    """unlabeled_X.bin holds 100,000 images (2.8 GB in memory): every STL-10 run and study read it,
    also those without use_unlabeled, and a folder without the file was refused."""
    import negbatch.data.stl10 as stl10
    from negbatch.lab.studies import get_study

    write_stl10(tmp_path / "stl", n_train=8, n_test=6, n_unlabeled=16)
    read = []
    real = stl10._read_images
    monkeypatch.setattr(stl10, "_read_images", lambda path, folder: read.append(path.name) or real(path, folder))
    cfg = TrainConfig(dataset="stl10", data_dir=str(tmp_path / "stl"), batch_size=8, epochs=1, **RESNET)
    assert train(cfg, tmp_path / "labelled")["steps"] == 1
    get_study("negatives", "image").load(cfg)  # a study's data check before its runs
    assert read and "unlabeled_X.bin" not in read
    assert train(cfg.replace(use_unlabeled=True), tmp_path / "all")["steps"] == 3 and "unlabeled_X.bin" in read
    (tmp_path / "stl" / "unlabeled_X.bin").unlink()  # the labelled files alone train a labelled run
    assert train(cfg.replace(seed=1), tmp_path / "without")["steps"] == 1
    with pytest.raises(FileNotFoundError, match="lacks unlabeled_X.bin"):
        train(cfg.replace(use_unlabeled=True, seed=1), tmp_path / "without-all")


def test_an_stl10_folder_fingerprinted_with_its_unlabeled_split_resumes(tmp_path):
    """Until 2026-12-03 a run without use_unlabeled recorded the unlabeled split in data.json: that folder
    resumes (its record is checked against the split once, then rewritten); other unlabeled images are
    other data, refused as before."""
    import json

    from negbatch.data import load_stl10

    write_stl10(tmp_path / "stl", n_train=8, n_test=6, n_unlabeled=4)
    cfg = TrainConfig(dataset="stl10", data_dir=str(tmp_path / "stl"), batch_size=4, epochs=1, **RESNET)
    assert train(cfg, tmp_path / "run", stop_after=1) is None
    data = tmp_path / "run" / "data.json"
    now = json.loads(data.read_text())
    assert "unlabeled" not in now["splits"]
    earlier = load_stl10(tmp_path / "stl").identity()  # what the earlier version wrote
    data.write_text(json.dumps(earlier))
    assert train(cfg, tmp_path / "run")["steps"] == 2
    assert json.loads(data.read_text()) == now
    data.write_text(json.dumps(earlier))
    (tmp_path / "stl" / "unlabeled_X.bin").write_bytes(bytes(reversed((tmp_path / "stl" / "unlabeled_X.bin")
                                                                        .read_bytes())))
    with pytest.raises(ValueError, match="holds a run on other data"):
        train(cfg, tmp_path / "run")


def test_image_folder_resized_once(tmp_path):
    write_image_folder(tmp_path / "tree", per_class=6, n_val=3)
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path / "tree"), image_size=16, batch_size=6, epochs=1,
                      **RESNET)
    s = train(cfg, tmp_path / "run")
    assert s["data"]["splits"]["train"]["images"]["shape"][1:] == [3, 16, 16]
    with pytest.raises(ValueError, match="image_size and decode_size apply to dataset='imagefolder'"):
        train(TrainConfig(image_size=16), tmp_path / "digits")



def test_image_folder_cache_in_a_folder_of_its_own(tmp_path):
    """A read-only data folder (usual on a cluster) cannot hold the decoded cache: the library's
    warning said "pass cache_dir=", which negbatch train and study had no option for, so every run of
    the ImageNet-64 recipe decoded the 1.28M images again (hours). Where the cache goes is not part of
    the run: another folder finds the finished run."""
    from negbatch.lab.tasks.image import load_image_data

    write_image_folder(tmp_path / "tree", per_class=6, n_val=3)
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path / "tree"), image_size=8,
                      image_cache_dir=str(tmp_path / "cache"), batch_size=6, epochs=1, **RESNET)
    assert load_image_data(cfg).x_train.shape[1:] == (3, 8, 8)
    assert len(list((tmp_path / "cache").glob("negbatch-8px-*.npz"))) == 1
    assert not list((tmp_path / "tree").glob("*.npz"))
    assert cfg.identity() == cfg.replace(image_cache_dir=None).identity()
    with pytest.raises(ValueError, match="image_cache_dir: applies to dataset='imagefolder' with image_size"):
        TrainConfig(image_cache_dir=str(tmp_path / "cache"))

def test_the_users_arrays_with_and_without_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 1, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", images=x, labels=np.arange(60) % 3)
    tiny = dict(batch_size=8, epochs=1, encoder_widths=(8,), head_widths=(8, 4))
    s = train(TrainConfig(dataset=f"arrays:{tmp_path / 'mine.npz'}", **tiny), tmp_path / "labelled")
    assert s["data"]["name"] == "mine" and 0 <= s["linear_acc"] <= 1
    np.save(tmp_path / "unlabeled.npy", x)
    s = train(TrainConfig(dataset=f"arrays:{tmp_path / 'unlabeled.npy'}", **tiny), tmp_path / "unlabeled")
    assert s["steps"] == 60 // 8 and "linear_acc" not in s and s["evaluation"].startswith("none")


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_run_resumes_exactly_with_streaming_and_channels_last(tmp_path, cifar, precision):
    """On a GPU: uint8 images streamed with pinned memory, channels_last, each precision; a resumed run
    (CUDA random streams restored) equals an uninterrupted one."""
    cfg = TrainConfig(dataset="cifar10", data_dir=str(cifar), batch_size=8, epochs=2, device="cuda",
                      precision=precision, channels_last=True, num_workers=2, **RESNET)
    whole = train(cfg, tmp_path / "whole")
    assert train(cfg, tmp_path / "cut", stop_after=3) is None
    resumed = train(cfg, tmp_path / "cut")
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert resumed["linear_acc"] == whole["linear_acc"] and math.isfinite(whole["final_loss"])
