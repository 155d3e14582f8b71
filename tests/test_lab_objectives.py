"""The lab's runs with the newer losses: DCL, SigLIP, a queue, a learnable temperature."""

import math

import pytest
import torch

from _runs import without_times
from negbatch import DCL, InfoNCE, SigLIP
from negbatch.data import load_digits
from negbatch.lab import TrainConfig, read_metrics, train
from negbatch.lab.objective import batch_loss, loss_parameter_groups
from negbatch.lab.run import CHECKPOINT
from negbatch.lab.tasks.image import Batch, build_loss

TINY = dict(n_train=96, n_test=64, batch_size=16, epochs=2, encoder_widths=(16,), head_widths=(16, 8), knn_k=5,
            snr=False)
TEXT = dict(dataset="builtin", steps=4, batch_size=8, test_fraction=0.25, text_dim=16, vocab_size=200)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def tiny(**kw):
    return TrainConfig(**{**TINY, **kw})


def test_config_names_each_loss_and_its_class():
    for form, name in (("two_view", "simclr"), ("query_document", "infonce")):
        cfg = TrainConfig(loss=name, **({} if form == "two_view" else {"dataset": "builtin"}))
        assert type(batch_loss(cfg, form=form, gather=False)) is InfoNCE
    cfg = TrainConfig(loss="dcl", dcl_sigma=0.5, queue_size=8, negatives=4)
    loss = batch_loss(cfg, form="two_view", gather=False)
    assert isinstance(loss, DCL) and loss.sigma == 0.5 and len(loss.queue.embeddings[0]) in (0, 8)
    siglip = batch_loss(TrainConfig(loss="siglip", siglip_bias=-5.0), form="two_view", gather=False)
    assert isinstance(siglip, SigLIP) and siglip.bias.item() == -5.0 and siglip.logit_scale is not None
    fixed = batch_loss(TrainConfig(loss="siglip", learnable_temperature=False), form="two_view", gather=False)
    assert fixed.logit_scale is None


@pytest.mark.parametrize("kw, message", [
    (dict(loss="relic", queue_size=4), "queue_size: a queue extends the softmax losses"),
    (dict(loss="global", queue_size=4), "queue_size"),
    (dict(queue_size=-1), "queue_size: expected an int >= 0"),
    (dict(dcl_sigma=0.5), "dcl_sigma: applies to loss='dcl' only"),
    (dict(loss="dcl", dcl_sigma=0), "dcl_sigma: expected a float > 0"),
    (dict(siglip_bias=-3.0), "siglip_bias: applies to loss='siglip' only"),
    (dict(loss="siglip", siglip_bias=float("nan")), "siglip_bias: expected a finite float"),
    (dict(learnable_temperature="yes"), "learnable_temperature: expected true or false"),
    (dict(dataset="builtin", loss="simclr"), "loss: expected one of infonce, global, dcl, siglip"),
])
def test_bad_objective_options_are_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_the_loss_own_parameters_are_trained_without_weight_decay():
    model = torch.nn.Linear(4, 2)
    assert list(loss_parameter_groups(model, InfoNCE())) == list(model.parameters())
    groups = loss_parameter_groups(model, SigLIP())
    assert groups[0]["params"] == list(model.parameters())
    assert len(groups[1]["params"]) == 2 and groups[1]["weight_decay"] == 0.0


