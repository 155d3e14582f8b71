import json
import os
import subprocess
import sys
import time

import pytest

from negbatch.lab import TrainConfig
from negbatch.lab.config import IMAGE_ONLY, TEXT_ONLY
from negbatch.lab.studies import STUDIES, get_study, study_names
from negbatch.lab.studies.base import Study
from negbatch.lab.studies.negatives import build_configs
from negbatch.lab.sweep import read_results, run_configs, run_key

TINY = TrainConfig(n_train=48, n_test=32, batch_size=16, epochs=1, encoder_widths=(8,), head_widths=(8, 4), knn_k=3)


def test_a_rerun_at_another_log_frequency_or_device_finds_the_finished_runs(tmp_path, monkeypatch):
    """log_every and device were hashed into a run's folder name: a study rerun with another log frequency
    (or on another device) trained every run again."""
    import negbatch.lab.tasks.image as image

    first = run_configs([TINY], tmp_path)
    assert run_key(TINY) == run_key(TINY.replace(log_every=7, device="auto"))
    monkeypatch.setattr(image, "build_model", lambda *a: (_ for _ in ()).throw(AssertionError("retrained")))
    again = run_configs([TINY.replace(log_every=7, device="auto")], tmp_path)
    assert again[0]["linear_acc"] == first[0]["linear_acc"] and len(list((tmp_path / "runs").iterdir())) == 1


def test_a_study_folder_named_before_the_change_is_resumed_not_retrained(tmp_path, capsys, monkeypatch):
    """A study's run folders named by the former key (its hash took log_every and device) are renamed
    to their key on the next run: the finished ones are skipped, the table keeps their rows."""
    from negbatch.cli import main
    from negbatch.lab.sweep import former_run_key

    argv = ["study", "negatives", "--n-train", "48", "--n-test", "32", "--batch-size", "16", "--epochs", "1",
            "--encoder-widths", "8", "--head-widths", "8,4", "--knn-k", "3", "--ks", "2,all", "--seeds", "0",
            "--losses", "simclr", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    for row in rows:  # as the earlier version named them
        cfg = TrainConfig.from_dict(json.loads((tmp_path / "runs" / row["run"] / "config.json").read_text()))
        (tmp_path / "runs" / row["run"]).rename(tmp_path / "runs" / former_run_key(cfg))
        row["run"] = former_run_key(cfg)
    (tmp_path / "results.json").write_text(json.dumps(rows))
    capsys.readouterr()
    import negbatch.lab.tasks.image as image

    monkeypatch.setattr(image, "build_model", lambda *a: (_ for _ in ()).throw(AssertionError("retrained")))
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "2 finished earlier (skipped)" in err and "note:" not in err, err
    again = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["run"] for r in again) == sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert all(r["run"] == run_key(TrainConfig.from_dict(json.loads((tmp_path / "runs" / r["run"] / "config.json")
                                                                      .read_text()))) for r in again)


def test_registry_contract():
    import argparse

    assert study_names() == ["negatives", "batches", "gradcache", "bias", "batch-size"]
    for (name, modality) in STUDIES:
        study = get_study(name, modality)
        assert isinstance(study, Study) and (study.name, study.modality) == (name, modality)
        cls = type(study)
        assert cls.report is not Study.report and cls.line is not Study.line, (name, modality)
        assert cls.plan is not Study.plan or cls.run is not Study.run, (name, modality)
        assert study.summary and study.description
        parser = argparse.ArgumentParser()
        study.add_arguments(parser)  # no clash between the study's options and the training options
        options = {s for a in parser._actions for s in a.option_strings}
        assert {"--out", "--seeds", "--workers"} <= options, (name, modality)
        foreign = TEXT_ONLY if modality == "image" else IMAGE_ONLY
        assert not any(f"--{f.replace('_', '-')}" in options for f in foreign), (name, modality)
    with pytest.raises(ValueError, match="the bias study runs on image data only"):
        get_study("bias", "text")
    with pytest.raises(ValueError, match="unknown study 'nosuch'"):
        get_study("nosuch", "image")


