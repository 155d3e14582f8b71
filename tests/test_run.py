import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _runs import without_times
from negbatch.data import load_digits
from negbatch.lab import TrainConfig, load_config_file, read_metrics, train
from negbatch.lab.lars import LARS
from negbatch.lab.optim import WarmupCosine
from negbatch.lab.run import CHECKPOINT
from negbatch.lab.tasks.image import build_loss

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = dict(n_train=96, n_test=64, batch_size=16, epochs=2, encoder_widths=(16,), head_widths=(16, 8), knn_k=5)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def tiny(**kw):
    return TrainConfig(**{**TINY, **kw})


def test_end_to_end_writes_everything(tmp_path, digits):
    s = train(tiny(), tmp_path, data=digits)
    assert s["steps"] == 2 * (96 // 16)
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "summary.json", CHECKPOINT):
        assert (tmp_path / name).exists(), name
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) and r["snr_mean"] >= 0 for r in rows)
    assert 0 <= s["linear_acc"] <= 1 and -1 <= s["silhouette"] <= 1
    # A finished run is not trained again.
    assert train(tiny(), tmp_path, data=digits) == s


def test_gradient_snr_under_fp16_loss_scaling_stays_finite(tmp_path, digits):
    """The scaler skips its first steps here (scale 65536 overflows fp16):
    those are not recorded, and the others are recorded unscaled (the SNR was
    NaN for the whole run when skipped steps' inf gradients entered it)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny(epochs=1, precision="fp16", snr=True, log_every=1), tmp_path, data=digits)
    # The skipped first steps leave optimizer.step() uncalled: torch's warning about the schedule is not the user's.
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    values = [r.get("snr_mean") for r in read_metrics(tmp_path)]
    assert values[0] is None  # no step taken yet
    assert values[-1] is not None and all(math.isfinite(v) for v in values if v is not None)
    # The run's figure still draws the SNR curves (it looked at the first row only).
    import matplotlib.axes

    from negbatch.lab.report import run_report

    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append(k.get("label")) or real_plot(ax, *a, **k))
        run_report(tmp_path)
    assert "mean over parameters" in drawn


def test_the_runs_snr_figure_leaves_out_the_burn_in(tmp_path, digits):
    """The first ~1/(1 - beta) estimates come from too few gradients (the
    first is 1/sqrt(eps) = 1e6): plotted, they flattened the curve."""
    import matplotlib.axes

    from negbatch.lab.report import run_report

    train(tiny(epochs=1, log_every=1, snr_beta=0.5), tmp_path, data=digits)  # burn-in: 2 steps of 6
    assert read_metrics(tmp_path)[0]["snr_mean"] > 1e5
    drawn = {}
    real_plot = matplotlib.axes.Axes.plot

    def plot(ax, x, y, *a, **k):
        drawn[k.get("label")] = list(x)
        return real_plot(ax, x, y, *a, **k)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.axes.Axes, "plot", plot)
        run_report(tmp_path)
    assert drawn["mean over parameters"] == [3, 4, 5, 6] == drawn["std across parameters"]



def test_the_runs_figure_without_snr_has_no_snr_panel(tmp_path, digits):
    """With snr off (the batch-size recipe's setting) the figure drew an empty SNR panel titled
    "gradient SNR (all within its burn-in)": no SNR was tracked at all."""
    from matplotlib.figure import Figure

    from negbatch.lab.report import run_report

    train(tiny(epochs=1, snr=False), tmp_path, data=digits)
    saved = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", lambda fig, fname, **kw: saved.append(fig) or Path(fname).write_bytes(b""))
        run_report(tmp_path)
    titles = [ax.get_title() for ax in saved[0].axes]
    assert titles == ["training loss"]

def test_checkpoint_loads_with_weights_only(tmp_path, digits):
    train(tiny(epochs=1), tmp_path, data=digits)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert {"model", "optimizer", "schedule", "loss", "sampler", "rng", "snr", "step"} <= set(ckpt)


@pytest.mark.parametrize(
    "kw, stop",
    [
        (dict(loss="simclr", negatives=3, optimizer="adam", checkpoint_every=4), 5),  # mid-epoch, rows past the checkpoint dropped
        (dict(loss="relic", negatives=5, optimizer="lars", lr=0.5, warmup_steps=3), 6),  # epoch boundary
    ],
)
def test_resumed_run_gives_identical_metrics(tmp_path, digits, kw, stop):
    cfg = tiny(**kw)
    full = train(cfg, tmp_path / "full", data=digits)
    assert train(cfg, tmp_path / "cut", data=digits, stop_after=stop) is None
    if cfg.checkpoint_every:
        # Simulate a crash after the checkpoint at step 4: rows 5.. were written but not checkpointed.
        assert len(read_metrics(tmp_path / "cut")) == 5
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # a row cut short by the interruption
    resumed = train(cfg, tmp_path / "cut", data=digits)
    assert without_times(read_metrics(tmp_path / "full")) == without_times(read_metrics(tmp_path / "cut"))
    for key in ("linear_acc", "knn_acc", "silhouette", "intra_class_distance", "alignment", "uniformity", "final_loss"):
        assert full[key] == resumed[key], key


def test_every_optimizer_and_loss_runs(tmp_path, digits):
    for opt in ("sgd", "adamw"):
        s = train(tiny(optimizer=opt, loss="relic", epochs=1, lr=0.05, snr=False), tmp_path / opt, data=digits)
        assert math.isfinite(s["final_loss"]) and "snr_mean" not in s


def test_conv_encoder_run(tmp_path, digits):
    s = train(tiny(encoder="conv", encoder_widths=(4, 8), epochs=1), tmp_path, data=digits)
    assert math.isfinite(s["final_loss"])


def test_negatives_above_candidates_rejected():
    with pytest.raises(ValueError, match="negatives=16 exceeds the 15 candidates"):
        build_loss(tiny(loss="relic", negatives=16))
    build_loss(tiny(loss="simclr", negatives=30))  # 2B - 2 = 30 is fine


def test_other_config_in_same_folder_rejected(tmp_path, digits):
    train(tiny(epochs=1), tmp_path, data=digits, stop_after=1)
    with pytest.raises(ValueError, match="different configuration .differs in seed"):
        train(tiny(epochs=1, seed=1), tmp_path, data=digits)
    # Runtime-only options may change between sessions.
    assert train(tiny(epochs=1, progress=True, checkpoint_every=2), tmp_path, data=digits) is not None
    # A finished folder refuses another configuration too (it used to hand back its old summary).
    with pytest.raises(ValueError, match="different configuration .differs in negatives"):
        train(tiny(epochs=1, negatives=5), tmp_path, data=digits)


def test_the_log_frequency_and_the_device_are_not_part_of_a_run(tmp_path, digits):
    """log_every and device change which steps are logged and the rounding, not the experiment: a run
    resumes, and a finished one is found, under another (they were refused as another configuration)."""
    assert tiny(log_every=5, device="auto").identity() == tiny().identity()
    train(tiny(epochs=1), tmp_path, data=digits, stop_after=2)
    finished = train(tiny(epochs=1, log_every=4), tmp_path, data=digits)  # resumed, logging every 4th step
    assert finished["steps"] == 6 and [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 4, 6]
    assert train(tiny(epochs=1, log_every=3, device="auto"), tmp_path, data=digits) == finished  # not trained again


def test_a_run_refused_for_bad_input_does_not_claim_the_folder(tmp_path, digits):
    with pytest.raises(ValueError, match="negatives=100 exceeds"):
        train(tiny(epochs=1, negatives=100), tmp_path, data=digits)
    assert not (tmp_path / "config.json").exists()
    assert train(tiny(epochs=1, negatives=10), tmp_path, data=digits) is not None  # the fix is accepted


def test_too_few_evaluation_images_refused_before_training(tmp_path, digits):
    # Until 2026-12-03 these trained to the end, then failed in the evaluation with a message naming
    # no option, and every rerun resumed and failed again.
    with pytest.raises(ValueError, match=r"at least 2 test images.*\(n_test=1\); raise n_test"):
        train(tiny(n_test=1), tmp_path / "a", data=digits)
    with pytest.raises(ValueError, match=r"one class only.*raise probe_samples \(now 1\)"):
        train(tiny(probe_samples=1), tmp_path / "b", data=digits)
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "b" / "config.json").exists()
    # Three test images of three classes: the intra-class distance is undefined (None), as at scale.
    s = train(tiny(n_test=3, epochs=1), tmp_path / "c", data=digits)
    assert len(set(digits.y_test[:3].tolist())) == 3
    assert s["intra_class_distance"] is None and s["silhouette"] == 0.0


def test_damaged_checkpoint_or_config_named_in_the_error(tmp_path, digits):
    train(tiny(epochs=1), tmp_path, data=digits, stop_after=1)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"checkpoint.pt cannot be loaded \(RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory\); the file is damaged or incomplete: delete it to run again from the start \(the metrics logged so far are then rewritten\)$"):
        train(tiny(epochs=1), tmp_path, data=digits)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json cannot be read.*delete it"):
        train(tiny(epochs=1), tmp_path, data=digits)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(tiny(epochs=1), tmp_path / "a_file", data=digits)


def test_config_files_and_errors(tmp_path):
    (tmp_path / "a.toml").write_text('loss = "relic"\nnegatives = 5\nhead-widths = [32, 8]\n')
    (tmp_path / "a.yaml").write_text("train:\n  loss: relic\n  negatives: 5\n  head_widths: [32, 8]\n")
    a = TrainConfig.from_dict(load_config_file(tmp_path / "a.toml"))
    b = TrainConfig.from_dict(load_config_file(tmp_path / "a.yaml"))
    assert a == b and a.head_widths == (32, 8) and a.negatives == 5
    # A misspelt table: its name was taken for an option ("unknown key 'trian' (did you mean 'n_train'?)").
    (tmp_path / "typo.toml").write_text('[trian]\nepochs = 2\n')
    with pytest.raises(ValueError, match=r"typo.toml has a table \[trian\]; training options go under \[train\] "
                                         r"\(or at the top level\), a study's under \[study\]"):
        load_config_file(tmp_path / "typo.toml")
    # An unknown key names its file (it said "in config", the file lost once merged with the command line).
    (tmp_path / "keys.yaml").write_text("train:\n  temprature: 0.1\n  bach-size: 4\n  epochs: 1\n")
    with pytest.raises(ValueError, match=r"keys.yaml: unknown keys 'temprature' \(did you mean 'temperature'\?\), "
                                         r"'bach-size' \(did you mean 'batch_size'\?\)"):
        load_config_file(tmp_path / "keys.yaml")
    with pytest.raises(ValueError, match="unknown key 'temprature'.*did you mean 'temperature'"):
        TrainConfig.from_dict({"temprature": 0.1})
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        TrainConfig.from_dict({"batch_size": -4})
    for name in ("lr", "weight_decay", "alpha", "temperature"):  # inf passes v > 0 and fails in the first step
        with pytest.raises(ValueError, match=f"{name}: expected a float.*got inf, which is not finite"):
            TrainConfig.from_dict({name: float("inf")})
    with pytest.raises(ValueError, match="negatives"):
        TrainConfig.from_dict({"negatives": "some"})
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        TrainConfig(optimizer="rmsprop")
    # Widths given in Python as a tuple are checked as a file's list is (a tuple
    # of -3 once passed and failed in the model, after the run claimed its folder).
    for widths in [(-3, 4), (2.5, 4), (True, 4), ()]:
        with pytest.raises(ValueError, match="encoder_widths: expected a (non-empty )?list of positive ints"):
            TrainConfig(encoder_widths=widths)
    assert TrainConfig(encoder_widths=(256.0, 128)).encoder_widths == (256, 128)
    with pytest.raises(ValueError, match="(?s)epochs: expected an int.*dataset: expected one of"):
        TrainConfig.from_dict({"epochs": "2.5", "dataset": "cifar"})  # a type error hides no value error
    (tmp_path / "bad.toml").write_text("loss = = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config_file(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="does not exist"):
        load_config_file(tmp_path / "none.toml")
    (tmp_path / "mixed.toml").write_text('seed = 1\n[train]\nloss = "relic"\n')
    with pytest.raises(ValueError, match=r"mixed.toml has a \[train\] table.*\['seed'\]"):
        load_config_file(tmp_path / "mixed.toml")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_config_file(tmp_path / "bad.json")


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)


def test_lars_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.1, momentum=0.9, weight_decay=0.1, eta=0.01)
    w.grad, b.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([2.0])
    opt.step()
    d = torch.tensor([[1.3, 0.4]])  # g + wd * w
    ratio = 0.01 * 5 / float(d.norm())
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * ratio * d)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.2]))  # biases: plain momentum SGD


def _lars_reference(weights, grads_per_step, lrs, momentum, weight_decay, eta):
    """LARS in plain Python floats (You et al. 2017, SimCLR's form), one list of numbers per
    parameter: for a parameter of more than one dimension d = g + wd w scaled by
    eta ||w|| / ||d|| (1 when a norm is 0); other parameters take g unscaled, undecayed."""
    weights = [[float(v) for v in w.flatten()] for w in weights]
    bufs = [[0.0] * len(w) for w in weights]
    for grads, lr in zip(grads_per_step, lrs):
        for i, (g, shape) in enumerate(grads):
            w = weights[i]
            g = [float(v) for v in g.flatten()]
            if len(shape) > 1:
                d = [gj + weight_decay * wj for gj, wj in zip(g, w)]
                wn, dn = math.sqrt(sum(v * v for v in w)), math.sqrt(sum(v * v for v in d))
                r = eta * wn / dn if wn > 0 and dn > 0 else 1.0
                d = [r * v for v in d]
            else:
                d = g
            bufs[i] = [momentum * b + lr * dj for b, dj in zip(bufs[i], d)]
            weights[i] = [wj - bj for wj, bj in zip(w, bufs[i])]
    return weights


def test_lars_against_a_float64_reference_over_steps():
    """Several steps (momentum carried), a conv-shaped, a zero and a 1-D parameter, the learning
    rate changed between steps by a schedule, as a run does."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)),
              torch.nn.Parameter(torch.zeros(3, 5, dtype=torch.float64)),  # ||w|| = 0: ratio 1
              torch.nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))]
    start = [p.detach().clone() for p in params]
    opt = LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-3, eta=0.02)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: [0.5, 1.0, 0.7, 0.2, 0.1][s])
    grads_per_step, lrs = [], []
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        lrs.append(opt.param_groups[0]["lr"])
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        schedule.step()
        grads_per_step.append([(gr, tuple(p.shape)) for p, gr in zip(params, grads)])
    expected = _lars_reference(start, grads_per_step, lrs, 0.9, 1e-3, 0.02)
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach().flatten(), torch.tensor(e, dtype=torch.float64), rtol=1e-12, atol=1e-14)


