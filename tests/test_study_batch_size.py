"""The batch-size study: its configurations, its report's statistics, end to end on images and text."""

import json
import math
import re

import pytest
from scipy import stats

from _runs import figures_not_drawn
from negbatch.cli import main
from negbatch.lab import TrainConfig
from negbatch.lab.studies.batch_size import METHODS, method_config, method_of, report

OPTIONS = dict(largest=64, k=4, queue_size=128, lr_scaling="sqrt")
TINY = ["--n-train", "64", "--n-test", "64", "--encoder-widths", "16", "--head-widths", "16,8", "--knn-k", "5",
        "--epochs", "1", "--workers", "1"]


def test_each_method_is_one_configuration_read_back_from_its_fields():
    base = TrainConfig(lr=0.002)
    for method in METHODS:
        for b in (16, 64):
            cfg = method_config(base, method, b, **OPTIONS)
            assert method_of(cfg.to_dict()) == (method, b)
            trained = 64 if method == "gradcache" else b
            assert cfg.batch_size == trained and cfg.lr == pytest.approx(0.002 * math.sqrt(trained / 256))
    assert method_config(base, "infonce-k", 16, **OPTIONS).negatives == 4
    assert method_config(base, "queue", 16, **OPTIONS).queue_size == 128
    assert method_config(base, "queue", 16, **OPTIONS).key_momentum == 0
    moco = [method_config(base, "moco", b, **OPTIONS, momentum=0.9) for b in (64, 256, 1024)]
    assert [c.queue_size for c in moco] == [128] * 3
    # The keys average over as many samples at every B: m_B ** (1 / B) is constant.
    assert [c.key_momentum for c in moco] == pytest.approx([0.9 ** 0.25, 0.9, 0.9 ** 4])
    text_moco = method_config(TrainConfig(dataset="builtin"), "moco", 8, **OPTIONS)
    assert text_moco.symmetric is False and text_moco.key_momentum > 0
    assert method_config(TrainConfig(dataset="builtin"), "queue", 8, **OPTIONS).symmetric is True
    assert method_config(base, "gradcache", 16, **OPTIONS).chunk_size == 16
    text = TrainConfig(dataset="builtin")
    assert method_config(text, "infonce", 8, **OPTIONS).loss == "infonce"
    assert method_config(base, "infonce", 64, **{**OPTIONS, "lr_scaling": "linear"}).lr == pytest.approx(0.0005)


def _row(method, b, seed, value, seconds=1.0):
    cfg = method_config(TrainConfig(), method, b, **OPTIONS).replace(seed=seed)
    return {**cfg.to_dict(), "linear_acc": value, "train_seconds": seconds}


def test_report_changes_and_tests_match_scipy(tmp_path):
    """The report's numbers against scipy on hand-made results: drops per seed, Welch's test, the slope."""
    acc = {"infonce": {16: [0.80, 0.82, 0.81], 64: [0.90, 0.91, 0.93]},
           "global": {16: [0.88, 0.89, 0.90], 64: [0.90, 0.92, 0.91]}}
    rows = [_row(m, b, s, v) for m in acc for b in acc[m] for s, v in enumerate(acc[m][b])]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "study.json").write_text(json.dumps({
        "study": "batch-size", "modality": "image", "methods": ["infonce", "global", "dcl"], "batch_sizes": [16, 64],
        "seeds": [0, 1, 2], "k": 4, "queue_size": 128, "lr_scaling": "sqrt", "base": TrainConfig().to_dict(),
        "n_train": 100, "workers": 1, "metric": ["linear_acc", "linear-probe accuracy"]}))
    text = report(tmp_path).read_text()
    drop = {m: [acc[m][64][s] - acc[m][16][s] for s in range(3)] for m in acc}
    welch = stats.ttest_ind(drop["global"], drop["infonce"], equal_var=False)
    line = next(l for l in text.splitlines() if l.startswith("- **global**"))
    assert f"changes by {-sum(drop['global']) / 3:+.3f}" in line
    assert f"Welch p = {welch.pvalue:.2g}" in line and "it fares better than InfoNCE" in line
    slope = stats.linregress([4] * 3 + [6] * 3, acc["global"][16] + acc["global"][64])
    assert f"slope {slope.slope:+.4f} per doubling of B (p = {slope.pvalue:.2g})" in line
    assert "**6 of 18 runs missing**" in text  # dcl never ran
    gain = [acc["infonce"][16][s] - acc["infonce"][64][s] for s in range(3)]
    assert f"InfoNCE itself lost {abs(sum(gain) / 3):.3f}" in text
    assert f"p = {stats.ttest_1samp(gain, 0.0).pvalue:.2g}" in text
    assert (tmp_path / "batch_size.png").stat().st_size > 0


