"""Every command through a real subprocess, at tiny sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--n-train", "64", "--n-test", "48", "--batch-size", "16", "--epochs", "1",
        "--encoder-widths", "16", "--head-widths", "16,8", "--knn-k", "5"]


def negbatch(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "negbatch.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=240)


def test_help_everywhere(capsys):
    out = negbatch("--help")
    assert out.returncode == 0 and "demo" in out.stdout and "study" in out.stdout
    r = negbatch("study", "negatives", "--help")
    assert r.returncode == 0 and "--ks" in r.stdout and "--temperature" not in r.stdout.replace("--temperatures", "")
    # The other commands' help in-process (same parser; saves interpreter start-ups).
    from negbatch.cli import main

    for cmd in (["demo"], ["study"], ["train"], ["report"]):
        with pytest.raises(SystemExit) as exit_:
            main([*cmd, "--help"])
        assert exit_.value.code == 0
        assert "usage: negbatch" in capsys.readouterr().out, cmd


def test_train_then_report(tmp_path):
    (tmp_path / "c.yaml").write_text("loss: relic\nnegatives: 4\n")
    r = negbatch("train", "--config", str(tmp_path / "c.yaml"), *TINY, "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "linear accuracy" in r.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["negatives"] == 4
    r = negbatch("report", str(tmp_path / "run"))
    assert r.returncode == 0 and (tmp_path / "run" / "curves.png").exists()


def test_study_negatives_resumes_and_reports(tmp_path):
    out = tmp_path / "study"
    args = ["study", "negatives", *TINY, "--ks", "2,all,500", "--seeds", "0,1", "--losses", "simclr", "--out", str(out)]
    r = negbatch(*args, "--workers", "2")
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "results.json").read_text())
    assert sorted((str(x["negatives"]), x["seed"]) for x in rows) == [("2", 0), ("2", 1), ("all", 0), ("all", 1)]
    assert (out / "results.csv").read_text().count("\n") == 5
    for name in ("report.md", "accuracy_vs_k.png", "snr_over_training.png", "geometry_vs_k.png"):
        assert (out / name).exists(), name
    assert "## What the data show" in (out / "report.md").read_text()
    # A rerun trains nothing again (the summaries are reused verbatim); in-process to save start-ups.
    from negbatch.cli import main

    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == before
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").exists()


def test_clear_errors(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text('loss = "simclr"\nbatch_sise = 8\n')
    r = negbatch("train", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown key 'batch_sise'" in r.stderr and "batch_size" in r.stderr
    # The other errors in-process (same code path as the console script).
    from negbatch.cli import main

    cases = [
        (["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "y")],
         "apt-get install dataset-fashion-mnist"),
        (["train", "--lr", "fast", "--out", str(tmp_path / "z")], "lr: expected a float"),
        (["report", str(tmp_path)], "neither a study folder"),
        (["study", "negatives", "--ks", "0,all", "--out", str(tmp_path / "s")], "negatives must be 'all' or a positive int"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["study", "nosuch"])
    assert "invalid choice" in capsys.readouterr().err


def test_text_data_routes_gradcache_and_batches_to_their_text_studies():
    from negbatch.cli import route_text_studies

    assert route_text_studies(["study", "gradcache", "--data", "bible", "--seeds", "0"]) == [
        "study", "text-gradcache", "--data", "bible", "--seeds", "0"]
    assert route_text_studies(["study", "batches", "--data=pairs:my.jsonl"])[1] == "text-batches"
    assert route_text_studies(["study", "batches", "--data", "images"])[1] == "batches"
    assert route_text_studies(["study", "gradcache", "--data", "digits"])[1] == "gradcache"
    assert route_text_studies(["study", "negatives", "--data", "bible"])[1] == "negatives"
    assert route_text_studies(["train", "--data", "bible"]) == ["train", "--data", "bible"]
