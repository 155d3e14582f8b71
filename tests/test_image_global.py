"""The trainer's ``loss="global"`` (GlobalInfoNCE): the loss against a float64
per-anchor loop, checkpoint/resume of its state, the logged InfoNCE, and one
E-step per optimizer step under gradient caching."""

import copy
import math

import pytest
import torch

from _runs import without_times
from negbatch import GlobalInfoNCE, GradCache
from negbatch.data import load_digits
from negbatch.lab import TrainConfig, read_metrics, train
from negbatch.lab.global_loss import GammaSchedule, GlobalPairLoss
from negbatch.lab.run import CHECKPOINT
from negbatch.lab.tasks.image import Batch, build_loss

from _reference import infonce_two_view

TINY = dict(n_train=96, n_test=64, batch_size=16, epochs=2, encoder_widths=(16,), head_widths=(16, 8), knn_k=5)


def tiny(**kw):
    return TrainConfig(**{**TINY, "loss": "global", **kw})


@pytest.fixture(scope="module")
def digits():
    return load_digits()


class LoopReference:
    """The global loss's stochastic EM written from the formulas: per anchor a
    (view-1 anchors take state column 0, view-2 anchors column 1),
    Zhat_a = mean over the 2B - 2 negatives of exp(s/tau); E-step
    nu <- Zhat on a first visit, else (1 - gamma) nu + gamma Zhat; surrogate
    -s_pos/tau + Zhat/nu + log nu - 1 with nu constant; float64 throughout."""

    def __init__(self, num_samples, tau, gamma):
        self.tau, self.gamma, self.nu, self.steps = tau, gamma, {}, 0

    def __call__(self, z1, z2, index):
        z1, z2 = [z / z.norm(dim=1, keepdim=True) for z in (z1.double(), z2.double())]
        n = z1.shape[0]
        bank = torch.cat([z1, z2])
        gamma = self.gamma(self.steps)
        terms = []
        for a in range(2 * n):
            pos = (a + n) % (2 * n)
            negs = [c for c in range(2 * n) if c not in (a, pos)]
            s_pos = bank[a] @ bank[pos] / self.tau
            zhat = torch.stack([torch.exp(bank[a] @ bank[c] / self.tau) for c in negs]).mean()
            key = (int(index[a % n]), a // n)
            old = self.nu.get(key)
            nu = float(zhat.detach()) if old is None else (1 - gamma) * old + gamma * float(zhat.detach())
            self.nu[key] = nu
            terms.append(-s_pos + zhat / nu + math.log(nu) - 1)
        self.steps += 1
        return torch.stack(terms).mean()


def test_build_loss_global_matches_a_float64_loop_over_steps():
    cfg = tiny(temperature=0.3, gamma=0.6, gamma_schedule="linear", epochs=1)
    loss_fn = build_loss(cfg, num_samples=64)
    assert isinstance(loss_fn, GlobalPairLoss) and loss_fn.loss.num_samples == 64
    ref = LoopReference(64, 0.3, lambda step: 0.6 + 0.4 * max(0.0, 1 - step / 3))  # 64 // 16 = 4 steps
    g = torch.Generator().manual_seed(0)
    for index in (torch.tensor([3, 7, 1, 0, 19]), torch.tensor([7, 2, 3, 11, 0]), torch.tensor([1, 2, 3, 4, 63])):
        z1 = torch.randn(5, 4, generator=g, requires_grad=True)
        z2 = torch.randn(5, 4, generator=g, requires_grad=True)
        batch = Batch(index, torch.zeros(5, 1, 8, 8), torch.zeros(5, 1, 8, 8))
        got = loss_fn(z1, z2, batch, g)
        got_grads = torch.autograd.grad(got, (z1, z2))
        want = ref(z1, z2, index)
        want_grads = torch.autograd.grad(want, (z1, z2))
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-6)
        for (i, role), nu in ref.nu.items():
            assert float(loss_fn.loss.log_nu[i, role]) == pytest.approx(math.log(nu), rel=1e-5, abs=1e-6)
        # The logged value is the standard InfoNCE of the batch, not the surrogate.
        infonce = float(infonce_two_view(z1.detach().double(), z2.detach().double(), 0.3))
        assert loss_fn.log_values()["infonce"] == pytest.approx(infonce, rel=1e-5)
    assert int(loss_fn.loss.num_updates) == 3


