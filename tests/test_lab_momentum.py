"""The lab's momentum encoder (MoCo, ``key_momentum``): the keys -- second views
of images, documents of text pairs -- come from an exponential moving average
of the model, updated once after every optimizer step, saved and resumed."""

import math

import pytest
import torch

from _reference import infonce_query_document
from _runs import without_times
from negbatch import MomentumEncoder
from negbatch.data import load_digits
from negbatch.lab import TrainConfig, read_metrics, train
from negbatch.lab.run import CHECKPOINT
from negbatch.lab.tasks.image import Batch, PairLoss, build_loss, forward_backward

TINY = dict(n_train=96, n_test=64, batch_size=16, epochs=2, encoder_widths=(16,), head_widths=(16, 8), knn_k=5,
            snr=False)
TEXT = dict(dataset="builtin", steps=6, batch_size=8, test_fraction=0.25, text_dim=16, vocab_size=200)
TAU = 0.2


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_text_defaults_to_moco_s_one_direction():
    assert TrainConfig(**TEXT, key_momentum=0.99).symmetric is False
    assert TrainConfig(**TEXT).symmetric is True
    # What a saved configuration reads back as (every field resolved) builds again.
    cfg = TrainConfig(**TEXT, key_momentum=0.99)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kw, message", [
    (dict(key_momentum=1.0), r"key_momentum: expected a float in \[0, 1\)"),
    (dict(key_momentum=-0.1), r"key_momentum: expected a float in \[0, 1\)"),
    (dict(key_momentum=0.9, loss="relic"), "key_momentum: a momentum encoder feeds the softmax losses"),
    (dict(key_momentum=0.9, loss="siglip"), "not loss='siglip'"),
    (dict(key_momentum=0.9, chunk_size=4), "key_momentum: the lab.s chunked step"),
    (dict(TEXT, key_momentum=0.9, symmetric=True), "symmetric: with a momentum encoder"),
    (dict(TEXT, key_momentum=0.9, encoder="minilm"), "key_momentum: sentence-transformers' trainer"),
])
def test_bad_momentum_options_are_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_an_image_step_contrasts_queries_with_the_momentum_encoder_s_keys():
    """The loss of a step and the model's gradient against a float64 per-anchor
    loop whose keys come from the copy, as constants."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 6)).double()
    keys = MomentumEncoder(model, momentum=0.9)
    with torch.no_grad():
        keys.encoder[1].weight.add_(0.3 * torch.randn(6, 16, dtype=torch.float64))  # the copy has moved away
    loss_fn = build_loss(TrainConfig(**TINY, key_momentum=0.9))
    assert isinstance(loss_fn, PairLoss) and loss_fn.loss.form == "query_document" and not loss_fn.loss.symmetric
    batch = Batch(torch.arange(8), torch.randn(8, 1, 4, 4, dtype=torch.float64),
                  torch.randn(8, 1, 4, 4, dtype=torch.float64))
    value = forward_backward(model, loss_fn, batch, torch.Generator(), key_encoder=keys)
    got = [p.grad.clone() for p in model.parameters()]
    assert all(p.grad is None for p in keys.parameters())  # the keys take no gradient

    model.zero_grad()
    q = model(batch.view1)
    k = keys.encoder(batch.view2).detach()
    reference = infonce_query_document(q, k, TAU)
    reference.backward()
    assert value.item() == pytest.approx(reference.item(), rel=1e-12)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def test_the_keys_follow_the_model_once_per_step_and_resume_exactly(tmp_path, digits):
    m = 0.8
    cfg = TrainConfig(**TINY, key_momentum=m, queue_size=32, checkpoint_every=1)
    full = train(cfg, tmp_path / "full", data=digits)
    assert train(cfg, tmp_path / "cut", data=digits, stop_after=3) is None
    first = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)  # weights_only: tensors only
    assert int(first["key_encoder"]["num_updates"]) == 3
    assert train(cfg, tmp_path / "cut", data=digits, stop_after=4) is None
    second = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    # theta_k <- m theta_k + (1 - m) theta_q, with theta_q after the step.
    for name, after in second["model"].items():
        key = f"encoder.{name}"
        if after.is_floating_point() and "running" not in name:
            expected = first["key_encoder"][key] * m + second["model"][name] * (1 - m)
            torch.testing.assert_close(second["key_encoder"][key], expected, rtol=1e-6, atol=1e-7)
    resumed = train(cfg, tmp_path / "cut", data=digits)
    assert without_times(read_metrics(tmp_path / "full")) == without_times(read_metrics(tmp_path / "cut"))
    assert full["final_loss"] == resumed["final_loss"] and full["linear_acc"] == resumed["linear_acc"]
    assert 0 <= full["linear_acc"] <= 1


def test_a_text_run_encodes_the_documents_with_the_momentum_encoder(tmp_path):
    cfg = TrainConfig(**TEXT, key_momentum=0.9, queue_size=16, checkpoint_every=2)
    full = train(cfg, tmp_path / "full")
    assert math.isfinite(full["final_loss"]) and 0 <= full["ndcg@10"] <= 1
    assert train(cfg, tmp_path / "cut", stop_after=3) is None
    state = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert int(state["key_encoder"]["num_updates"]) == 3
    # The copy is no longer the model (it trails it), and is not trained by the loss.
    assert any(not torch.equal(state["key_encoder"][f"encoder.{k}"], v) for k, v in state["model"].items()
               if v.is_floating_point())
    train(cfg, tmp_path / "cut")
    assert without_times(read_metrics(tmp_path / "full")) == without_times(read_metrics(tmp_path / "cut"))


def test_key_momentum_zero_means_no_momentum_encoder(tmp_path, digits):
    summary = train(TrainConfig(**{**TINY, "epochs": 1}), tmp_path, data=digits)
    assert "key_encoder" not in torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert math.isfinite(summary["final_loss"])


def test_runs_saved_before_the_option_keep_their_identity():
    """A field added later counts in a run's identity only when set: earlier run
    folders (and a study's run keys, hashed from the identity) stay the same."""
    assert "key_momentum" not in TrainConfig(**TINY).identity()
    assert TrainConfig(**TINY, key_momentum=0.5).identity()["key_momentum"] == 0.5
