"""``negbatch study batches`` end to end (a real subprocess, tiny sizes), its
rerun, its report from the folder alone, and its errors."""

import json
import os
import subprocess
import sys
from pathlib import Path


SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--n-train", "80", "--n-test", "48", "--batch-size", "16", "--epochs", "2",
        "--encoder-widths", "16", "--head-widths", "16,8", "--knn-k", "5", "--gcbs-q", "0.95"]


def negbatch(*args):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "negbatch.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_study_batches_end_to_end(tmp_path):
    out = tmp_path / "study"
    args = ["study", "batches", *TINY, "--seeds", "0,1", "--out", str(out)]
    r = negbatch(*args)
    assert r.returncode == 0, r.stderr
    spec = json.loads((out / "study.json").read_text())
    assert spec["study"] == "batches" and spec["data"] == "images" and spec["base"]["log_gap"] is True
    rows = json.loads((out / "results.json").read_text())
    assert sorted((x["sampler"], x["seed"]) for x in rows) == [(s, i) for s in ("gcbs", "hard", "random") for i in (0, 1)]
    assert (out / "results.csv").read_text().count("\n") == 7
    for x in rows:
        assert x["epochs"] == 2 and x["gcbs_q"] == 0.95
        assert x["final_gap"] >= 0 and 0 <= x["linear_acc"] <= 1
        assert (x["sampler_seconds"] == 0) == (x["sampler"] == "random")
        metrics = [json.loads(line) for line in (out / "runs" / x["run"] / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics if "gap" in m] == [0, 1]
    text = (out / "report.md").read_text()
    assert "## What the data show" in text and "**gcbs vs random**" in text and "**hard vs random**" in text
    assert "| random | 2 |" in text and "ordering share" in text
    for name in ("gap_over_training.png", "accuracy_and_time.png"):
        assert (out / name).stat().st_size > 0, name
    # A rerun trains nothing again; in-process to save a start-up.
    from negbatch.cli import main

    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == before
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").exists()


def test_study_batches_one_sampler_against_random_only(tmp_path):
    from negbatch.cli import main

    out = tmp_path / "s"
    assert main(["study", "batches", *TINY, "--epochs", "1", "--samplers", "random,gcbs", "--seeds", "3",
                 "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "**gcbs vs random**" in text and "too few seeds for a test" in text and "**hard vs random**" not in text


def test_study_batches_errors(tmp_path, capsys):
    from negbatch.cli import main

    cases = [
        (["--samplers", "random,best"], "--samplers: unknown best"),
        (["--data", "text"], "--data 'text' is not supported; expected one of images"),
        (["--seeds", "0,0"], "--seeds lists a value twice"),
        (["--dataset", "fashion-mnist", "--data-dir", str(tmp_path)], "apt-get install dataset-fashion-mnist"),
        (["--gcbs-q", "1.5"], "gcbs_q"),
        (["--batch-size", "500", "--n-train", "100"], "--batch-size 500 exceeds the 100 training images"),
    ]
    for extra, message in cases:
        assert main(["study", "batches", "--out", str(tmp_path / "x"), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_registered():
    from negbatch.lab.studies import STUDIES, batches

    assert STUDIES["batches"] is batches and callable(batches.report)
    assert set(batches.DATA) == {"images"}