@pytest.mark.cuda
def test_training_on_cuda(tmp_path, digits):
    s = train(tiny(device="cuda", negatives=4), tmp_path, data=digits)
    assert math.isfinite(s["final_loss"]) and 0 <= s["linear_acc"] <= 1
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True, map_location="cpu")
    assert ckpt["step"] == s["steps"]


def test_run_folder_records_its_data_and_refuses_other_data(tmp_path, digits):
    from negbatch.data import from_arrays

    x = digits.x_train[:160, 0].numpy()
    y = digits.y_train[:160].numpy()
    mine = from_arrays(x[:96], y[:96], x[96:], y[96:], name="mydigits")
    s = train(tiny(epochs=1), tmp_path, data=mine)
    saved = json.loads((tmp_path / "data.json").read_text())
    assert saved["name"] == "mydigits" and saved["splits"]["train"]["images"]["shape"] == [96, 1, 8, 8]
    assert len(saved["fingerprint"]) == 64
    assert s["data"] == saved
    # Other arrays under the same name, into the finished folder: refused, not the old summary.
    other = from_arrays(x[:96][::-1].copy(), y[:96][::-1].copy(), x[96:], y[96:], name="mydigits")
    with pytest.raises(ValueError, match="holds a run on other data .differs in fingerprint"):
        train(tiny(epochs=1), tmp_path, data=other)
    # And into an unfinished folder.
    train(tiny(epochs=1), tmp_path / "partial", data=mine, stop_after=2)
    with pytest.raises(ValueError, match="holds a run on other data") as err:
        train(tiny(epochs=1), tmp_path / "partial", data=other)
    assert "nothing was trained there yet" not in str(err.value)  # it has a checkpoint
    assert train(tiny(epochs=1), tmp_path, data=mine) == s
    # A run that failed before its first checkpoint: the message says the folder holds nothing trained.
    (tmp_path / "partial" / "checkpoint.pt").unlink()
    with pytest.raises(ValueError, match=r"use another folder \(nothing was trained there yet, no checkpoint: "
                                         r"delete the folder to start this run in it\)"):
        train(tiny(epochs=1), tmp_path / "partial", data=other)


