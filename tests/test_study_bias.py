"""``negbatch study bias`` end to end at tiny sizes (a real subprocess), and its helpers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from negbatch.lab import TrainConfig
from negbatch.lab.studies import STUDIES
from negbatch.lab.studies import bias as study

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--n-train", "64", "--n-test", "48", "--batch-size", "16", "--epochs", "1", "--encoder-widths", "16",
        "--head-widths", "16,8", "--knn-k", "5", "--seeds", "0,1", "--bias-batch-sizes", "4,8,1000", "--num-batches", "4"]


def negbatch(*args):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "negbatch.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_study_bias_end_to_end_resumes_and_reports(tmp_path):
    out = tmp_path / "study"
    r = negbatch("study", "bias", *TINY, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert STUDIES["bias"] is study
    rows = json.loads((out / "results.json").read_text())
    got = sorted((x["loss"], x["batch_size"], x["seed"]) for x in rows)
    assert got == [("global", 8, 0), ("global", 8, 1), ("simclr", 8, 0), ("simclr", 8, 1), ("simclr", 16, 0), ("simclr", 16, 1)]
    assert all(x["temperature"] == 0.1 and x["epochs"] == 1 for x in rows)  # study default, command line
    bias_rows = json.loads((out / "bias_results.json").read_text())
    # 2 seeds x (init: 2 estimators, trained: 4) x batch sizes 4, 8 (1000 > N = 64 dropped).
    assert len(bias_rows) == 2 * ((2 + 1) + (4 + 1)) * 2  # + the paired plain-vs-exact row per size
    assert {b["batch_size"] for b in bias_rows} == {4, 8} and {b["n"] for b in bias_rows} == {64}
    assert all(b["noise_floor"] >= 0 and b["relative_variance"] > 0 for b in bias_rows)
    text = (out / "report.md").read_text()
    for piece in ("## (b) Training", "## (a) Gradient bias", "**Verdict**", "Welch p", "InfoNCE, full batch"):
        assert piece in text, piece
    for name in ("accuracy.png", "bias_vs_batch.png", "variance_vs_batch.png", "results.csv", "bias_results.csv"):
        assert (out / name).exists(), name
    metrics = [json.loads(line) for p in out.glob("runs/loss=global*/metrics.jsonl") for line in p.read_text().splitlines()]
    assert metrics and all("infonce" in m for m in metrics)

    # A rerun trains and measures nothing again (in-process: fewer interpreter start-ups).
    from negbatch.cli import main

    watched = list(out.glob("runs/*/summary.json")) + list(out.glob("bias/*.json"))
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert main(["study", "bias", *TINY, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert json.loads((out / "bias_results.json").read_text()) == bias_rows
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").exists()


def test_build_configs_halves_the_batch():
    base = TrainConfig(n_train=64, batch_size=8)
    got = [(label, c.loss, c.batch_size, c.seed) for label, c in study.build_configs(base, 33, [0, 5])]
    assert got == [("InfoNCE, full batch", "simclr", 33, 0), ("InfoNCE, full batch", "simclr", 33, 5),
                   ("InfoNCE, half batch", "simclr", 16, 0), ("InfoNCE, half batch", "simclr", 16, 5),
                   ("global (corrected), half batch", "global", 16, 0), ("global (corrected), half batch", "global", 16, 5)]
    with pytest.raises(ValueError, match="--batch-size"):
        study.build_configs(base, 3, [0])


def test_welch_matches_scipy():
    from scipy import stats

    a, b = [0.91, 0.93, 0.92, 0.95], [0.90, 0.89, 0.93]
    p, (lo, hi) = study._welch(a, b)
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-10)
    diff = sum(a) / 4 - sum(b) / 3
    assert lo < diff < hi and (p < 0.05) == (lo > 0 or hi < 0)  # the CI excludes 0 exactly when p < 0.05
    assert study._welch([0.5], [0.4, 0.6]) == (None, None)
    assert study._welch([0.5, 0.5], [0.4, 0.4]) == (None, None)


def test_bad_options_named(tmp_path):
    from negbatch.cli import main

    assert main(["study", "bias", "--seeds", "a", "--out", str(tmp_path)]) == 2
    assert main(["study", "bias", "--num-batches", "1", "--out", str(tmp_path)]) == 2


def test_bias_batch_sizes_outside_the_set_rejected(tmp_path):
    from negbatch.lab.studies.bias import measure_bias

    cfg = TrainConfig(n_train=16, n_test=16, batch_size=8, loss="global", encoder_widths=(8,), head_widths=(8, 4))
    with pytest.raises(ValueError, match="--bias-batch-sizes"):
        measure_bias(cfg, tmp_path / "run", tmp_path / "cache", [64, 1], 4, 100)
