"""``negbatch study gradcache``: a quick study in-process (its measurement runs
in a fresh process, as always), the full study end to end (slow), the
aggregation by hand."""

import json

import pytest

from negbatch.lab.studies import get_study
from negbatch.lab.studies import gradcache as study
from negbatch.lab.studies import gradcache_report

TINY = ["--batch-sizes", "8,16", "--chunk-size", "4", "--repeats", "1", "--steps", "1",
        "--encoder-widths", "16", "--head-widths", "16,8",
        "--accuracy-batch-sizes", "16", "--accuracy-chunk-size", "4", "--seeds", "0", "--epochs", "1",
        "--n-train", "64", "--n-test", "48"]


def test_registered():
    assert isinstance(get_study("gradcache", "image"), study.ImageGradCache)


def test_quick_study(tmp_path, capsys, monkeypatch):
    from negbatch.cli import main

    out = tmp_path / "gc"
    args = ["study", "gradcache", "--dataset", "digits", "--batch-sizes", "8", "--methods", "cache", "--repeats", "1",
            "--steps", "1", "--encoder-widths", "16", "--head-widths", "16,8", "--accuracy-batch-sizes", "none",
            "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    (row,) = json.loads((out / "results.json").read_text())
    assert row["method"] == "cache" and row["batch_size"] == 8 and row["time_s"] > 0 and row["peak_mib"] > 0
    measurement = json.loads((out / "measurements" / "cache-B8-r0.json").read_text())
    assert measurement["memory_source"] in ("VmHWM after clear_refs", "ru_maxrss")
    assert "cache MiB" in (out / "report.md").read_text() and not (out / "accuracy").exists()
    capsys.readouterr()
    monkeypatch.setattr(study, "report", lambda folder: folder / "report.md")  # drawn above
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "1 done earlier (skipped)" in err and "[1/" not in err


@pytest.mark.slow
def test_study_end_to_end_resumes_and_reports(tmp_path):
    from negbatch.cli import main

    out = tmp_path / "gc"
    args = ["study", "gradcache", *TINY, "--out", str(out)]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    assert sorted((x["batch_size"], x["method"]) for x in rows) == sorted(
        (b, m) for b in (8, 16) for m in ("plain", "accumulate", "cache"))
    for x in rows:
        assert x["repeats"] == 1 and x["time_s"] > 0 and x["step_mib"] >= 0 and x["peak_mib"] > 0
    assert len(list((out / "measurements").glob("*.json"))) == 6
    acc = json.loads((out / "accuracy" / "results.json").read_text())
    assert sorted((str(a["chunk_size"]), a["chunk_method"]) for a in acc) == [("4", "accumulate"), ("4", "cache"), ("None", "cache")]
    text = (out / "report.md").read_text()
    for piece in ("| B |", "cache/plain time", "## What the data show", "## Downstream linear accuracy", "2·4−2 negatives"):
        assert piece in text, piece
    for name in ("memory_vs_batch.png", "time_vs_batch.png", "accuracy_vs_batch.png", "results.csv"):
        assert (out / name).exists(), name

    # A rerun measures and trains nothing again; a lost measurement is redone alone.
    files = sorted(out.glob("measurements/*.json")) + sorted(out.glob("accuracy/runs/*/summary.json"))
    before = {p: p.stat().st_mtime_ns for p in files}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == before
    lost = out / "measurements" / "cache-B16-r0.json"
    lost.unlink()
    assert main(args) == 0 and lost.exists()
    assert {p: p.stat().st_mtime_ns for p in files if p != lost} == {p: t for p, t in before.items() if p != lost}
    # Larger batches in a rerun get a pool that holds them (not one redrawn with replacement).
    import torch

    assert torch.load(out / "pool.pt", weights_only=True).shape[0] == 16
    larger = [a if a != "8,16" else "8,16,32" for a in args]
    assert main(larger) == 0
    assert torch.load(out / "pool.pt", weights_only=True).shape[0] == 32
    # Another setup in the same folder is refused; the report is rebuilt from the folder alone.
    assert main([*args, "--temperature", "0.5"]) == 2
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").exists()


def test_bad_options(tmp_path, capsys):
    from negbatch.cli import main

    cases = [(["--methods", "plain,fast"], "--methods"), (["--batch-sizes", "1,8"], "--batch-sizes"),
             (["--chunk-size", "0"], "--chunk-size"), (["--repeats", "0"], "--repeats")]
    for extra, message in cases:
        assert main(["study", "gradcache", "--out", str(tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err, extra


def test_aggregate_median_spread_and_oom(tmp_path):
    (tmp_path / "measurements").mkdir()
    values = [(0, 10.0, 0.3), (1, 30.0, 0.1), (2, 20.0, 0.2)]
    for r, mib, t in values:
        m = {"batch_size": 8, "method": "cache", "chunk_size": 4, "repeat": r, "step_bytes": mib * 2**20,
             "peak_bytes": (100 + mib) * 2**20, "time_s": t, "load": 1.0}
        (tmp_path / "measurements" / f"cache-B8-r{r}.json").write_text(json.dumps(m))
    (tmp_path / "measurements" / "plain-B8-r0.json").write_text(
        json.dumps({"batch_size": 8, "method": "plain", "chunk_size": 4, "repeat": 0, "oom": True}))
    rows = {r["method"]: r for r in gradcache_report.aggregate(tmp_path)}
    c = rows["cache"]
    assert (c["step_mib"], c["step_mib_min"], c["step_mib_max"]) == (20.0, 10.0, 30.0)
    assert (c["time_s"], c["time_s_min"], c["time_s_max"]) == (0.2, 0.1, 0.3)
    assert c["peak_mib"] == 120.0 and c["repeats"] == 3 and c["oom"] == 0
    assert rows["plain"]["oom"] == 1 and rows["plain"]["time_s"] is None and rows["plain"]["chunk_size"] is None


def test_findings_say_accumulation_is_the_plain_step_when_one_chunk_holds_the_batch():
    """At B <= chunk one chunk holds the batch: the report called accumulation
    'a different loss' (negatives from its chunk only) there too."""
    from negbatch.lab.studies.gradcache_report import _findings

    def cell(time_s):
        return {"time_s": time_s, "time_s_min": time_s, "time_s_max": time_s, "step_mib": 10.0}

    for big, chunk, same in ((16, 64, True), (256, 64, False)):
        by = {(big, "plain"): cell(1.0), (big, "cache"): cell(1.2), (big, "accumulate"): cell(1.1)}
        text = " ".join(_findings(by, [big], chunk, 8))
        assert ("one chunk holds the whole batch, so accumulation is the plain step" in text) == same, text
        assert ("optimises a different loss" in text) == (not same), text


def test_one_seed_gives_no_verdict_on_the_batch_size_claim():
    from negbatch.lab.studies.gradcache_report import _accuracy_findings

    one = _accuracy_findings({(64, "cache"): [0.80], (256, "cache"): [0.81]}, [64, 256], 32)[-1]
    assert "too few seeds for a test" in one and "no test: run several --seeds" in one and "does not show" not in one
    three = _accuracy_findings({(64, "cache"): [0.80, 0.81, 0.79], (256, "cache"): [0.80, 0.82, 0.80]}, [64, 256], 32)
    assert "does not show at this scale" in three[-1]


def test_a_rerun_with_fewer_settings_reports_only_its_own(tmp_path, monkeypatch, capsys):
    """A rerun into the same folder with fewer batch sizes, methods or repeats, or without the
    trainings, rewrote study.json but its table and report still held the earlier invocation's
    measurements (a cell's min-max over 2 repeats under "over 1 fresh processes") and trainings."""
    from negbatch.cli import main

    def fake(setup, pool):
        return {**setup, "peak_bytes": 2**20 * (10 + setup["repeat"]), "base_bytes": 0,
                "step_bytes": 2**20 * (1 + setup["repeat"]), "memory_source": "fake", "times": [0.1],
                "time_s": 0.1 * (1 + setup["repeat"]), "loss": 1.0, "load": 0.0}

    monkeypatch.setattr(study, "measure_in_subprocess", fake)
    out = tmp_path / "gc"
    shared = ["--chunk-size", "4", "--steps", "1", "--encoder-widths", "16", "--head-widths", "16,8",
              "--accuracy-chunk-size", "4", "--seeds", "0", "--epochs", "1", "--n-train", "64", "--n-test", "48",
              "--out", str(out)]
    assert main(["study", "gradcache", *shared, "--batch-sizes", "8,16", "--repeats", "2",
                 "--accuracy-batch-sizes", "16"]) == 0
    assert "## Downstream linear accuracy" in (out / "report.md").read_text()
    assert len(json.loads((out / "results.json").read_text())) == 6
    capsys.readouterr()
    assert main(["study", "gradcache", *shared, "--batch-sizes", "8", "--repeats", "1", "--methods", "cache",
                 "--accuracy-batch-sizes", "none"]) == 0
    assert "3 finished training(s)" in capsys.readouterr().err
    (row,) = json.loads((out / "results.json").read_text())
    assert (row["batch_size"], row["method"], row["repeats"], row["step_mib"], row["step_mib_max"]) == (8, "cache", 1, 1.0, 1.0)
    text = (out / "report.md").read_text()
    assert "## Downstream linear accuracy" not in text and "| 16 |" not in text
    assert len(list((out / "measurements").glob("*.json"))) == 12  # kept for a rerun of the first command