def test_a_folder_in_use_is_refused_with_its_holder(tmp_path, digits):
    from negbatch.lab.run import hold_lock

    with hold_lock(tmp_path / "run"):
        with pytest.raises(ValueError, match=rf"run is in use by process {os.getpid()} on .* since"):
            train(tiny(epochs=1), tmp_path / "run", data=digits)
    assert train(tiny(epochs=1), tmp_path / "run", data=digits) is not None  # released on exit


def test_a_run_refused_while_setting_up_leaves_no_folder(tmp_path, digits):
    """The lock's folder was left behind, empty but for .lock, by a run refused before its first
    write (e.g. K above the candidates); a folder that existed before is kept as it was."""
    with pytest.raises(ValueError, match="negatives"):
        train(tiny(epochs=1, negatives=10_000), tmp_path / "new" / "run", data=digits)
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="negatives"):
        train(tiny(epochs=1, negatives=10_000), tmp_path / "mine", data=digits)
    assert (tmp_path / "mine").is_dir()


def test_checkpoints_by_time_by_default_and_a_killed_run_resumes(tmp_path, digits):
    """kill -9 in the middle of a run: the periodic checkpoint survives, the lock does not stay,
    and the rerun resumes from the checkpoint and ends as an uninterrupted run."""
    assert TrainConfig().checkpoint_minutes > 0  # on by default
    # Long enough that the kill lands mid-run on a fast machine (the first checkpoint, written
    # atomically, is taken a few steps in; 12 epochs once finished within the old 0.2 s wait).
    cfg = tiny(epochs=40, checkpoint_minutes=0.0002)  # every 12 ms
    code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
            "from negbatch.data import load_digits; from negbatch.lab import TrainConfig, train; "
            f"train(TrainConfig(**{cfg.to_dict()!r}), sys.argv[1], data=load_digits())")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cut")], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "cut" / CHECKPOINT).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
    saved = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["step"]
    assert 0 < saved < 40 * 6
    full = train(cfg, tmp_path / "full", data=digits)
    resumed = train(cfg, tmp_path / "cut", data=digits)
    assert without_times(read_metrics(tmp_path / "cut")) == without_times(read_metrics(tmp_path / "full"))
    assert resumed["linear_acc"] == full["linear_acc"] and resumed["final_loss"] == full["final_loss"]