def _queued_twice_reference(z1, z2, tau):
    """Per-anchor float64 loop: SimCLR whose negatives (every view of every
    other sample) are counted twice, once from the batch, once from the queue."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    n, total = z1.shape[0], 0.0
    for a in range(2 * n):
        i, pos = a % n, (a + n) % (2 * n)
        s = (z @ z[a]) / tau
        negatives = sum(math.exp(s[c]) for c in range(2 * n) if c % n != i)
        total += -s[pos].item() + math.log(math.exp(s[pos]) + 2 * negatives)
    return total / (2 * n)


def test_the_queue_sees_the_batch_indices_and_skips_the_anchors_own_entries():
    loss_fn = build_loss(tiny(queue_size=32))
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    batch = Batch(torch.arange(16), torch.zeros(16, 1, 8, 8), torch.zeros(16, 1, 8, 8))
    first = loss_fn(z1, z2, batch, torch.Generator())
    # The queue is empty at the first step: plain InfoNCE (computed another way: rounding apart).
    torch.testing.assert_close(first, InfoNCE(temperature=0.2)(z1, z2), rtol=1e-6, atol=0)
    # The same samples again: the queue holds both views of each; an anchor's own two are left out.
    again = loss_fn(z1, z2, batch, torch.Generator())
    assert again.item() == pytest.approx(_queued_twice_reference(z1, z2, 0.2), rel=1e-5)


@pytest.mark.parametrize("kw", [
    dict(loss="dcl", dcl_sigma=0.5),
    dict(loss="siglip"),
    dict(loss="simclr", queue_size=48, learnable_temperature=True),
    dict(loss="global", learnable_temperature=True),
])
def test_image_runs_log_and_learn_the_temperature(tmp_path, digits, kw):
    summary = train(tiny(**kw), tmp_path, data=digits)
    rows = read_metrics(tmp_path)
    assert math.isfinite(summary["final_loss"]) and 0 <= summary["linear_acc"] <= 1
    if kw.get("learnable_temperature") or kw["loss"] == "siglip":
        temperatures = [r["temperature"] for r in rows]
        assert temperatures[0] != temperatures[-1] and all(0.01 <= t <= 1 for t in temperatures)
    if kw["loss"] == "siglip":
        assert rows[0]["bias"] != rows[-1]["bias"]


def test_a_queue_and_a_learned_temperature_resume_exactly(tmp_path, digits):
    cfg = tiny(loss="dcl", queue_size=40, negatives=20, learnable_temperature=True, checkpoint_every=3)
    full = train(cfg, tmp_path / "full", data=digits)
    assert train(cfg, tmp_path / "cut", data=digits, stop_after=7) is None
    state = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert int(state["loss"]["loss.queue.filled"][0]) == 40  # the queue travels in the checkpoint
    resumed = train(cfg, tmp_path / "cut", data=digits)
    assert without_times(read_metrics(tmp_path / "full")) == without_times(read_metrics(tmp_path / "cut"))
    assert full["final_loss"] == resumed["final_loss"] and full["linear_acc"] == resumed["linear_acc"]


def test_a_cached_queue_run_equals_the_plain_run(tmp_path, digits):
    """GradCache calls the loss once per step: the queue is filled once per step, as in the plain run."""
    kw = dict(loss="simclr", queue_size=32, norm="none", epochs=1, learnable_temperature=True)
    plain = train(tiny(**kw), tmp_path / "plain", data=digits)
    cached = train(tiny(chunk_size=5, **kw), tmp_path / "cached", data=digits)
    p, c = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "cached")
    assert [r["loss"] for r in p] == pytest.approx([r["loss"] for r in c], rel=1e-5)
    assert [r["temperature"] for r in p] == pytest.approx([r["temperature"] for r in c], rel=1e-5)
    assert plain["linear_acc"] == pytest.approx(cached["linear_acc"], abs=0.05)


@pytest.mark.parametrize("kw", [dict(loss="dcl"), dict(loss="siglip"), dict(loss="infonce", queue_size=16)])
def test_text_runs_with_each_loss(tmp_path, kw):
    summary = train(TrainConfig(**TEXT, **kw), tmp_path)
    assert math.isfinite(summary["final_loss"]) and 0 <= summary["ndcg@10"] <= 1
    if kw["loss"] == "siglip":
        assert "bias" in read_metrics(tmp_path)[-1]


def test_probe_samples_fits_the_probes_on_a_prefix_of_the_training_split(tmp_path, digits):
    from negbatch.evaluation import linear_probe
    from negbatch.lab.tasks.image import representations

    cfg = tiny(epochs=1, probe_samples=40)
    summary = train(cfg, tmp_path, data=digits)
    model = torch.load(tmp_path / CHECKPOINT, weights_only=True)["model"]
    from negbatch.lab.tasks.image import build_model

    net = build_model(cfg, digits.image_shape)
    net.load_state_dict(model)
    net.eval()
    data = digits.subset(96, 64)
    with torch.no_grad():
        rtr, rte = representations(net, data.x_train[:40]), representations(net, data.x_test)
    assert summary["linear_acc"] == linear_probe(rtr, data.y_train[:40], rte, data.y_test)
    with pytest.raises(ValueError, match="probe_samples=97 exceeds the 96 training images"):
        train(tiny(epochs=1, probe_samples=97), tmp_path / "too-many", data=digits)