def test_gamma_schedules_by_hand():
    assert [GammaSchedule(0.9)(s) for s in (0, 5, 100)] == [0.9, 0.9, 0.9]
    lin = GammaSchedule(0.2, "linear", 5)
    assert [lin(s) for s in range(6)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    cos = GammaSchedule(0.2, "cosine", 3)
    assert [cos(s) for s in range(3)] == pytest.approx([1.0, 0.6, 0.2])
    with pytest.raises(ValueError, match="gamma_schedule"):
        GammaSchedule(0.5, "step")
    with pytest.raises(ValueError, match="gamma"):
        GammaSchedule(0.0)


def test_config_and_build_errors():
    with pytest.raises(ValueError, match="gamma: expected a float in"):
        tiny(gamma=1.5)
    with pytest.raises(ValueError, match="gamma_schedule: expected one of"):
        tiny(gamma_schedule="step")
    with pytest.raises(ValueError, match="needs num_samples"):
        build_loss(tiny())
    with pytest.raises(ValueError, match="negatives=31 exceeds the 30 candidates"):
        build_loss(tiny(negatives=31), num_samples=96)
    assert build_loss(tiny(negatives=30), num_samples=96).loss.negatives == 30


def test_training_logs_infonce_next_to_the_surrogate(tmp_path, digits):
    s = train(tiny(epochs=1), tmp_path, data=digits)
    rows = read_metrics(tmp_path)
    assert len(rows) == 96 // 16 and all({"loss", "infonce", "minibatch_loss"} <= set(r) for r in rows)
    # First visits: nu = Zhat, so the surrogate equals the plain minibatch loss;
    # the InfoNCE (positive in the denominator, sum not mean) lies above it.
    assert rows[0]["loss"] == pytest.approx(rows[0]["minibatch_loss"], rel=1e-5)
    assert all(r["infonce"] > r["minibatch_loss"] for r in rows)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)["loss"]
    assert bool(state["loss.visited"].all())  # one epoch visits every sample (96 = 6 x 16)
    assert int(state["loss.num_updates"]) == 6 and math.isfinite(s["linear_acc"])


@pytest.mark.parametrize("kw, stop", [(dict(gamma_schedule="cosine", gamma=0.5, checkpoint_every=4), 5), (dict(negatives=7), 6)])
def test_resumed_global_run_equals_an_uninterrupted_one(tmp_path, digits, kw, stop):
    cfg = tiny(**kw)
    full = train(cfg, tmp_path / "full", data=digits)
    assert train(cfg, tmp_path / "cut", data=digits, stop_after=stop) is None
    cut_state = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["loss"]
    assert int(cut_state["loss.num_updates"]) == stop  # the nu state is in the checkpoint
    assert int(cut_state["loss.visited"].sum()) == min(stop, 6) * 16  # epoch 1 visits 16 new samples per step
    resumed = train(cfg, tmp_path / "cut", data=digits)
    assert without_times(read_metrics(tmp_path / "full")) == without_times(read_metrics(tmp_path / "cut"))
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)["loss"]
    b = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["loss"]
    assert set(a) == {"loss.log_nu", "loss.visited", "loss.num_updates", "loss.state_form"} == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in ("linear_acc", "knn_acc", "final_loss"):
        assert full[key] == resumed[key], key


def _plain_step(model, loss_fn, v1, v2, index):
    model.zero_grad()
    z1, z2 = model(v1), model(v2)
    loss_fn(z1, z2, index).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("chunk", [3, 5])
def test_gradcache_updates_the_state_once_per_step(chunk):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
    cached_model = copy.deepcopy(model)
    plain = GlobalInfoNCE(30, temperature=0.2, gamma=0.7)
    cached = GlobalInfoNCE(30, temperature=0.2, gamma=0.7)
    cache = GradCache(cached_model, cached, chunk_size=chunk)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        index = torch.randperm(30, generator=g)[:10]
        v1, v2 = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
        want = _plain_step(model, plain, v1, v2, index)
        cached_model.zero_grad()
        cache.step(v1, v2, indices=index)
        for p, w in zip(cached_model.parameters(), want):
            torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
        assert int(cached.num_updates) == step + 1  # once per step, not once per chunk
        torch.testing.assert_close(cached.log_nu, plain.log_nu, rtol=1e-6, atol=1e-6)
        assert torch.equal(cached.visited, plain.visited)
        assert float(cached.last_infonce) == pytest.approx(float(plain.last_infonce), rel=1e-6)
        with torch.no_grad():  # the same optimizer step on both copies
            for p, q in zip(model.parameters(), cached_model.parameters()):
                p -= 0.5 * p.grad
                q -= 0.5 * q.grad


def test_gradcache_with_the_trainers_loss_wrapper():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    wrapper = GlobalPairLoss(20, temperature=0.2, gamma=0.5)
    reference = GlobalInfoNCE(20, temperature=0.2, gamma=0.5)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        index = torch.randperm(20, generator=g)[:8]
        v1, v2 = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
        want = _plain_step(model, reference, v1, v2, index)
        model.zero_grad()
        GradCache(model, wrapper, chunk_size=3).step(v1, v2, batch=Batch(index, v1, v2), generator=g)
        for p, w in zip(model.parameters(), want):
            torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
    assert int(wrapper.loss.num_updates) == 2
    torch.testing.assert_close(wrapper.loss.log_nu, reference.log_nu)
