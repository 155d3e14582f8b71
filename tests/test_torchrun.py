"""``negbatch`` under a real ``torchrun --nproc-per-node 2`` (gloo, CPU): one run,
not two into the same folder, equal to a one-process run; a study likewise."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _runs import without_times
from negbatch.cli import main
from negbatch.lab import read_metrics

pytestmark = pytest.mark.distributed

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--n-train", "64", "--n-test", "48", "--batch-size", "16", "--epochs", "2", "--encoder-widths", "16",
        "--head-widths", "16,8", "--knn-k", "5", "--norm", "none"]


def run(*args, torchrun: bool):
    """The console entry point in fresh processes (test_cli.py runs the commands in-process)."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"] if torchrun else []
    out = subprocess.run([sys.executable, *launcher, "-m", "negbatch.cli", *args], capture_output=True, text=True,
                         env=env, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_train_under_torchrun_is_one_run_equal_to_one_process(tmp_path):
    two = run("train", *TINY, "--out", str(tmp_path / "two"), torchrun=True)
    assert two.stdout.count("linear accuracy") == 1  # rank 0 alone reports
    assert main(["train", *TINY, "--out", str(tmp_path / "one")]) == 0  # one process, in this one
    rows_two, rows_one = without_times(read_metrics(tmp_path / "two")), without_times(read_metrics(tmp_path / "one"))
    assert [r["step"] for r in rows_two] == list(range(1, 9))  # each row once
    assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], rel=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and (tmp_path / "two" / "report.md").exists()


@pytest.mark.slow
def test_study_under_torchrun_trains_each_run_once(tmp_path):
    args = ["study", "negatives", *TINY, "--ks", "2,all", "--seeds", "0", "--losses", "simclr"]
    run(*args, "--out", str(tmp_path / "two"), torchrun=True)
    run(*args, "--out", str(tmp_path / "one"), torchrun=False)
    two = {r["negatives"]: r["final_loss"] for r in json.loads((tmp_path / "two" / "results.json").read_text())}
    one = {r["negatives"]: r["final_loss"] for r in json.loads((tmp_path / "one" / "results.json").read_text())}
    assert two.keys() == one.keys() and all(two[k] == pytest.approx(one[k], rel=1e-5) for k in one)


@pytest.mark.slow  # 15-20 s: two torchrun launches; the bias measurement's code runs in-process in test_study_bias.py
def test_the_bias_study_under_torchrun_measures_its_bias_on_rank_0_alone(tmp_path):
    """Rank 0 measures the gradient bias after the runs, alone: its GlobalInfoNCE synchronised its state
    with the other process, which had finished, and the study failed after all its training ("Connection
    closed by peer"; a hang while the other process still lived)."""
    args = ["study", "bias", *TINY, "--epochs", "1", "--seeds", "0", "--bias-batch-sizes", "4,8", "--num-batches", "3",
            "--bias-samples", "32"]
    run(*args, "--out", str(tmp_path / "two"), torchrun=True)
    rows = (tmp_path / "two" / "bias_results.csv").read_text().splitlines()
    assert len(rows) > 1 and (tmp_path / "two" / "report.md").exists()


def test_torchrun_variables_without_a_rendezvous_are_refused_with_what_to_do(tmp_path):
    """WORLD_SIZE and RANK set (a leftover of a job script, a scheduler's) without MASTER_ADDR: torch's
    own error named the variable only ("environment variable MASTER_ADDR expected, but not set")."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", WORLD_SIZE="2",
               RANK="0")
    for command in (["train"], ["study", "negatives", "--ks", "2", "--seeds", "0", "--losses", "simclr"]):
        out = subprocess.run([sys.executable, "-m", "negbatch.cli", *command, *TINY, "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, env=env, timeout=400)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "MASTER_ADDR and MASTER_PORT are not" in out.stderr and "unset WORLD_SIZE and RANK" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and not (tmp_path / "x").exists()


def test_a_refused_folder_under_torchrun_gets_one_answer(tmp_path):
    """Rank 0 refuses a folder in use; the launcher then stops rank 1, which said "stopped; everything
    finished is kept: run the same command again to resume" beside rank 0's error, though nothing ran."""
    from negbatch.lab.folder import hold_lock

    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    busy = tmp_path / "busy"
    with hold_lock(busy):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                              "-m", "negbatch.cli", "train", *TINY, "--out", str(busy)],
                             capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode != 0 and "is in use by process" in out.stderr, out.stderr[-2000:]
    assert "run the same command again to resume" not in out.stderr, out.stderr[-2000:]