def test_resume_says_where_it_resumes(tmp_path, digits, capsys):
    train(tiny(), tmp_path, data=digits, stop_after=5)
    assert "stopped at step 5 of 12; run the same command again to resume" in capsys.readouterr().err
    train(tiny(), tmp_path, data=digits)
    assert "resuming from step 5 of 12" in capsys.readouterr().err


def test_a_rows_temperature_and_bias_are_the_ones_its_loss_used(tmp_path, digits):
    from negbatch.lab.tasks.image import build_loss

    cfg = tiny(epochs=1, learnable_temperature=True, loss="siglip", lr=0.05, optimizer="sgd", log_every=1)
    train(cfg, tmp_path, data=digits)
    first = read_metrics(tmp_path)[0]
    start = build_loss(cfg, num_samples=96).log_values()  # before any step: what step 1 computed with
    assert first["step"] == 1 and first["temperature"] == pytest.approx(start["temperature"], rel=1e-6)
    assert first["bias"] == pytest.approx(start["bias"], rel=1e-6)


def _signal_twice_and_survive():
    import signal

    for _ in range(2):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_worker_ignores_the_stop_handler_it_inherits(capfd):
    # DataLoader workers (--num-workers N) are forked inside the training loop's stop handler, and Ctrl-C
    # reaches the whole process group: until 2026-12-03 each worker printed "stopping after this step ..."
    # once more, and a second Ctrl-C raised KeyboardInterrupt inside the workers.
    import multiprocessing

    from negbatch.lab.folder import _StopRequest

    with _StopRequest() as stop:
        worker = multiprocessing.get_context("fork").Process(target=_signal_twice_and_survive)
        worker.start()
        worker.join(60)
        assert worker.exitcode == 0 and not stop.requested
    assert "stopping after this step" not in capfd.readouterr().err


def test_a_cuda_device_that_is_not_there_is_a_clear_error(monkeypatch):
    """'cuda:x' passed the option's check, and 'cuda:3' on a machine with one GPU passed the device's:
    torch then failed with its own RuntimeError (invalid device string or ordinal), a traceback."""
    from negbatch.lab.folder import resolve_device
    from negbatch.lab.processes import Processes

    with pytest.raises(ValueError, match=r"device: expected cpu, cuda, cuda:N or auto \(got 'cuda:x'\)"):
        tiny(device="cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for resolve in (resolve_device, Processes().device):
        with pytest.raises(ValueError, match=r"device='cuda:3' but this machine has 1 CUDA device \(cuda:0\); "
                                             r"use device='cuda:0'"):
            resolve("cuda:3")
        assert resolve("cuda:0") == torch.device("cuda", 0) and resolve("auto") == torch.device("cuda")