def test_k_capped_by_the_batch_per_loss(capsys):
    configs, ks = build_configs(TINY, ["simclr", "relic"], [1, 15, 30, 100, "all"], [0, 1], [0.2], [1e-3])
    assert ks == {"simclr": [1, 15, "all"], "relic": [1, "all"]}  # candidates: 2B-2 = 30, B-1 = 15
    # The merge is said, not silent: a K the user asked for is run as all.
    assert capsys.readouterr().err.splitlines() == [
        "--ks 30,100: at or above the 30 candidates of simclr at batch size 16, so run as all",
        "--ks 15,30,100: at or above the 15 candidates of relic at batch size 16, so run as all",
    ]
    build_configs(TINY, ["simclr"], [1, "all"], [0], [0.2], [1e-3])
    assert capsys.readouterr().err == ""
    assert len(configs) == (3 + 2) * 2
    with pytest.raises(ValueError, match="unknown loss 'moco'"):
        build_configs(TINY, ["moco"], [1], [0], [0.2], [1e-3])


def test_run_configs_skips_finished_runs_and_writes_one_row_each(tmp_path, monkeypatch):
    configs = [TINY.replace(seed=s) for s in (0, 1)]
    first = run_configs(configs, tmp_path)
    rows = read_results(tmp_path)
    assert len(rows) == 2 and {r["seed"] for r in rows} == {0, 1}
    assert {"linear_acc", "knn_acc", "batch_size", "negatives", "run"} <= set(rows[0])
    assert all(r["steps"] == 3 and r["epochs"] == 1 for r in rows)  # the steps taken: 48 images in batches of 16
    assert (tmp_path / "results.csv").read_text().count("\n") == 3
    # A rerun trains nothing: make training impossible and get the same summaries back.
    import negbatch.lab.tasks.image as image

    monkeypatch.setattr(image, "build_model", lambda *a: (_ for _ in ()).throw(AssertionError("retrained")))
    again = run_configs(configs, tmp_path)
    assert sorted(json.dumps(s, sort_keys=True) for s in again) == sorted(json.dumps(s, sort_keys=True) for s in first)
    assert run_key(TINY) != run_key(TINY.replace(seed=1))
    assert run_key(TINY) == run_key(TINY.replace(progress=True))  # runtime-only options do not change the run
    with pytest.raises(ValueError, match="identical"):
        run_configs([TINY, TINY], tmp_path)
    with pytest.raises(ValueError, match="workers"):
        run_configs(configs, tmp_path, workers=0)


def test_parse_list_names_the_option():
    import pytest

    from negbatch.lab.sweep import parse_list

    assert parse_list("1, 2,all", str, "ks") == ["1", "2", "all"]
    assert parse_list("0,1", int, "seeds") == [0, 1]
    with pytest.raises(ValueError, match="--seeds"):
        parse_list("0,x", int, "seeds")
    with pytest.raises(ValueError, match="--ks must list at least one value"):
        parse_list(",", str, "ks")
    for typo in ("0,,1", "0,1,", ",0"):  # a value lost in typing was dropped silently
        with pytest.raises(ValueError, match=r"--seeds: an empty value in '.*' \(two commas in a row, or one at an end\)"):
            parse_list(typo, int, "seeds")
    with pytest.raises(ValueError, match="--samplers lists a value twice"):
        parse_list("gcbs,gcbs", str, "samplers", unique=True)


def test_negatives_study_names_a_loss_given_twice(tmp_path, capsys):
    """--losses simclr,simclr was refused as "two configurations of the study are identical (a value
    given twice?)", which named no option (--seeds and --samplers name theirs)."""
    from negbatch.cli import main

    assert main(["study", "negatives", "--losses", "simclr,simclr", "--ks", "1", "--seeds", "0",
                 "--out", str(tmp_path / "s")]) == 2
    assert "--losses lists a value twice: simclr,simclr" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