def test_report_judges_each_method_by_holms_adjusted_p(tmp_path):
    """Three methods against InfoNCE: one whose raw p is below 0.05 is within
    seed noise once the family of three is accounted for (Holm: twice its p,
    the second smallest of three); the clearest stays beyond it (three times its p)."""
    gains = {"infonce": [0.10, 0.11, 0.12], "global": [0.13, 0.14, 0.13], "dcl": [0.30, 0.31, 0.30],
             "siglip": [0.10, 0.12, 0.11]}
    rows = [_row(m, b, s, 0.5 + (g[s] if b == 16 else 0.0)) for m, g in gains.items() for b in (16, 64) for s in range(3)]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "study.json").write_text(json.dumps({
        "study": "batch-size", "modality": "image", "methods": list(gains), "batch_sizes": [16, 64],
        "seeds": [0, 1, 2], "k": 4, "queue_size": 128, "lr_scaling": "sqrt", "base": TrainConfig().to_dict(),
        "n_train": 100, "workers": 1, "metric": ["linear_acc", "linear-probe accuracy"]}))
    text = report(tmp_path).read_text()
    p = {m: stats.ttest_ind(gains[m], gains["infonce"], equal_var=False).pvalue for m in ("global", "dcl", "siglip")}
    assert p["dcl"] < p["global"] < 0.05 < 2 * p["global"] < p["siglip"]  # the data do what the test needs
    lines = {m: next(l for l in text.splitlines() if l.startswith(f"- **{m}**")) for m in p}
    assert "(within seed noise:" in lines["global"] and f"Welch p = {p['global']:.2g}" in lines["global"]
    assert f"Holm-adjusted over 3 = {2 * p['global']:.2g}" in lines["global"]
    assert "(beyond seed noise:" in lines["dcl"] and f"Holm-adjusted over 3 = {3 * p['dcl']:.2g}" in lines["dcl"]
    assert "(within seed noise:" in lines["siglip"] and "Holm-adjusted over 3 = 1)" in lines["siglip"]
    assert "Holm's adjusted p over the 3 comparisons" in text


def test_report_of_a_change_the_same_in_every_seed_does_not_call_it_noise(tmp_path):
    """InfoNCE's change equal in every seed (a coarse test set) has no spread to test against: the
    report set p = 1 and said "within seed noise" of a change of 0.05 (found by a newcomer's trial)."""
    rows = [_row(m, b, s, v) for m, g in (("infonce", 0.05), ("global", 0.0)) for b in (16, 64) for s in range(3)
            for v in [0.5 + (g if b == 16 else 0.0)]]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "study.json").write_text(json.dumps({
        "study": "batch-size", "modality": "image", "methods": ["infonce", "global"], "batch_sizes": [16, 64],
        "seeds": [0, 1, 2], "k": 4, "queue_size": 128, "lr_scaling": "sqrt", "base": TrainConfig().to_dict(),
        "n_train": 100, "workers": 1, "metric": ["linear_acc", "linear-probe accuracy"]}))
    text = report(tmp_path).read_text()
    assert "InfoNCE's change from B = 64 to B = 16 is +0.050 in every seed" in text
    assert "InfoNCE's change from the largest to the smallest batch is within seed noise" not in text


