"""Every command at tiny sizes, in-process (the same code path as the console
script); the full study with worker processes through a subprocess is marked
slow. The console entry point itself runs in fresh processes in test_torchrun.py
(`negbatch train`) and test_study_batch_size.py (a study stopped by SIGINT)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _runs import figures_not_drawn
from negbatch.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--n-train", "64", "--n-test", "48", "--batch-size", "16", "--epochs", "1",
        "--encoder-widths", "16", "--head-widths", "16,8", "--knn-k", "5"]


def negbatch(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "negbatch.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _help(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0, argv
    return capsys.readouterr().out


def test_help_everywhere_and_version(capsys):
    for cmd in ([], ["demo"], ["study"], ["train"], ["report"]):
        assert "usage: negbatch" in _help(capsys, *cmd), cmd
    image = _help(capsys, "study", "negatives")
    assert "--ks" in image and "--temperature " not in image  # swept: --temperatures instead
    assert "--text-dim" not in image and "negbatch study negatives --data bible --help" in image
    text = _help(capsys, "study", "negatives", "--data", "bible")
    assert "--text-dim" in text and "1,4,16,all" in text and "--encoder-widths" not in text
    assert "negbatch study negatives --data digits --help" in text
    for name in ("batches", "gradcache"):
        assert f"negbatch study {name} --data bible --help" in _help(capsys, "study", name)
        assert "--text-dim" in _help(capsys, "study", name, "--dataset=builtin")
    assert "on image data only" in _help(capsys, "study", "bias")
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    from negbatch import __version__

    assert capsys.readouterr().out.strip() == f"negbatch {__version__}"


def test_train_help_names_every_image_data_set(capsys):
    # --dataset's help listed digits, fashion-mnist, mnist5k and arrays:PATH only (until 2026-12-03): a
    # newcomer reading it could not tell that cifar10, cifar100, stl10 and imagefolder are accepted.
    from negbatch.data import DATASETS

    text = " ".join(_help(capsys, "train").split())
    dataset_help = text[text.index("--dataset DATASET"):text.index("--data-dir DATA_DIR")]
    assert all(name in dataset_help for name in DATASETS if name != "npz"), dataset_help


def test_unknown_option_gets_its_commands_usage_and_a_suggestion(capsys):
    for argv, usage in ((["train", "--bogus", "1"], "usage: negbatch train"),
                        (["study", "batches", "--samplerz", "gcbs"], "usage: negbatch study batches"),
                        (["report", "x", "--verbose"], "usage: negbatch report")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and usage in err and "unrecognized arguments" in err, argv
        assert "COMMAND" not in err, argv  # not the top-level usage
    with pytest.raises(SystemExit):
        main(["train", "--temprature", "0.5"])
    assert "--temprature: did you mean --temperature?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "batches", "--samplerz", "gcbs"])
    assert "did you mean --samplers?" in capsys.readouterr().err


def test_train_then_report(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("loss: relic\nnegatives: 4\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), *TINY, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "linear accuracy" in out and "report:" in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["negatives"] == 4
    (tmp_path / "run" / "curves.png").unlink()
    assert main(["report", str(tmp_path / "run")]) == 0 and (tmp_path / "run" / "curves.png").exists()



def test_report_of_an_unfinished_run_says_how_to_finish_it(tmp_path, capsys):
    """It said only "neither a study folder (no study.json) nor a finished run (no summary.json)"."""
    from negbatch.lab import TrainConfig, train

    cfg = TrainConfig(n_train=64, n_test=32, batch_size=16, epochs=1, encoder_widths=(8,), head_widths=(8, 4))
    train(cfg, tmp_path / "run", stop_after=2)
    assert main(["report", str(tmp_path / "run")]) == 2
    assert ("holds a run that has not finished (no summary.json): run the command that started it again "
            "(negbatch train, or the study's) to finish it (it resumes from its checkpoint)") in capsys.readouterr().err


def test_a_runs_config_json_trains_again_as_a_config_file(tmp_path, capsys):
    # --help and docs/lab.md say a run's config.json works as --config; it recorded every field (gamma,
    # momentum, gcbs_q, ... at their defaults), and until 2026-12-03 each was refused as "an option that
    # this run would not use". A value of its own still is (test_clear_errors: alpha = 2.0 under simclr).
    assert main(["train", *TINY, "--loss", "relic", "--out", str(tmp_path / "a")]) == 0
    config = str(tmp_path / "a" / "config.json")
    assert main(["train", "--config", config, "--out", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    first, again = (json.loads((tmp_path / run / "summary.json").read_text()) for run in "ab")
    assert again["linear_acc"] == first["linear_acc"] and again["final_loss"] == first["final_loss"]
    # A study took the same file and refused it the same way.
    study = ["study", "negatives", "--config", config, "--ks", "2,all", "--losses", "simclr", "--seeds", "0",
             "--workers", "1", "--out", str(tmp_path / "study")]
    assert main(study) == 0, capsys.readouterr().err
    (tmp_path / "g.toml").write_text("gamma = 0.5\n")  # a value of its own, read by no run: refused
    study[3], study[-1] = str(tmp_path / "g.toml"), str(tmp_path / "study2")
    assert main(study) == 2
    assert "gamma: applies to loss='global' only" in capsys.readouterr().err


def test_train_on_unlabeled_arrays_ends_with_its_summary_line(tmp_path, capsys):
    # docs/lab.md: a .npy is trained on, with no probe. The run finished, then the command ended in a
    # KeyError traceback on 'linear_acc' while printing its last line (until 2026-12-03).
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    argv = ["train", "--data", f"arrays:{tmp_path / 'x.npy'}", "--batch-size", "8", "--epochs", "1",
            "--encoder-widths", "16", "--head-widths", "16,8", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert "trained 5 steps; evaluation: none (the data set has no labels); report:" in capsys.readouterr().out


def test_train_text_pairs_with_named_columns(tmp_path, capsys):
    pytest.importorskip("tokenizers", reason="text runs need the text extra")
    rows = [{"q": f"question {i} about topic {i % 7}", "d": f"answer {i} on subject {i % 7}",
             "h": [f"other answer {i + 1}"]} for i in range(24)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--data", f"pairs:{path}", "--query-column", "q", "--document-column", "d",
            "--hard-negatives-column", "h", "--test-fraction", "0.25", "--batch-size", "4", "--steps", "2",
            "--text-dim", "16", "--text-heads", "2", "--vocab-size", "300", "--out", str(tmp_path / "run")]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for piece in ("recall@1", "recall@10", "mrr@10", "ndcg@10", "untrained encoder", "report:"):
        assert piece in out, piece
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["hard_negatives"] == 1 and summary["config"]["query_column"] == "q"
    assert f"ndcg@10 {summary['ndcg@10']:.4f}" in out
    # The file's own column names are what a missing column's message points to.
    assert main(["train", "--data", f"pairs:{path}", "--out", str(tmp_path / "bad")]) == 2
    assert "no column 'query'" in capsys.readouterr().err


def _tty_stderr(monkeypatch):
    class TTY(io.StringIO):
        def isatty(self):
            return True

    fake = TTY()
    monkeypatch.setattr(sys, "stderr", fake)
    return fake


def _no_study_reports(monkeypatch):
    """Skip the studies' figures where a test is about something else (each report is tested on its own)."""
    from negbatch.lab.studies.base import Study

    made = []
    for cls in _study_classes(Study):
        monkeypatch.setattr(cls, "report", lambda self, folder: made.append(folder) or folder / "report.md")
    return made


