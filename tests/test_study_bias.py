"""``negbatch study bias`` end to end at tiny sizes (in-process), and its helpers."""

import json

import pytest

from _runs import figures_not_drawn
from negbatch.lab import TrainConfig
from negbatch.lab.studies import bias as study
from negbatch.lab.studies import get_study

TINY = ["--n-train", "64", "--n-test", "48", "--batch-size", "16", "--epochs", "1", "--encoder-widths", "16",
        "--head-widths", "16,8", "--knn-k", "5", "--seeds", "0,1", "--bias-batch-sizes", "4,8,1000", "--num-batches", "4",
        "--bias-samples", "32"]


def test_study_bias_end_to_end_resumes_and_reports(tmp_path, capsys, monkeypatch):
    from negbatch.cli import main

    out = tmp_path / "study"
    assert main(["study", "bias", *TINY, "--out", str(out)]) == 0, capsys.readouterr().err
    assert isinstance(get_study("bias", "image"), study.BiasStudy)
    rows = json.loads((out / "results.json").read_text())
    got = sorted((x["loss"], x["batch_size"], x["seed"]) for x in rows)
    assert got == [("global", 8, 0), ("global", 8, 1), ("simclr", 8, 0), ("simclr", 8, 1), ("simclr", 16, 0), ("simclr", 16, 1)]
    assert all(x["temperature"] == 0.1 and x["epochs"] == 1 for x in rows)  # study default, command line
    bias_rows = json.loads((out / "bias_results.json").read_text())
    # 2 seeds x (init: 2 estimators, trained: 4) x batch sizes 4, 8 (1000 > N = 32 dropped).
    assert len(bias_rows) == 2 * ((2 + 1) + (4 + 1)) * 2  # + the paired plain-vs-exact row per size
    assert {b["batch_size"] for b in bias_rows} == {4, 8} and {b["n"] for b in bias_rows} == {32}
    assert all(b["noise_floor"] >= 0 and b["relative_variance"] > 0 for b in bias_rows)
    text = (out / "report.md").read_text()
    for piece in ("## (b) Training", "## (a) Gradient bias", "**Verdict**", "Welch p", "InfoNCE, full batch", "95% CI"):
        assert piece in text, piece
    # The trained model's global loss over the seeds (each seed's rows repeat it: not a std over rows).
    from negbatch.lab.stats import mean_std

    loss, spread, n = mean_std({b["seed"]: b["global_loss"] for b in bias_rows if b["phase"] == "trained"}.values())
    assert n == 2 and f"global loss {loss:.3f} ± {spread:.3f}" in text
    for name in ("accuracy.png", "bias_vs_batch.png", "variance_vs_batch.png", "results.csv", "bias_results.csv"):
        assert (out / name).exists(), name
    metrics = [json.loads(line) for p in out.glob("runs/loss=global*/metrics.jsonl") for line in p.read_text().splitlines()]
    assert metrics and all("infonce" in m for m in metrics)

    # The report is rebuilt from the folder alone; a rerun trains and measures nothing again, and says so.
    figures_not_drawn(monkeypatch)  # drawn above
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == text
    monkeypatch.setattr(study.BiasStudy, "report", lambda self, folder: folder / "report.md")  # drawn above
    capsys.readouterr()
    watched = list(out.glob("runs/*/summary.json")) + list(out.glob("bias/*.json"))
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert main(["study", "bias", *TINY, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "6 finished earlier (skipped)" in err and "bias seed=0: measured earlier" in err and "[1/" not in err
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert json.loads((out / "bias_results.json").read_text()) == bias_rows


def test_build_configs_halves_the_batch():
    base = TrainConfig(n_train=64, batch_size=8)
    got = [(label, c.loss, c.batch_size, c.seed) for label, c in study.build_configs(base, 33, [0, 5])]
    assert got == [("InfoNCE, full batch", "simclr", 33, 0), ("InfoNCE, full batch", "simclr", 33, 5),
                   ("InfoNCE, half batch", "simclr", 16, 0), ("InfoNCE, half batch", "simclr", 16, 5),
                   ("global (corrected), half batch", "global", 16, 0), ("global (corrected), half batch", "global", 16, 5)]
    with pytest.raises(ValueError, match="--batch-size"):
        study.build_configs(base, 3, [0])


def test_bad_options_named(tmp_path, capsys):
    from negbatch.cli import main

    assert main(["study", "bias", "--seeds", "a", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["study", "bias", "--num-batches", "1", "--out", str(tmp_path)]) == 2
    assert "--num-batches must be >= 2" in capsys.readouterr().err


def test_bias_batch_sizes_outside_the_set_rejected(tmp_path):
    cfg = TrainConfig(n_train=16, n_test=16, batch_size=8, loss="global", encoder_widths=(8,), head_widths=(8, 4))
    with pytest.raises(ValueError, match="--bias-batch-sizes"):
        study.measure_bias(cfg, tmp_path / "run", tmp_path / "cache", [64, 1], 4, 100)


def test_a_run_with_a_learned_temperature_is_measured_too(tmp_path, capsys):
    from negbatch.cli import main

    one_seed = [a if a != "0,1" else "0" for a in TINY]
    out = tmp_path / "study"
    assert main(["study", "bias", *one_seed, "--learnable-temperature", "true", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert json.loads((out / "bias_results.json").read_text())


def test_the_bias_measurement_takes_one_thread_whatever_the_caller_has(tmp_path, capsys, monkeypatch):
    # The runs train with one thread; the bias part runs in the study's own
    # process, and its floats depend on the thread count: measured at the
    # machine's cores they would not repeat on another machine.
    import torch

    import negbatch.diagnostics as diagnostics
    from negbatch.cli import main
    from negbatch.lab.sweep import run_key

    one_seed = [a if a != "0,1" else "0" for a in TINY]
    out = tmp_path / "study"
    assert main(["study", "bias", *one_seed, "--skip-bias", "--out", str(out)]) == 0, capsys.readouterr().err
    spec = json.loads((out / "study.json").read_text())
    (cfg,) = [c for _, c in study.build_configs(TrainConfig.from_dict(spec["base"]), spec["batch_size"], [0])
              if c.loss == "global"]
    exact, seen = diagnostics.exact_global_gradient, []

    def watched(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return exact(*args, **kwargs)

    monkeypatch.setattr(diagnostics, "exact_global_gradient", watched)
    before = torch.get_num_threads()
    rows = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rows[threads] = study.measure_bias(cfg, out / "runs" / run_key(cfg, study.BiasStudy.key_fields),
                                               tmp_path / f"cache{threads}", [4, 8], 4, 32)
            assert torch.get_num_threads() == threads  # the caller's count comes back
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1, 1]  # init and trained, at either count
    assert rows[1] == rows[2]


def test_torch_threads_restores_the_count_after_an_error():
    import torch

    from negbatch.lab.sweep import torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with torch_threads(1):
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_bias_cache_written_before_log_every_and_device_left_the_identity_is_read(tmp_path):
    """The cache records the configuration's identity, which held log_every and device until 2026-12-03:
    such a cache is still this configuration's (it was measured again, minutes per seed)."""
    cfg = TrainConfig(loss="global", n_train=64, n_test=48, batch_size=16, epochs=1)
    settings = {"version": 4, "config": cfg.former_identity(), "batch_sizes": [4], "num_batches": 2, "bias_samples": 8}
    (tmp_path / "seed=0.json").write_text(json.dumps({"settings": settings, "rows": [{"measured": "earlier"}]}))
    # The run folder does not exist: only the cache can answer.
    assert study.measure_bias(cfg, tmp_path / "no-run", tmp_path, [4], 2, 8) == [{"measured": "earlier"}]
