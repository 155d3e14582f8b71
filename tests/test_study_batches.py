"""``negbatch study batches`` end to end (in-process at tiny sizes; the full
version with three samplers and two seeds is marked slow), its rerun, its
report from the folder alone, and its errors."""

import json

import pytest

from _runs import figures_not_drawn
from negbatch.cli import main

TINY = ["--n-train", "80", "--n-test", "48", "--batch-size", "16", "--epochs", "2",
        "--encoder-widths", "16", "--head-widths", "16,8", "--knn-k", "5", "--gcbs-q", "0.95"]


def _check_study(out, samplers, seeds):
    spec = json.loads((out / "study.json").read_text())
    assert spec["study"] == "batches" and spec["modality"] == "image" and spec["base"]["log_gap"] is True
    rows = json.loads((out / "results.json").read_text())
    assert sorted((x["sampler"], x["seed"]) for x in rows) == sorted((s, i) for s in samplers for i in seeds)
    assert (out / "results.csv").read_text().count("\n") == len(rows) + 1
    for x in rows:
        assert x["epochs"] == 2 and x["gcbs_q"] == 0.95
        assert x["final_gap"] >= 0 and 0 <= x["linear_acc"] <= 1
        # Embedding + ordering: a real share for gcbs and hard, a permutation's for random.
        assert x["sampler_seconds"] > 0 if x["sampler"] != "random" else x["sampler_seconds"] < 0.1 * x["train_seconds"]
        metrics = [json.loads(line) for line in (out / "runs" / x["run"] / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics if "gap" in m] == [0, 1]
    text = (out / "report.md").read_text()
    assert "## What the data show" in text and "ordering share" in text
    assert all(f"**{s} vs random**" in text for s in samplers if s != "random")
    for name in ("gap_over_training.png", "accuracy_and_time.png"):
        assert (out / name).stat().st_size > 0, name
    return text


def test_study_batches_one_sampler_against_random(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    args = ["study", "batches", *TINY, "--samplers", "random,gcbs", "--seeds", "3", "--out", str(out)]
    assert main(args) == 0
    text = _check_study(out, ["random", "gcbs"], [3])
    assert "too few seeds for a test" in text and "**hard vs random**" not in text and "| random | 1 |" in text
    # The report is rebuilt from the folder alone; a rerun trains nothing again.
    figures_not_drawn(monkeypatch)  # drawn above
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == text
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    capsys.readouterr()
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == before
    assert "2 finished earlier (skipped)" in capsys.readouterr().err


def test_study_batches_given_steps_reports_time_per_epoch(tmp_path, monkeypatch):
    """``--steps`` instead of ``--epochs`` (a run then has no ``epochs``): the report failed with
    "int() argument must be ... not 'NoneType'" after every run had trained. 7 steps of 5 per epoch
    (80 images, batch 16) are 1.4 epochs."""
    figures_not_drawn(monkeypatch)
    out = tmp_path / "s"
    args = [a for a in TINY if a not in ("--epochs", "2", "--gcbs-q", "0.95")]
    assert main(["study", "batches", *args, "--steps", "7", "--samplers", "random", "--seeds", "0",
                 "--out", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())
    assert row["epochs"] is None and row["steps"] == 7
    per_epoch = (row["train_seconds"] - row["gap_seconds"]) / 1.4
    text = (out / "report.md").read_text()
    assert "7 steps" in text and f"| {per_epoch:.3f} (1 value) |" in text, text


@pytest.mark.slow
def test_study_batches_end_to_end(tmp_path):
    out = tmp_path / "study"
    assert main(["study", "batches", *TINY, "--seeds", "0,1", "--out", str(out)]) == 0
    text = _check_study(out, ["random", "gcbs", "hard"], [0, 1])
    assert "| random | 2 |" in text and "Welch p" in text


def test_study_batches_errors(tmp_path, capsys):
    cases = [
        (["--samplers", "random,best"], "--samplers: unknown best"),
        (["--data", "text"], "--data: expected one of"),
        (["--seeds", "0,0"], "--seeds lists a value twice"),
        (["--dataset", "fashion-mnist", "--data-dir", str(tmp_path)], "apt-get install dataset-fashion-mnist"),
        (["--gcbs-q", "1.5"], "gcbs_q"),
        (["--batch-size", "500", "--n-train", "100"], "--batch-size 500 exceeds the 100 training images"),
    ]
    for extra, message in cases:
        assert main(["study", "batches", "--out", str(tmp_path / "x"), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x").exists()


def test_registered():
    from negbatch.lab.studies import get_study
    from negbatch.lab.studies.batches import ImageBatches
    from negbatch.lab.studies.text_batches import TextBatches

    assert isinstance(get_study("batches", "image"), ImageBatches)
    assert isinstance(get_study("batches", "text"), TextBatches)


def test_text_report_judges_each_sampler_by_holms_adjusted_p(tmp_path):
    """Hand-made results of three samplers against random: gcbs's raw p is
    below 0.05 but twice it (Holm, second smallest of three) is not; hard's
    stays below after three times it."""
    from scipy import stats

    from negbatch.lab import TrainConfig
    from negbatch.lab.studies.text_batches import report

    ndcg = {"random": [0.10, 0.11, 0.12], "gcbs": [0.13, 0.14, 0.13], "hard": [0.30, 0.31, 0.30],
            "no-duplicates": [0.10, 0.12, 0.11]}
    base = TrainConfig(dataset="builtin").to_dict()
    rows = [{**base, "sampler": s, "seed": seed, "recall@1": v, "recall@5": v, "recall@10": v, "mrr@10": v,
             "ndcg@10": v, "final_loss": 1.0, "train_seconds": 1.0}
            for s, vals in ndcg.items() for seed, v in enumerate(vals)]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "study.json").write_text(json.dumps({"study": "batches", "modality": "text", "base": base,
                                                     "samplers": list(ndcg), "seeds": [0, 1, 2], "runs": 12}))
    text = report(tmp_path).read_text()
    p = {s: stats.ttest_ind(ndcg[s], ndcg["random"], equal_var=False).pvalue for s in ("gcbs", "hard", "no-duplicates")}
    assert p["hard"] < p["gcbs"] < 0.05 < 2 * p["gcbs"] < p["no-duplicates"]
    lines = {s: next(l for l in text.splitlines() if l.startswith(f"- **{s}**")) for s in p}
    assert f"within seed noise (Welch p = {p['gcbs']:.2g}, Holm-adjusted over 3 = {2 * p['gcbs']:.2g})" in lines["gcbs"]
    assert f"beyond seed noise (Welch p = {p['hard']:.2g}, Holm-adjusted over 3 = {3 * p['hard']:.2g})" in lines["hard"]
    assert "within seed noise" in lines["no-duplicates"] and "Holm's adjusted p over the 3" in text


def test_image_report_judges_each_quantity_by_holms_adjusted_p(tmp_path, monkeypatch):
    """Hand-made runs of gcbs and hard against random: gcbs's linear accuracy
    has the smaller raw p of the two, below 0.05, which Holm's doubling lifts
    above it ("within seed noise"); hard's gap holds after the adjustment, as
    each quantity is its own family (gcbs's equal gap does not weaken it)."""
    from scipy import stats

    from negbatch.lab import TrainConfig
    from negbatch.lab.studies.batches import report

    figures_not_drawn(monkeypatch)
    acc = {"random": [0.80, 0.81, 0.82], "gcbs": [0.83, 0.84, 0.83], "hard": [0.80, 0.83, 0.81]}
    gap = {"random": [2.0, 2.1, 2.2], "gcbs": [1.9, 2.1, 2.3], "hard": [1.0, 1.1, 1.0]}
    base = TrainConfig(log_gap=True).to_dict()
    rows = []
    for s in acc:
        for seed in range(3):
            run = f"{s}-{seed}"
            rows.append({**base, "sampler": s, "seed": seed, "run": run, "epochs": 2, "train_seconds": 2.0,
                         "gap_seconds": 0.2, "sampler_seconds": 0.1, "final_gap": gap[s][seed], "mean_gap": gap[s][seed],
                         "linear_acc": acc[s][seed], "knn_acc": acc[s][seed]})
            folder = tmp_path / "runs" / run
            folder.mkdir(parents=True)
            (folder / "metrics.jsonl").write_text("".join(
                json.dumps({"epoch": e, "gap": gap[s][seed], "gap_global_loss": 4.0 + 0.1 * seed,
                            "same_class_pairs": 0.1}) + "\n" for e in range(2)))
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "study.json").write_text(json.dumps({"study": "batches", "modality": "image", "base": base,
                                                     "samplers": list(acc), "seeds": [0, 1, 2], "n_train_used": 80,
                                                     "raw_pixel_linear_acc": None}))
    text = report(tmp_path).read_text()
    p = {s: stats.ttest_ind(acc[s], acc["random"], equal_var=False).pvalue for s in ("gcbs", "hard")}
    assert p["gcbs"] < 0.05 < 2 * p["gcbs"] and p["gcbs"] < p["hard"]
    lines = {s: next(line for line in text.splitlines() if line.startswith(f"- **{s} vs random**")) for s in p}
    assert (f"linear acc 0.833 ± 0.006 vs 0.810 ± 0.010 (better, within seed noise, Welch p = {p['gcbs']:.2g}, "
            f"Holm-adjusted over 2 = {2 * p['gcbs']:.2g})") in lines["gcbs"]
    assert f"within seed noise, Welch p = {p['hard']:.2g}, Holm-adjusted over 2 = {p['hard']:.2g}" in lines["hard"]
    # The gaps are their own family: gcbs's equal gap does not weaken hard's.
    p_gap = {s: stats.ttest_ind(gap[s], gap["random"], equal_var=False).pvalue for s in ("gcbs", "hard")}
    assert f"final gap 1.033 ± 0.058 vs 2.100 ± 0.100 (better, beyond seed noise, Welch p = {p_gap['hard']:.2g}, " \
           f"Holm-adjusted over 2 = {2 * p_gap['hard']:.2g})" in lines["hard"]
    assert "Verdict: the gap shrinks as designed, but the downstream difference is within seed noise" in lines["hard"]
    assert "Verdict: the gap does not shrink beyond seed noise" in lines["gcbs"]
    assert "Holm's adjusted p over those comparisons" in text


@pytest.mark.parametrize("argv, message", [
    # An option of a sampler, loss or optimizer that no run of the plan has: accepted, recorded as used, ignored.
    (["study", "batches", "--data", "digits", "--samplers", "random,hard", "--gcbs-q", "0.5"],
     "gcbs_q: applies to sampler='gcbs' only; no run of this study has one"),
    (["study", "batches", "--data", "builtin", "--batch-size", "8", "--samplers", "random", "--gamma", "0.5"],
     "gamma: applies to loss='global' only; no run of this study has one"),
    (["study", "negatives", "--data", "digits", "--losses", "simclr", "--alpha", "2"],
     "alpha: applies to loss='relic' only"),
])
def test_an_option_no_run_of_the_study_reads_is_refused(tmp_path, capsys, argv, message):
    assert main([*argv, "--seeds", "0", "--out", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