def _study_classes(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _study_classes(sub)


def test_progress_bars_when_stderr_is_a_terminal(tmp_path, monkeypatch):
    fake = _tty_stderr(monkeypatch)
    figures_not_drawn(monkeypatch)  # the run's figure: drawn in test_train_then_report
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 0
    assert "%|" in fake.getvalue() and "/4 [" in fake.getvalue()  # tqdm's bar: 64 images in batches of 16
    fake.seek(0)
    fake.truncate()
    _no_study_reports(monkeypatch)
    assert main(["study", "negatives", *TINY, "--ks", "all", "--seeds", "0", "--losses", "simclr",
                 "--out", str(tmp_path / "study")]) == 0
    assert "%|" in fake.getvalue() and "/4 [" in fake.getvalue() and "[1/1]" in fake.getvalue()


def test_resumed_run_says_so(tmp_path, capsys, monkeypatch):
    from negbatch.lab import TrainConfig, load_config_file, train

    figures_not_drawn(monkeypatch)  # the run's figure: drawn in test_train_then_report

    config = tmp_path / "c.toml"
    config.write_text('n_train = 64\nn_test = 48\nbatch_size = 8\nepochs = 1\nencoder_widths = [16]\n'
                      'head_widths = [16, 8]\nknn_k = 5\n')
    assert train(TrainConfig.from_dict(load_config_file(config)), tmp_path / "run", stop_after=3) is None
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert "resuming from step 3 of 8" in capsys.readouterr().err


def test_a_stopped_train_exits_130_with_the_resume_message(tmp_path, capsys, monkeypatch):
    """Ctrl-C or SIGTERM stops a run at a checkpoint and train() returns None (here stop_after does
    what the signal would): the command says how to resume, with no traceback."""
    import negbatch.lab as lab

    figures_not_drawn(monkeypatch)
    real = lab.train
    monkeypatch.setattr(lab, "train", lambda cfg, out: real(cfg, out, stop_after=2))
    argv = ["train", "--n-train", "64", "--n-test", "48", "--batch-size", "8", "--epochs", "1",
            "--encoder-widths", "16", "--head-widths", "16,8", "--knn-k", "5", "--out", str(tmp_path / "run")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "stopped at step 2 of 8" in err and "run the same command again to resume" in err
    assert "Traceback" not in err and (tmp_path / "run" / "checkpoint.pt").exists()


def test_study_negatives_resumes_says_so_and_reports(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    args = ["study", "negatives", *TINY, "--ks", "2,all,500", "--seeds", "0,1", "--losses", "simclr", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    first = capsys.readouterr().err
    assert "[4/4]" in first and "finished earlier" not in first
    rows = json.loads((out / "results.json").read_text())
    assert sorted((str(x["negatives"]), x["seed"]) for x in rows) == [("2", 0), ("2", 1), ("all", 0), ("all", 1)]
    assert (out / "results.csv").read_text().count("\n") == 5
    for name in ("report.md", "accuracy_vs_k.png", "snr_over_training.png", "geometry_vs_k.png"):
        assert (out / name).exists(), name
    spec = json.loads((out / "study.json").read_text())
    assert spec["study"] == "negatives" and spec["modality"] == "image" and spec["ks"] == {"simclr": [2, "all"]}
    assert "## What the data show" in (out / "report.md").read_text()

    # Reruns train only what is missing, and say which runs finished earlier.
    reports = _no_study_reports(monkeypatch)
    (next(out.glob("runs/*negatives=2*seed=0*")) / "summary.json").unlink()
    assert main(args) == 0
    again = capsys.readouterr().err
    assert "3 finished earlier (skipped)" in again and "[1/1] simclr K=2" in again and "[2/" not in again
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert main(args) == 0
    third = capsys.readouterr().err
    assert "4 finished earlier (skipped)" in third and "[1/" not in third
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == before  # nothing retrained
    assert reports == [out, out]
    monkeypatch.undo()
    figures_not_drawn(monkeypatch)  # drawn by the first run
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").exists()


@pytest.mark.slow
def test_study_negatives_with_workers_through_the_console(tmp_path):
    out = tmp_path / "study"
    args = ["study", "negatives", *TINY, "--ks", "2,all,500", "--seeds", "0,1", "--losses", "simclr,relic",
            "--out", str(out)]
    r = negbatch(*args, "--workers", "2")
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "results.json").read_text())
    assert sorted((x["loss"], str(x["negatives"]), x["seed"]) for x in rows) == sorted(
        (loss, k, s) for loss in ("simclr", "relic") for k in ("2", "all") for s in (0, 1))
    again = negbatch(*args, "--workers", "2")
    assert again.returncode == 0 and "8 finished earlier (skipped)" in again.stderr and "[1/" not in again.stderr
    assert main(["report", str(out)]) == 0


def test_study_routing_by_data_set(tmp_path, capsys):
    from negbatch.cli import _selected_study

    assert _selected_study(["study", "gradcache", "--data", "bible", "--seeds", "0"]) == ("gradcache", "text")
    assert _selected_study(["study", "batches", "--data=pairs:my.jsonl"]) == ("batches", "text")
    assert _selected_study(["study", "negatives", "--dataset", "builtin"]) == ("negatives", "text")
    assert _selected_study(["study", "batches", "--data", "digits"]) == ("batches", "image")
    assert _selected_study(["study", "gradcache"]) == ("gradcache", "image")
    (tmp_path / "t.toml").write_text('dataset = "bible"\n')
    assert _selected_study(["study", "negatives", "--config", str(tmp_path / "t.toml")]) == ("negatives", "text")
    assert _selected_study(["train", "--data", "bible"]) is None
    assert main(["study", "bias", "--data", "bible", "--out", str(tmp_path / "b")]) == 2
    assert "the bias study runs on image data only" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_clear_errors(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text('loss = "simclr"\nbatch_sise = 8\n')
    cases = [
        (["train", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "x")], "unknown key 'batch_sise'"),
        (["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "y")],
         "apt-get install dataset-fashion-mnist"),
        (["train", "--lr", "fast", "--out", str(tmp_path / "z")], "lr: expected a float"),
        (["report", str(tmp_path)], "neither a study folder"),
        (["report", str(tmp_path / "nonexistent")], f"{tmp_path / 'nonexistent'} does not exist"),
        (["study", "negatives", "--ks", "0,all", "--out", str(tmp_path / "s")], "negatives must be 'all' or a positive int"),
        (["study", "negatives", "--text-dim", "8", "--out", str(tmp_path / "s")], "unrecognized arguments: --text-dim"),
        # the text task always caches its chunks: accumulate was accepted and ignored
        (["train", "--data", "builtin", "--chunk-size", "4", "--chunk-method", "accumulate", "--out", str(tmp_path / "t")],
         "chunk_method: applies to image data sets only"),
        # Options of another loss, sampler, optimizer or of chunking ran as a plain run, recorded as used.
        (["train", "--alpha", "2", "--out", str(tmp_path / "u")], "alpha: applies to loss='relic' only"),
        # --data-dir without --dataset trained on the digits (and recorded the folder as if read)
        (["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "u")],
         "data_dir: dataset 'digits' reads no folder"),
        (["study", "negatives", "--data-dir", str(tmp_path), "--out", str(tmp_path / "s")],
         "data_dir: dataset 'digits' reads no folder"),
        (["train", "--gamma", "0.5", "--out", str(tmp_path / "u")], "gamma: applies to loss='global' only"),
        (["train", "--gamma-schedule", "linear", "--out", str(tmp_path / "u")], "gamma_schedule: applies to loss="),
        (["train", "--gcbs-q", "0.5", "--sampler", "hard", "--out", str(tmp_path / "u")],
         "gcbs_q: applies to sampler='gcbs' only (this run's is 'hard')"),
        (["train", "--refresh-every", "3", "--out", str(tmp_path / "u")], "refresh_every: re-plans gcbs or hard"),
        (["train", "--momentum", "0.1", "--out", str(tmp_path / "u")],
         "momentum: applies to optimizer sgd or lars only (this run's is 'adam')"),
        (["train", "--chunk-method", "accumulate", "--out", str(tmp_path / "u")], "chunk_method: applies with chunk_size"),
        (["train", "--config", str(tmp_path), "--out", str(tmp_path / "u")], "is a folder; give the path of a .toml"),
        (["train", "--out", "/proc/negbatch-nope"], "cannot write /proc/negbatch-nope: No such file or directory; "
                                                      "give a writable folder (--out)"),
        (["train", "--data", "builtin", "--out", str(tmp_path / "u")], "--test-fraction 0.25 holds out 6"),
        # Options that change what a study measures trained, and the report described the study's own setup.
        (["study", "negatives", "--data", "builtin", "--loss", "siglip", "--out", str(tmp_path / "s1")],
         "the negatives study does not take loss='siglip': the text study trains InfoNCE"),
        (["study", "negatives", "--data", "builtin", "--queue-size", "8", "--out", str(tmp_path / "s1")],
         "queue_size=8: a queue adds negatives beyond the K this study varies"),
        (["study", "negatives", "--learnable-temperature", "true", "--out", str(tmp_path / "s1")],
         "learnable_temperature=True: the study sweeps --temperatures"),
        (["study", "bias", "--negatives", "3", "--out", str(tmp_path / "s1")], "the bias study does not take negatives=3"),
        (["study", "bias", "--chunk-size", "4", "--chunk-method", "accumulate", "--out", str(tmp_path / "s1")],
         "chunk_method='accumulate': accumulation over chunks is another loss"),
        # Checked before the measurements (it came after them, naming --batch-size, which the study has not).
        (["study", "gradcache", "--batch-sizes", "16", "--n-train", "300", "--out", str(tmp_path / "s1")],
         "--accuracy-batch-sizes: [1024] outside [2, 300] (the training images)"),
        (["study", "gradcache", "--accuracy-batch-sizes", "none", "--out", str(tmp_path / "negatives-study")],
         "holds a negatives study (image data), not a gradcache study"),
        # A misspelt data set was taken for images: the text options read as unrecognized, the name never said.
        (["study", "negatives", "--data", "bibel", "--text-dim", "16", "--out", str(tmp_path / "s1")],
         "--data: expected one of digits"),
        (["study", "gradcache", "--config", str(tmp_path / "relic.toml"), "--out", str(tmp_path / "s1")],
         "the gradcache study on image data has no --config"),
        (["study", "bias", "--bias-batch-sizes", "0,1,8", "--out", str(tmp_path / "s1")],
         "--bias-batch-sizes must all be >= 2"),
        (["study", "negatives", "--kz", "1", "--out", str(tmp_path / "s1")], "--kz: did you mean --ks?"),
        # An empty --out put the run's files loose in the current folder.
        (["train", "--out", ""], "argument --out: must name a folder, got an empty string"),
        (["study", "negatives", "--out", " "], "argument --out: must name a folder"),
        (["demo", "--out", ""], "argument --out: must name a folder"),
        (["train", "--config", str(tmp_path / "relic.toml"), "--loss", "simclr", "--out", str(tmp_path / "u")],
         "alpha: applies to loss='relic' only"),
    ]
    (tmp_path / "relic.toml").write_text('loss = "relic"\nalpha = 2.0\n')
    (tmp_path / "negatives-study").mkdir()
    (tmp_path / "negatives-study" / "study.json").write_text('{"study": "negatives", "modality": "image"}')
    for argv, message in cases:
        assert not (tmp_path / "s1").exists()
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        assert code == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["study", "nosuch"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("data", [["--n-train", "300", "--batch-size", "32", "--ks", "4"], ["--data", "builtin", "--batch-size", "8"]])
def test_a_study_on_a_device_that_is_not_there_writes_nothing(tmp_path, capsys, data):
    """A study given a device the machine lacks wrote study.json and the first run's folder before
    the run found out (found by a newcomer's trial of the recipes on a CPU machine)."""
    out = tmp_path / "study"
    assert main(["study", "negatives", *data, "--seeds", "0", "--device", "cuda:99", "--out", str(out)]) == 2
    assert "device='cuda:99'" in capsys.readouterr().err
    assert not out.exists()


def test_study_json_and_the_results_table_always_describe_one_invocation(tmp_path, capsys, monkeypatch):
    from negbatch.lab.studies import base

    out = tmp_path / "study"
    one = ["study", "negatives", *TINY, "--ks", "2", "--seeds", "0", "--losses", "simclr", "--out", str(out)]
    assert main(one) == 0, capsys.readouterr().err
    spec = (out / "study.json").read_text()
    assert len(json.loads((out / "results.json").read_text())) == 1
    # A duplicate run and another study are refused before study.json is touched.
    assert main([*one, "--temperatures", "0.2,0.2"]) == 2
    assert "identical" in capsys.readouterr().err
    assert main(["study", "bias", *TINY, "--out", str(out)]) == 2
    assert "holds a negatives study" in capsys.readouterr().err
    assert (out / "study.json").read_text() == spec
    # A rerun with other options, stopped before its first run ends: study.json names its options,
    # and the table holds none of the earlier invocation's runs (the report said 0.5 above 0.2's rows).
    monkeypatch.setattr(base, "run_configs", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main([*one, "--temperatures", "0.5"]) == 130  # as Ctrl-C exits
    assert "1 finished run(s)" in capsys.readouterr().err
    assert json.loads((out / "study.json").read_text())["temperatures"] == [0.5]
    assert not (out / "results.json").exists()  # no finished run of this plan: no table
    assert main(["report", str(out)]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_command_line_steps_replace_a_config_files_epochs(tmp_path, capsys):
    from negbatch.lab.config import config_from_args, without_replaced_length

    assert without_replaced_length({"epochs": 200, "lr": 0.1}, {"steps": 5}) == {"lr": 0.1}
    assert without_replaced_length({"steps": 9}, {"epochs": 1}) == {}
    assert without_replaced_length({"epochs": 2}, {"lr": 0.1}) == {"epochs": 2}
    import argparse

    cfg = config_from_args(argparse.Namespace(steps=3), {"epochs": 200, "batch_size": 8})
    assert (cfg.steps, cfg.epochs, cfg.batch_size) == (3, None, 8)


def test_config_and_recipe_mistakes_are_named(tmp_path, capsys):
    from negbatch.lab import TrainConfig

    with pytest.raises(ValueError, match="batch_size: a contrastive batch needs at least 2"):
        TrainConfig(batch_size=1)
    (tmp_path / "typo.toml").write_text('[study]\nname = "negatives"\nkss = "1,all"\n')
    assert main(["study", "negatives", "--config", str(tmp_path / "typo.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "typo.toml: [study] key 'kss' is not an option of the negatives study (did you mean 'ks'?)" in \
        capsys.readouterr().err
    assert "--dcl-sigma" not in _help(capsys, "study", "batch-size")  # one method's option: every value was refused


@pytest.mark.parametrize("entry, words, error", [
    ("hflip = true", ["--hflip", "true"], None),  # an option that reads a word: it was a bare --hflip
    ("hflip = false", ["--hflip", "false"], None),  # it was left out, so the default won silently
    ("skip_bias = true", ["--skip-bias"], None),  # a switch
    ("skip_bias = false", [], None),
    ("skip_bias = 1", None, "[study] skip_bias = 1: expected true or false"),
    ("queue_size = true", None, "[study] queue_size = true: expected an integer"),  # was '--queue-size: expected one argument'
    ('moco_momentum = "x"', None, '[study] moco_momentum = "x": expected a number'),
    ('lr_scaling = "cube"', None, "[study] lr_scaling = \"cube\": expected one of 'sqrt', 'linear', 'none'"),
])
def test_a_recipes_values_become_the_studys_words_or_an_error_naming_the_file(tmp_path, entry, words, error):
    from negbatch.cli import with_recipe

    study = "bias" if "skip_bias" in entry else "batch-size"
    path = tmp_path / "r.toml"
    path.write_text(f"[study]\n{entry}\n")
    argv = ["study", study, "--config", str(path)]
    if error is None:
        assert with_recipe(argv) == argv[:2] + words + argv[2:]
    else:
        with pytest.raises(ValueError) as err:
            with_recipe(argv)
        assert str(err.value) == f"{path}: {error}"


def test_a_text_study_sets_the_length_over_a_config_files_epochs(tmp_path):
    import argparse

    from negbatch.lab.studies import get_study

    (tmp_path / "run.toml").write_text('dataset = "builtin"\nepochs = 2\ntest_fraction = 0.25\nbatch_size = 8\n')
    study = get_study("batches", "text")
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    try:
        _, configs = study.plan(parser.parse_args(["--config", str(tmp_path / "run.toml"), "--seeds", "0",
                                                   "--out", str(tmp_path / "s")]))
    finally:
        study.release_folder()
    assert configs and all(c.epochs is None and c.steps for c in configs)


def test_a_train_run_and_a_study_never_share_a_folder(tmp_path, capsys, monkeypatch):
    figures_not_drawn(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    report = (run / "report.md").read_text()
    capsys.readouterr()
    study = ["study", "batch-size", "--data", "digits", "--n-train", "64", "--n-test", "48", "--methods", "infonce",
             "--batch-sizes", "8,16", "--seeds", "0", "--epochs", "1", "--encoder-widths", "8", "--head-widths", "8,4",
             "--knn-k", "3", "--workers", "1"]  # in this process: the folders are the subject, not the workers
    assert main([*study, "--out", str(run)]) == 2
    assert "holds a run of `negbatch train` (its config.json), not a study" in capsys.readouterr().err
    assert (run / "report.md").read_text() == report and not (run / "study.json").exists()
    folder = tmp_path / "study"
    assert main([*study, "--out", str(folder)]) == 0
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(folder)]) == 2
    assert "holds a study (its study.json)" in capsys.readouterr().err
    assert not (folder / "config.json").exists()


def test_an_out_folder_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["train", *TINY, "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # Below a file: the OS refuses the folder (as it does a read-only one).
    assert main(["study", "negatives", *TINY, "--ks", "2", "--seeds", "0", "--out", str(a_file / "sub")]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write {a_file / 'sub'}: Not a directory; give a writable folder" in err
    assert "Traceback" not in err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_outside_the_training_loops_stops_the_command_cleanly(tmp_path):
    """In the gradcache study's measurements SIGTERM killed the study at once
    (exit -15, no word); now it stops as Ctrl-C does, keeping what finished."""
    import signal
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "negbatch.cli", "study", "gradcache", "--batch-sizes", "16,32", "--repeats", "20",
           "--steps", "1", "--accuracy-batch-sizes", "none", "--out", str(tmp_path / "gc")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if line.startswith("[1/"):  # a measurement has finished: the study is in its measuring phase
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM  # 143, as a shell reports a process SIGTERM ended
    assert "stopped; everything finished is kept: run the same command again to resume" in rest
    assert list((tmp_path / "gc" / "measurements").glob("*.json"))


def test_under_torchrun_an_error_names_the_rank_that_prints_it(tmp_path, capsys, monkeypatch):
    """Every process of a torchrun job checks the same options and prints the same error: the ones
    other than rank 0 name their rank, so N identical lines read as one error seen N times."""
    argv = ["train", *TINY, "--temperature", "-1", "--out", str(tmp_path / "run")]
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("negbatch train (rank 1): error: ")
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("negbatch train: error: ")
