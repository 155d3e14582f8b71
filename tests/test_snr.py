import math

import pytest
import torch

from negbatch.diagnostics import GradientSNR


def hand_snr(grads, beta, eps):
    """Per-coordinate EMA with bias correction, in plain Python floats."""
    m = [0.0] * len(grads[0])
    v = [0.0] * len(grads[0])
    for g in grads:
        m = [beta * a + (1 - beta) * x for a, x in zip(m, g)]
        v = [beta * a + (1 - beta) * x * x for a, x in zip(v, g)]
    c = 1 - beta ** len(grads)
    out = []
    for a, b in zip(m, v):
        a, b = a / c, b / c
        out.append(abs(a) / math.sqrt(max(b - a * a, 0.0) + eps))
    return out


def test_snr_matches_hand_computation_on_a_toy_model():
    # Toy model: loss = 0.5 * (w . x - t)^2 on a fixed weight, so grad = (w . x - t) x by hand.
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    tracker = GradientSNR([w], beta=0.8, eps=1e-12)
    grads = []
    for step in range(6):
        x = torch.randn(3)
        t = float(torch.randn(()))
        w.grad = None
        (0.5 * (w @ x - t) ** 2).backward()
        r = sum(float(a) * float(b) for a, b in zip(w.detach(), x)) - t
        grads.append([r * float(xi) for xi in x])
        tracker.update()
    expected = hand_snr(grads, 0.8, 1e-12)
    assert tracker.snr().tolist() == pytest.approx(expected, rel=1e-4)
    s = tracker.summary()
    mean = sum(expected) / 3
    assert s["snr_mean"] == pytest.approx(mean, rel=1e-4)
    assert s["snr_std"] == pytest.approx(math.sqrt(sum((e - mean) ** 2 for e in expected) / 3), rel=1e-4)


def test_attach_hook_and_state_roundtrip():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = GradientSNR(model, beta=0.9)
    manual = GradientSNR(model, beta=0.9)
    handle = tracker.attach(opt)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        manual.update()
        opt.step()
    handle.remove()
    assert tracker.steps == 4 and torch.allclose(tracker.snr(), manual.snr())
    clone = GradientSNR(model, beta=0.9)
    clone.load_state_dict(tracker.state_dict())
    assert torch.equal(clone.snr(), tracker.snr())


def test_attached_under_an_fp16_grad_scaler_sees_unscaled_gradients_of_the_steps_taken():
    """The lab's order (backward, then the scaler's step): the hook runs after
    the scaler unscales, and not on a step it skips for inf gradients; the
    reference is the hand EMA of the unscaled gradients of the steps taken."""
    from negbatch.lab.precision import Precision

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=1e-3)
    precision = Precision("fp16", torch.device("cpu"))
    tracker = GradientSNR([w], beta=0.8, eps=1e-12)
    tracker.attach(opt)
    taken = []
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(3) * (300.0 if step == 2 else 0.01)  # only step 2 overflows in fp16: skipped
        with precision.autocast():
            loss = (w.half() @ x.half()).float() ** 2
        scale = precision.scaler.get_scale()
        precision.backward(loss)
        unscaled = (w.grad / scale).tolist()
        finite = bool(torch.isfinite(w.grad).all())
        precision.step(opt)
        if finite:
            taken.append(unscaled)
    assert len(taken) == 5 and tracker.steps == 5
    assert tracker.snr().tolist() == pytest.approx(hand_snr(taken, 0.8, 1e-12), rel=1e-3)


def test_constant_gradient_has_large_snr_and_noise_small():
    p = torch.nn.Parameter(torch.zeros(2))
    tracker = GradientSNR([p], beta=0.9, eps=1e-12)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p.grad = torch.stack([torch.tensor(1.0), torch.randn((), generator=g)])
        tracker.update()
    snr = tracker.snr()
    assert snr[0] > 1e4 and snr[1] < 2


def test_snr_errors():
    with pytest.raises(ValueError, match="beta"):
        GradientSNR(torch.nn.Linear(2, 2), beta=1.0)
    with pytest.raises(ValueError, match="requires_grad"):
        GradientSNR([torch.zeros(2)])
    with pytest.raises(RuntimeError, match="update"):
        GradientSNR(torch.nn.Linear(2, 2)).snr()


def _snr_of_stream(grads, beta=0.99):
    p = torch.nn.Parameter(torch.zeros(grads[0].shape))
    tracker = GradientSNR([p], beta=beta)
    for g in grads:
        p.grad = g.float()
        tracker.update()
    return tracker


def _ema_snr_float64(grads, beta=0.99):
    m = v = torch.zeros(grads[0].shape, dtype=torch.float64)
    for g in grads:
        g = g.float().double()
        m, v = beta * m + (1 - beta) * g, beta * v + (1 - beta) * g * g
    c = 1 - beta ** len(grads)
    return (m / c).abs() / (v / c - (m / c) ** 2).clamp_min(0).sqrt()


def test_snr_does_not_change_with_the_gradients_scale_and_is_right_at_high_snr():
    torch.manual_seed(0)
    stream = [1.0 + torch.randn(4, dtype=torch.float64) for _ in range(500)]
    want = _snr_of_stream(stream).summary()["snr_mean"]
    for scale in (1e-4, 1e-8):  # a loss scale, or a tiny learning signal (|g| ~ 1e-8)
        got = _snr_of_stream([scale * g for g in stream]).summary()["snr_mean"]
        assert got == pytest.approx(want, rel=1e-5)
    # SNR 10^4: the variance is 10^-8 of the second moment (float32 moments lose it).
    quiet = [1.0 + 1e-4 * torch.randn(3, dtype=torch.float64) for _ in range(500)]
    torch.testing.assert_close(_snr_of_stream(quiet).snr().double(), _ema_snr_float64(quiet), rtol=1e-3, atol=0)
    # A gradient that never moved: 1/sqrt(eps); one that was always zero: 0, not NaN.
    assert float(_snr_of_stream([torch.ones(2)] * 5).snr()[0]) == pytest.approx(1e6, rel=1e-2)
    assert _snr_of_stream([torch.zeros(2)] * 5).snr().tolist() == [0.0, 0.0]


def test_a_non_finite_gradient_is_skipped_not_folded_in():
    """One inf gradient used to leave the averages NaN for good; it is left
    out (as a GradScaler leaves out the step), with one warning, counted, and
    the result equals the stream without it."""
    torch.manual_seed(1)
    stream = [1.0 + torch.randn(3, dtype=torch.float64) for _ in range(50)]
    p = torch.nn.Parameter(torch.zeros(3))
    tracker = GradientSNR([p], beta=0.9)
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        for i, g in enumerate(stream):
            if i in (10, 20):
                p.grad = torch.tensor([float("inf"), 1.0, float("nan")])
                assert tracker.update() is False
            p.grad = g.float()
            assert tracker.update() is True
    assert tracker.skipped == 2 and tracker.steps == 50
    torch.testing.assert_close(tracker.snr().double(), _ema_snr_float64(stream, beta=0.9), rtol=1e-5, atol=0)
    restored = GradientSNR([p], beta=0.9)
    restored.load_state_dict(tracker.state_dict())
    assert restored.skipped == 2 and torch.equal(restored.snr(), tracker.snr())
    old = {k: v for k, v in tracker.state_dict().items() if k != "skipped"}  # a state saved before the count
    restored.load_state_dict(old)
    assert restored.skipped == 0 and torch.equal(restored.snr(), tracker.snr())