def test_workers_end_when_the_study_process_is_killed(tmp_path):
    # A study killed with SIGKILL (kill, timeout, a scheduler) must not leave its
    # workers training on: a rerun would train the same run folders beside them.
    (tmp_path / "sleeper.py").write_text(
        "import os, time\n"
        "def train_one(cfg, run_dir, threads):\n"
        "    open(os.path.join(cfg['dir'], f'{os.getpid()}.pid'), 'w').close()\n"
        "    time.sleep(120)\n"
        "    return {}\n"
    )
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import sleeper\n"
        "from negbatch.lab.sweep import run_jobs\n"
        "jobs = [({'dir': sys.argv[1]}, sys.argv[1] + f'/runs/{i}') for i in range(2)]\n"
        "run_jobs(jobs, sys.argv[1], sleeper.train_one, workers=2)\n"
    )
    study = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    try:
        deadline = time.time() + 60
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.time() < deadline:
            time.sleep(0.2)
        pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
        assert len(pids) == 2, "the workers did not start"
    finally:
        study.kill()
        study.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper is gone too
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 20
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    for p in left:
        os.kill(p, 9)
    assert not left, f"workers {left} outlived the study"


WAITER = (
    "import os, time\n"
    "from negbatch.lab.folder import study_stopping\n"
    "def train_one(cfg, run_dir, threads):\n"
    "    open(os.path.join(cfg['dir'], f'{os.getpid()}-{cfg[\"i\"]}.pid'), 'w').close()\n"
    "    while cfg['i'] and not study_stopping():  # run 0 ends at once: its worker then idles\n"
    "        time.sleep(0.05)\n"
    "    return {'run': run_dir, 'config': {}}\n"
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="spawned workers, a process group's signal")
@pytest.mark.parametrize("moment", ["while the workers start", "while a worker idles"])
def test_ctrl_c_stops_a_parallel_study_without_a_worker_traceback(tmp_path, moment):
    """Ctrl-C reaches every process of the terminal's group. A worker that took it while it imported
    torch (the first seconds of a study) or while it waited for a run died with a traceback (each),
    and the pool broke with one more ("Exception in thread ..."); the study's process alone decides."""
    import signal

    (tmp_path / "waiter.py").write_text(WAITER)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import waiter\n"
        "from negbatch.lab.sweep import run_jobs\n"
        "jobs = [({'dir': sys.argv[1], 'i': i}, sys.argv[1] + f'/runs/{i}') for i in range(2)]\n"
        "try:\n"
        "    run_jobs(jobs, sys.argv[1], waiter.train_one, workers=2)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit('stopped')\n"
    )
    study = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # its own group, as a terminal's: the signal reaches all
    try:
        def workers():
            found = subprocess.run(["pgrep", "-P", str(study.pid), "-f", "spawn_main"], capture_output=True, text=True)
            return found.stdout.split()

        deadline = time.time() + 60
        ready = (lambda: len(workers()) == 2) if moment == "while the workers start" else (
            lambda: len(list(tmp_path.glob("*.pid"))) == 2)  # run 0 ended, run 1 runs: a worker idles
        while not ready() and time.time() < deadline:
            time.sleep(0.01)
        assert ready(), "the workers did not start"
        if moment == "while a worker idles":
            time.sleep(0.3)  # the worker of run 0 is back waiting for work
        os.killpg(study.pid, signal.SIGINT)
        _, err = study.communicate(timeout=60)
    finally:
        study.kill()
    assert study.returncode == 1 and err.strip().endswith("stopped"), err
    assert "Traceback" not in err and "Exception" not in err, err


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper is gone too
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="spawned workers, a process group's signal")
@pytest.mark.slow  # 19-26 s (the workers' start-up is made long on purpose); the study's other Ctrl-C tests are quick
def test_ctrl_c_while_the_workers_start_ends_the_study_at_once_and_cleanly(tmp_path, capsys):
    """Ctrl-C before any run started (the workers still importing torch): the study waited, silent, for every
    worker to start only to tell it to stop (seconds; a minute on a busy machine), and a second Ctrl-C then
    left it with a traceback per worker ('SemLock._rebuild ... FileNotFoundError', 'InvalidStateError:
    CANCELLED') and workers outliving it. Now the starting workers are ended at once: the study says it
    stopped, leaves no process and a free lock, and the same command runs it."""
    import fcntl
    import signal

    from negbatch.cli import main

    slow = tmp_path / "slow_start"  # the workers' start-up made long, so that the signal lands inside it
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import sys, time\nif '--multiprocessing-fork' in sys.argv:\n"
                                           "    time.sleep(90)\n")
    out = tmp_path / "study"
    argv = ["study", "negatives", "--n-train", "48", "--n-test", "32", "--batch-size", "16", "--epochs", "1",
            "--encoder-widths", "8", "--head-widths", "8,4", "--knn-k", "3", "--ks", "2,all", "--seeds", "0",
            "--losses", "simclr", "--workers", "2", "--out", str(out)]
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(slow), src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    study = subprocess.Popen([sys.executable, "-m", "negbatch.cli", *argv], stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)  # its own group, as a terminal's: Ctrl-C reaches every process
    started: list[int] = []
    try:
        def workers():
            found = subprocess.run(["pgrep", "-P", str(study.pid), "-f", "spawn_main"], capture_output=True, text=True)
            return [int(p) for p in found.stdout.split()]

        deadline = time.time() + 120
        while len(started) < 2 and time.time() < deadline:
            time.sleep(0.05)
            started = workers()
        assert len(started) == 2, "the workers did not start"
        os.killpg(study.pid, signal.SIGINT)
        _, err = study.communicate(timeout=45)  # not the workers' 90 s start-up
    finally:
        study.kill()
        left = [p for p in started if _alive(p)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert study.returncode == 130, err
    assert "negbatch study: stopped" in err and "run the same command again to resume" in err, err
    assert "Traceback" not in err and "Exception" not in err, err
    assert not left, f"workers {left} outlived the study"
    with open(out / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds it
        fcntl.flock(lock, fcntl.LOCK_UN)
    capsys.readouterr()
    assert main(argv) == 0  # the same command, in this process: the study runs from where it stopped
    assert len(json.loads((out / "results.json").read_text())) == 2


def test_a_second_study_on_a_folder_in_use_is_refused_before_it_writes(tmp_path, capsys):
    """Another process holds the study folder (a study running there): a second study is refused and
    leaves the running one's study.json as it was (it rewrote it, and the first one's report then
    followed the refused options)."""
    from negbatch.cli import main

    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text('{"seeds": [0, 1, 2]}')
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('process 1 (the running study)'); "
        "f.flush(); print('held', flush=True); time.sleep(60)\n"), str(out / ".lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        code = main(["study", "batch-size", "--data", "digits", "--methods", "infonce", "--batch-sizes", "32,64",
                     "--seeds", "7", "--epochs", "1", "--encoder-widths", "16", "--head-widths", "16,8",
                     "--workers", "1", "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and "is in use by" in capsys.readouterr().err
    assert json.loads((out / "study.json").read_text()) == {"seeds": [0, 1, 2]}
    assert not (out / "runs").exists()


def test_report_headers_name_steps_when_a_study_was_given_steps():
    from negbatch.lab.report import training_length

    assert training_length({"epochs": 1, "steps": None}) == "1 epoch"
    assert training_length({"epochs": 2}) == "2 epochs"
    assert training_length({"epochs": None, "steps": 30}) == "30 steps"


def test_runs_in_this_process_take_one_thread_as_in_a_worker(tmp_path, monkeypatch):
    # A run's float results depend on torch's thread count: with one worker
    # the run must see one thread too, and the caller's count comes back.
    import torch

    import negbatch.lab.sweep as sweep

    seen = []

    def fake_train(cfg, run_dir):
        seen.append(torch.get_num_threads())
        return {"config": cfg.to_dict(), "linear_acc": 0.5}

    monkeypatch.setattr(sweep, "train", fake_train)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_configs([TINY, TINY.replace(seed=1)], tmp_path, workers=1)
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_one_worker_and_two_give_the_same_results(tmp_path):
    configs = [TINY.replace(seed=s) for s in (0, 1)]
    one = run_configs(configs, tmp_path / "one", workers=1)
    two = run_configs(configs, tmp_path / "two", workers=2)
    key = lambda r: r["config"]["seed"]  # noqa: E731
    assert len(one) == len(two) == 2
    for a, b in zip(sorted(one, key=key), sorted(two, key=key)):
        assert (a["final_loss"], a["linear_acc"]) == (b["final_loss"], b["linear_acc"])


def test_negatives_findings_word_a_flat_trend_and_a_single_seed():
    """A Spearman rho of exactly 0 read "falls with K"; one seed per K read
    "within seed noise" on text, where no test was possible."""
    from negbatch.lab.studies.negatives import _finding as image_finding
    from negbatch.lab.studies.text_negatives import _finding as text_finding

    def run(acc, distance):
        return {"linear_acc": acc, "knn_acc": acc, "silhouette": 0.1, "intra_class_distance": distance, "snr_mean": 1.0}

    # Distances 1, 2, 2, 1 against K = 1, 2, 4, 8 (two seeds each at K = 1, 8): rank correlation 0.
    best = {("simclr", 1): [run(0.5, 1.0), run(0.5, 2.0)], ("simclr", 2): [run(0.6, 2.0)],
            ("simclr", 4): [run(0.6, 2.0)], ("simclr", 8): [run(0.7, 1.0), run(0.7, 2.0)]}
    text = image_finding("simclr", [1, 2, 4, 8], best, 16)
    assert "intra-class distance does not change with K (Spearman rho = +0.00" in text
    scores = {1: [{"ndcg@10": 0.30}], "all": [{"ndcg@10": 0.32}]}
    text = text_finding([1, "all"], scores, str)
    assert "All negatives scored highest, +0.020 over K = 1, within seed noise (too few seeds for a test)." in text


def test_reports_show_no_spread_for_one_seed():
    """With one seed the findings of the negatives, batches and bias reports read "0.957 ± 0.000 (n=1)":
    a spread of zero where there is none to measure (their tables said "(1 value)")."""
    from negbatch.lab.studies.batches import _compare, _tests
    from negbatch.lab.studies.bias import _bias_findings, _bias_summary
    from negbatch.lab.studies.negatives import _finding

    def run(acc):
        return {"linear_acc": acc, "knn_acc": acc, "silhouette": 0.1, "intra_class_distance": 1.0, "snr_mean": 1.0}

    text = _finding("simclr", [1, "all"], {("simclr", 1): [run(0.7)], ("simclr", "all"): [run(0.6)]}, 16)
    assert "linear accuracy 0.700 (1 value); worst K" in text and "Against all negatives (0.600 (1 value))" in text
    assert "±" not in text

    def batch_run(gap, acc):
        return {"final_gap": gap, "final_global_loss": 4.0, "final_same_class_pairs": 0.1, "linear_acc": acc,
                "knn_acc": acc, "train_seconds": 2.0, "gap_seconds": 0.0, "sampler_seconds": 0.1, "epochs_trained": 2}

    rows = {"random": [batch_run(2.0, 0.8)], "gcbs": [batch_run(1.0, 0.9)]}
    text = _compare("gcbs", rows, _tests(rows, ["gcbs"]))
    assert "final gap 1.000 (1 value) vs 2.000 (1 value) (better, untested, too few seeds for a test)" in text
    assert "±" not in text and "within seed noise" not in text

    bias = [{"phase": "init", "estimator": "plain", "batch_size": b, "relative_bias_debiased": 0.5, "relative_bias": 0.6,
             "noise_floor": 0.1, "relative_variance": 1.0} for b in (8, 16)]
    (text,) = _bias_findings(_bias_summary(bias), ["init"], 8)
    assert "is 0.500 at batch 8" in text and "±" not in text


def test_negatives_study_sweeps_the_config_files_temperature_unless_told_otherwise(tmp_path, monkeypatch):
    """The file's temperature was ignored for the study's default (0.2), while its lr was honoured."""
    import argparse

    from negbatch.lab.studies.negatives import swept_temperatures

    (tmp_path / "c.toml").write_text("temperature = 0.5\n")
    args = argparse.Namespace(temperatures=None, config=str(tmp_path / "c.toml"), default_temperature="0.2")
    assert swept_temperatures(args) == [0.5]
    assert swept_temperatures(argparse.Namespace(**{**vars(args), "temperatures": "0.1,0.3"})) == [0.1, 0.3]
    assert swept_temperatures(argparse.Namespace(**{**vars(args), "config": None})) == [0.2]


def test_report_of_a_folder_whose_tables_are_deleted_or_damaged_says_how_to_rebuild_them(tmp_path, capsys):
    """A deleted results.json was reported as "no finished run yet" beside the finished runs, and a
    truncated results.json or study.json as a bare JSON error naming neither file."""
    from negbatch.cli import main

    run_configs([TINY.replace(seed=s) for s in (0, 1)], tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"study": "negatives", "modality": "image"}))
    text = (tmp_path / "results.json").read_text()
    (tmp_path / "results.json").unlink()
    with pytest.raises(ValueError) as err:
        read_results(tmp_path)
    assert "2 run(s) under" in str(err.value) and "run the study's command again" in str(err.value)
    (tmp_path / "results.json").write_text(text[: len(text) // 2])  # cut short: a full disk, a killed copy
    with pytest.raises(ValueError) as err:
        read_results(tmp_path)
    assert "results.json is damaged" in str(err.value) and "run the study's command again" in str(err.value)
    (tmp_path / "study.json").write_text('{"study": "neg')
    assert main(["report", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert "study.json is damaged" in message and "run the study's command again" in message


def test_the_raw_pixel_baseline_takes_one_thread(monkeypatch):
    # Computed in the study's own process (not a run): one thread, as the runs' probes, the caller's count restored.
    import torch

    import negbatch.evaluation as evaluation
    from negbatch.lab.studies.base import ImageStudy

    seen = []
    monkeypatch.setattr(evaluation, "linear_probe", lambda *a, **k: seen.append(torch.get_num_threads()) or 0.5)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert ImageStudy.raw_pixel_baseline(TINY) == 0.5
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("argv, message", [
    (["negatives", "--batch-size", "2000"], "--batch-size 2000 exceeds the 1258 training images of 'digits'"),
    (["bias", "--batch-size", "2000"], "--batch-size 2000 exceeds the 1258 training images of 'digits'"),
    (["bias", "--batch-size", "300", "--n-train", "200"], "--batch-size 300 exceeds the 200 training images"),
])
def test_a_batch_larger_than_the_data_is_refused_before_the_folder_is_made(tmp_path, capsys, argv, message):
    # It was refused only after study.json and runs/ were written, naming batch_size, not the option.
    from negbatch.cli import main

    assert main(["study", *argv, "--seeds", "0", "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_partial_study_folders_report_says_how_many_runs_it_lacks(tmp_path, capsys):
    # Only the batch-size report said so; the others showed a table of the finished runs alone.
    from negbatch.cli import main
    from negbatch.lab.studies import report_folder

    out = tmp_path / "s"
    assert main(["study", "negatives", "--ks", "2,all", "--losses", "simclr", "--seeds", "0", "--steps", "2",
                 "--workers", "1", "--out", str(out)]) == 0
    assert "runs missing" not in (out / "report.md").read_text()
    rows = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(rows[:1]))  # as if stopped after its first run
    capsys.readouterr()
    report = report_folder(out).read_text()
    assert report.splitlines()[2].startswith("**1 of 2 runs missing** (an interrupted study: rerun the same command")
    assert "1 of 2 runs missing" in capsys.readouterr().err
    assert report_folder(out).read_text().count("runs missing") == 1  # rewritten, not marked twice