def test_report_of_one_seed_shows_no_spread_and_names_no_empty_family(tmp_path):
    """A study stopped after its first seed: each change is one value, not "± 0.000", and with no
    test made the report did not speak of "Holm's adjusted p over the 0 comparisons"."""
    rows = [_row(m, b, 0, v) for m, b, v in (("infonce", 16, 0.80), ("infonce", 64, 0.90), ("global", 16, 0.85),
                                             ("global", 64, 0.90))]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "study.json").write_text(json.dumps({
        "study": "batch-size", "modality": "image", "methods": ["infonce", "global"], "batch_sizes": [16, 64],
        "seeds": [0, 1], "k": 4, "queue_size": 128, "lr_scaling": "sqrt", "base": TrainConfig().to_dict(),
        "n_train": 100, "workers": 1, "metric": ["linear_acc", "linear-probe accuracy"]}))
    text = report(tmp_path).read_text()
    line = next(l for l in text.splitlines() if l.startswith("- **global**"))
    assert "changes by -0.050 (1 seed)" in line and "± 0.000" not in text
    assert "over the 0 comparisons" not in text and "no method's change was tested against InfoNCE's" in text
    assert "**4 of 8 runs missing**" in text


@pytest.mark.parametrize("argv, message", [
    (["--methods", "infonce,mocov3"], "--methods: unknown mocov3"),
    (["--seeds=-1,0"], "--seeds: -1 is negative"),
    (["--moco-momentum", "1.0"], r"--moco-momentum must be a float in \(0, 1\)"),
    (["--batch-sizes", "8,128"], "--batch-sizes: 128 exceeds the 64 training samples"),
    (["--batch-sizes", "8,16", "--k", "15"], r"--k 15: expected 1 <= K <= 14"),
    (["--queue-size", "0"], "--queue-size must be a positive int"),
    (["--batch-sizes", "16"], "--batch-sizes: the study compares batch sizes; give two or more"),
    (["--lr", "inf"], "lr: expected a float > 0; got inf"),  # --lr is an option (it was read as --lr-scaling)
])
def test_bad_options_are_refused_by_name(tmp_path, capsys, argv, message):
    assert main(["study", "batch-size", "--data", "digits", "--out", str(tmp_path), *TINY, *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    # Options no run of the plan reads were accepted, recorded in every run's config.json and ignored.
    (["--alpha", "2"], "alpha: applies to loss='relic' only; no method of this study trains ReLIC"),
    (["--methods", "infonce,dcl", "--gamma", "0.5"], "gamma: applies to loss='global' only; --methods has no global"),
    (["--methods", "infonce", "--gamma-schedule", "linear"], "gamma_schedule: applies to loss='global' only"),
    (["--momentum", "0.5"], "momentum: applies to optimizer sgd or lars only"),
    # Read by the gradcache runs, but then they measure accumulation (fewer negatives), not GradCache.
    (["--methods", "infonce,gradcache", "--chunk-method", "accumulate"],
     "the batch-size study does not take chunk_method='accumulate'"),
])
def test_options_no_run_reads_or_that_change_a_method_are_refused(tmp_path, capsys, argv, message):
    assert main(["study", "batch-size", "--data", "digits", "--out", str(tmp_path / "s"), *TINY,
                 "--batch-sizes", "16,32", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    tmp_path.joinpath("c.toml").write_text("alpha = 2.0\n")  # from a config file alike
    assert main(["study", "batch-size", "--data", "digits", "--out", str(tmp_path / "s"), *TINY,
                 "--batch-sizes", "16,32", "--config", str(tmp_path / "c.toml")]) == 2
    assert "alpha: applies to loss='relic' only" in capsys.readouterr().err


def test_an_option_the_study_lacks_is_not_read_as_a_longer_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's abbreviations read it as --batch-sizes 16
        main(["study", "batch-size", "--data", "digits", "--out", str(tmp_path), *TINY, "--batch-size", "16"])
    assert stop.value.code == 2 and "--batch-size: did you mean --batch-sizes?" in capsys.readouterr().err


def study_args(argv):
    from negbatch.cli import build_parser

    return build_parser(("batch-size", "image")).parse_args(["study", "batch-size", *argv])


def test_image_study_end_to_end_resumes_and_reports(tmp_path, capsys, monkeypatch):
    argv = ["study", "batch-size", "--data", "digits", "--out", str(tmp_path), *TINY,
            "--methods", "infonce,queue,gradcache", "--batch-sizes", "8,16", "--seeds", "0,1", "--lr", "0.004"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "[12/12] gradcache B=16 seed=1" in err and "left)" in err
    rows = json.loads((tmp_path / "results.json").read_text())
    assert sorted(method_of(r) for r in rows) == sorted((m, b) for m in ("infonce", "queue", "gradcache")
                                                        for b in (8, 16) for _ in range(2))
    assert {r["batch_size"] for r in rows if method_of(r)[0] == "gradcache"} == {16}
    text = (tmp_path / "report.md").read_text()
    assert all(f"**{m}**" in text for m in ("infonce", "queue", "gradcache")) and "missing" not in text
    assert json.loads((tmp_path / "study.json").read_text())["base"]["lr"] == 0.004  # --lr, the base rate
    figures_not_drawn(monkeypatch)  # drawn above
    assert main(argv) == 0  # everything finished: nothing trains again
    assert "12 finished earlier (skipped)" in capsys.readouterr().err
    # A rerun that trains nothing leaves what the times were measured under (here 1 run at a time) as it was.
    from negbatch.lab.studies import get_study

    study = get_study("batch-size", "image")
    configs = study.plan(study_args(argv[2:] + ["--workers", "2"]))[1]
    study.release_folder()
    assert json.loads((tmp_path / "study.json").read_text())["workers"] == [1]
    assert study._workers_of(tmp_path, configs + [configs[0].replace(seed=9)], 2) == [1, 2]  # one to train
    # Other options in the same folder: the runs they leave out are said to stay on disk, out of the report.
    assert main(argv[:-4] + ["--seeds", "0"] + argv[-2:]) == 0
    assert "note: 6 finished run(s)" in capsys.readouterr().err


def test_text_study_end_to_end(tmp_path, capsys):
    pytest.importorskip("tokenizers", reason="the text study needs the text extra")
    argv = ["study", "batch-size", "--data", "builtin", "--out", str(tmp_path), "--methods", "infonce,siglip,dcl,moco",
            "--batch-sizes", "4,8", "--seeds", "0", "--epochs", "1", "--workers", "1", "--text-dim", "16",
            "--vocab-size", "200", "--k", "2"]
    assert main(argv) == 0
    # --k without infonce-k trains nothing: said (it was accepted without a word)
    assert "--k 2: not used, it applies to --methods infonce-k, which this study does not run" in capsys.readouterr().err
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 8 and all(0 <= r["ndcg@10"] <= 1 for r in rows)
    assert {method_of(r)[0] for r in rows} == {"infonce", "siglip", "dcl", "moco"}
    text = (tmp_path / "report.md").read_text()
    assert "nDCG@10" in text and "**moco**" in text and "momentum encoder of momentum 0.9 at B = 256" in text


@pytest.mark.slow
def test_every_method_on_images_and_text(tmp_path):
    assert main(["study", "batch-size", "--data", "digits", "--out", str(tmp_path / "image"), *TINY,
                 "--batch-sizes", "8,16", "--seeds", "0,1", "--k", "4"]) == 0
    assert len(json.loads((tmp_path / "image" / "results.json").read_text())) == 32
    assert main(["study", "batch-size", "--data", "builtin", "--out", str(tmp_path / "text"), "--batch-sizes", "4,8",
                 "--seeds", "0,1", "--epochs", "1", "--text-dim", "16", "--vocab-size", "200", "--k", "2"]) == 0
    assert len(json.loads((tmp_path / "text" / "results.json").read_text())) == 32


# SIGINT in the quick suite; SIGTERM and Ctrl-C (the group) take the same path and 40-50 s each: slow.
@pytest.mark.parametrize("signum", ["SIGINT", pytest.param("SIGTERM", marks=pytest.mark.slow),
                                    pytest.param("Ctrl-C", marks=pytest.mark.slow)])
def test_a_signal_to_the_study_alone_stops_its_workers_runs_with_checkpoints(tmp_path, capsys, signum):
    """``kill -INT`` (or a scheduler's SIGTERM) reaches the study's process, not its workers: the study
    still stops -- no queued run starts, the running ones stop after their step with a checkpoint --
    and the same command finishes it. Ctrl-C reaches every process of the group: the study's process
    says once that the runs stop (each worker said it too, one line per running run)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    argv = ["study", "batch-size", "--data", "digits", "--out", str(tmp_path), "--n-train", "512", "--n-test", "64",
            "--encoder-widths", "16", "--head-widths", "16,8", "--knn-k", "5", "--epochs", "6", "--workers", "2",
            "--methods", "infonce,dcl", "--batch-sizes", "8,16", "--seeds", "0", "--log-every", "1"]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    # The study's SIGINT as a terminal's process has it. A child inherits an ignored or blocked SIGINT
    # across exec, and this test failed now and then in the quick suite (2 of 6 runs on 2026-12-04, never
    # alone, not under a CPU hog): the study ran to its end with returncode 0, as if the signal had no
    # effect. What the pytest worker held then is in the message below.
    worker_state = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))

    def terminal_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    study = subprocess.Popen([sys.executable, "-m", "negbatch.cli", *argv], stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True,  # its own group: nothing but the study gets the signal
                             preexec_fn=terminal_sigint)
    start = time.time()
    deadline = start + 120
    while sum(1 for p in tmp_path.glob("runs/*/metrics.jsonl") if p.stat().st_size) < 2 and time.time() < deadline:
        time.sleep(0.05)
    before = f"signal sent after {time.time() - start:.1f} s, the study {'running' if study.poll() is None else 'ended'}"
    if signum == "Ctrl-C":
        os.killpg(study.pid, signal.SIGINT)
    else:
        study.send_signal(getattr(signal, signum))
    _, err = study.communicate(timeout=120)
    signum = "SIGINT" if signum == "Ctrl-C" else signum
    assert study.returncode == 128 + getattr(signal, signum), (before, worker_state, err)  # 130 or 143: which stopped it
    assert err.count("stopping: 2 running run(s) stop after their step, with a checkpoint") == 1, err
    assert "stopping after this step" not in err, err
    assert err.count("run the same command again to resume") >= 2, err  # both running runs stopped, saved
    runs = list(tmp_path.glob("runs/*"))
    assert len(runs) == 2 and all((r / "checkpoint.pt").exists() for r in runs)  # no queued run started
    assert not (tmp_path / "results.json").exists() or len(json.loads((tmp_path / "results.json").read_text())) < 4
    assert main(argv) == 0
    assert len(json.loads((tmp_path / "results.json").read_text())) == 4


def test_a_study_stopped_by_sigint_says_so_and_resumes(tmp_path, capsys):
    """Ctrl-C (SIGINT) stops the run after its step with a checkpoint; the study exits 130 with a message, not a
    traceback, and the same command finishes it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    argv = ["study", "batch-size", "--data", "digits", "--out", str(tmp_path), "--n-train", "256", "--n-test", "64",
            "--encoder-widths", "16", "--head-widths", "16,8", "--knn-k", "5", "--epochs", "3", "--workers", "1",
            "--methods", "infonce", "--batch-sizes", "8,16", "--seeds", "0", "--log-every", "1"]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    # A real process and a real signal: the console's exit status and its message are what is checked.
    study = subprocess.Popen([sys.executable, "-m", "negbatch.cli", *argv], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not any(p.stat().st_size for p in tmp_path.glob("runs/*/metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.05)
    study.send_signal(signal.SIGINT)
    _, err = study.communicate(timeout=120)
    assert study.returncode == 130, err
    assert "stopped" in err and "run the same command again to resume" in err and "Traceback" not in err
    # The same command finishes it: run here, in this process (the console's code path, without a second start-up).
    assert main(argv) == 0
    assert "resuming from step" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "results.json").read_text())) == 2


def test_the_image_study_uses_its_own_defaults_without_dataset_and_refuses_steps(tmp_path, capsys):
    import argparse

    from negbatch.cli import main
    from negbatch.lab.studies import get_study

    study = get_study("batch-size", "image")
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    plain, named = (study.base_config(parser.parse_args(argv)) for argv in ([], ["--dataset", "fashion-mnist"]))
    assert plain == named and plain.dataset == "fashion-mnist"
    assert (plain.n_test, plain.probe_samples) == (None, None)  # what docs/batch_size.md measured
    assert main(["study", "batch-size", "--data", "digits", "--steps", "3", "--out", str(tmp_path / "s")]) == 2
    assert "equal epochs" in capsys.readouterr().err


def test_help_states_the_studys_own_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse may wrap a line inside "fashion-mnist"
    with pytest.raises(SystemExit):
        main(["study", "batch-size", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(this study's default: fashion-mnist)" in text and "(this study's default: 2)" in text
    assert "(default: digits)" not in text and "(default 10 images)" not in text