def test_a_run_under_torchrun_leaves_no_ddp_model_to_outlive_its_process_group(tmp_path):
    """A run's DistributedDataParallel sat in reference cycles after the run and was collected at the
    interpreter's exit, after the group was destroyed: now and then that aborted the process (SIGABRT,
    "terminate called without an active exception"), and the launcher stopped the other rank. With the
    automatic collector off (so the test does not depend on when it runs), none may be left."""
    script = tmp_path / "one_run.py"
    script.write_text(
        "import gc, sys\n"
        "from torch.nn.parallel import DistributedDataParallel\n"
        "from negbatch.lab import TrainConfig, train\n"
        "gc.disable()\n"
        f"cfg = TrainConfig(n_train=64, n_test=48, batch_size=16, epochs=1, encoder_widths=(16,), head_widths=(16, 8),"
        f" knn_k=5, norm='none')\n"
        f"train(cfg, {str(tmp_path / 'run')!r})\n"
        "left = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())\n"
        "print('DDP left', left)\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          str(script)], capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("DDP left 0") == 2, out.stdout


# The recipe's key takes the same path as the unknown option, a second launch (6-8 s): slow.
@pytest.mark.parametrize("case", ["unknown option", pytest.param("recipe key", marks=pytest.mark.slow)])
def test_an_option_refused_while_parsing_under_torchrun_names_the_rank_that_prints_it(tmp_path, case):
    """Every process refuses a bad option alike, and the processes other than rank 0 name their rank; not
    the errors of the command line's parsing (an unknown option, a [study] key of a recipe): both processes
    said 'negbatch train: error: ...', one error read as two."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[study]\nkz = "2"\n')
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cases = {"unknown option": (["train", *TINY, "--lossx", "simclr"], "negbatch train"),
             "recipe key": (["study", "negatives", "--config", str(bad)], "negbatch study")}
    for command, said in [cases[case]]:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                              "-m", "negbatch.cli", *command, "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, env=env, timeout=400)
        assert out.returncode != 0, out.stderr[-2000:]
        # torchrun stops the other process once one has failed: the slower one (as the machine's load
        # has it) may be stopped (SIGTERM, in torchrun's summary) before it prints. Each that ran to its
        # error says it once, rank 1 by name.
        for rank, line in ((0, f"{said}: error: "), (1, f"{said} (rank 1): error: ")):
            stopped = re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\s*exitcode\s*: -15", out.stderr)
            assert out.stderr.count(line) in ((0, 1) if stopped else (1,)), out.stderr[-2000:]
        assert not (tmp_path / "x").exists()


def test_a_study_refuses_workers_under_torchrun_before_it_writes_anything(tmp_path):
    """--workers 2 under torchrun is refused (the processes train each run together); the refusal came
    after study.json was written, and left a folder of a study that never ran."""
    args = ["study", "negatives", *TINY, "--ks", "2", "--seeds", "0", "--losses", "simclr", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          "-m", "negbatch.cli", *args, "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode != 0 and "workers=2 under 2 torchrun processes" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "x").exists(), sorted(p.name for p in (tmp_path / "x").iterdir())


@pytest.mark.slow  # 15-20 s; the refusal of workers under torchrun stays in the quick suite (the test above)
def test_the_batch_size_study_under_torchrun_trains_one_run_at_a_time_by_default(tmp_path):
    """The batch-size study's --workers defaults to the machine's cores; under torchrun, where the processes
    train each run together, that default was refused ('workers=2 under 2 torchrun processes ... use
    workers=1') on any machine of two cores or more: the study ran under torchrun only with --workers 1."""
    args = ["study", "batch-size", "--dataset", "digits", "--n-train", "64", "--n-test", "48", "--epochs", "1",
            "--encoder-widths", "16", "--head-widths", "16,8", "--knn-k", "5", "--norm", "none", "--methods",
            "infonce", "--batch-sizes", "8,16", "--seeds", "0"]
    run(*args, "--out", str(tmp_path / "two"), torchrun=True)
    assert (tmp_path / "two" / "report.md").exists()


@pytest.mark.slow  # 13-20 s; Ctrl-C of a study with workers stays in the quick suite (test_study_batch_size.py)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a process group's signal")
def test_ctrl_c_under_torchrun_says_each_line_once(tmp_path):
    """Every process runs the same study: its note, the chunked BatchNorm warning, the "stopping after this
    step" line and the stop line came once per rank (the stop line of rank 1 as "(rank 1): stopped")."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "study"
    args = ["study", "negatives", "--n-train", "512", "--n-test", "48", "--batch-size", "16", "--epochs", "20",
            "--encoder-widths", "16", "--head-widths", "16,8", "--knn-k", "5", "--chunk-size", "4", "--ks", "2,40",
            "--seeds", "0", "--losses", "simclr", "--checkpoint-every", "1", "--out", str(out)]
    study = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                              "-m", "negbatch.cli", *args], stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)  # its own group, as a terminal's: Ctrl-C reaches every process
    try:
        deadline = time.time() + 300
        while not any(p.stat().st_size for p in out.glob("runs/*/metrics.jsonl")) and time.time() < deadline:
            time.sleep(0.1)
        os.killpg(study.pid, signal.SIGINT)
        _, err = study.communicate(timeout=300)
    finally:
        study.kill()
    assert err.count("--ks 40: at or above the 30 candidates") == 1, err[-3000:]
    assert err.count("each chunk is normalised by its own BatchNorm statistics") == 1, err[-3000:]
    assert err.count("stopping after this step (with a checkpoint)") == 1, err[-3000:]
    assert err.count("negbatch study: stopped") == 1 and "(rank 1)" not in err, err[-3000:]
    assert err.count("run the same command again to resume") == 2, err[-3000:]  # the run's line and the study's
