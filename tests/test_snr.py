import contextlib
import io
import math
import warnings

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
    out (as a GradScaler leaves out the step), counted, with one warning when
    the result is read, and the result equals the stream without it."""
    torch.manual_seed(1)
    stream = [1.0 + torch.randn(3, dtype=torch.float64) for _ in range(50)]
    p = torch.nn.Parameter(torch.zeros(3))
    tracker = GradientSNR([p], beta=0.9)
    for i, g in enumerate(stream):
        if i in (10, 20):
            p.grad = torch.tensor([float("inf"), 1.0, float("nan")])
            assert not tracker.update()
        p.grad = g.float()
        assert tracker.update()
    assert tracker.skipped == 2 and tracker.steps == 50
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        got = tracker.snr()
    torch.testing.assert_close(got.double(), _ema_snr_float64(stream, beta=0.9), rtol=1e-5, atol=0)
    restored = GradientSNR([p], beta=0.9)
    restored.load_state_dict(tracker.state_dict())
    assert restored.skipped == 2 and torch.equal(restored.snr(), tracker.snr())
    old = {k: v for k, v in tracker.state_dict().items() if k != "skipped"}  # a state saved before the count
    restored.load_state_dict(old)
    assert restored.skipped == 0 and torch.equal(restored.snr(), tracker.snr())


@pytest.mark.parametrize("masked", [False, True])
def test_finite_gradients_whose_sum_overflows_are_folded_in_and_opposite_infs_are_not(masked):
    """On the CPU the finiteness test is a sum (one reduction) and, where that sum is not finite, the
    elementwise test: float64 gradients near 1e308 are all finite although their sum overflows, and
    inf and -inf in one gradient must not cancel."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    tracker = GradientSNR([p], beta=0.5)
    tracker._masked = masked
    p.grad = torch.tensor([1e308, 1e308, -1.0, 2.0], dtype=torch.float64)
    assert bool(tracker.update())
    assert torch.equal(tracker.m, p.grad * 0.5)  # folded in, bit for bit
    for bad in ([float("inf"), -float("inf"), 0.0, 0.0], [float("nan"), 1.0, 1.0, 1.0]):
        p.grad = torch.tensor(bad, dtype=torch.float64)
        assert not bool(tracker.update())
    assert (tracker.steps, tracker.skipped) == (1, 2)


# ---------------------------------------------------------------------------
# update() never reads a value back to the host (no device synchronisation)

_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def _host_reads_raise():
    """Every Python-level way of reading a tensor's value on the host raises
    inside the block (on a GPU each of them is a device synchronisation)."""
    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() read a value back to the host")
        return method

    with pytest.MonkeyPatch.context() as patch:
        for name in _HOST_READS:
            patch.setattr(torch.Tensor, name, refuse(name))
        with pytest.raises(AssertionError):  # the guard itself works
            bool(torch.ones(()))
        yield


def _grads_with_non_finite_steps(n=12, size=5, bad=(3, 7, 8)):
    g = torch.Generator().manual_seed(3)
    grads = [1.0 + torch.randn(size, generator=g) for _ in range(n)]
    for i in bad:
        grads[i] = grads[i].clone()
        grads[i][1] = float("nan")
        grads[i][3] = float("inf") if i % 2 else -float("inf")
    return grads


def test_update_reads_nothing_back_to_the_host():
    """The accelerators' masked path (forced here on CPU tensors; on the CPU itself a branch is cheaper)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    tracker = GradientSNR(model, beta=0.9)
    assert not tracker._masked  # the CPU's choice
    tracker._masked = True
    grads = _grads_with_non_finite_steps(size=sum(p.numel() for p in model.parameters()))
    with _host_reads_raise():
        for i, flat in enumerate(grads):
            chunks = flat.split([p.numel() for p in model.parameters()])
            for p, c in zip(model.parameters(), chunks):
                p.grad = c.reshape(p.shape).clone()
            if i == 5:
                model[1].bias.grad = None  # a missing gradient counts as zero
            tracker.update()
    assert tracker.steps == 9 and tracker.skipped == 3


@pytest.mark.cuda  # run by bench/gpu_check.sh (pytest -m cuda)
def test_update_does_not_synchronise_the_gpu():
    model = torch.nn.Linear(64, 32).cuda()
    tracker = GradientSNR(model, beta=0.9)
    model(torch.randn(16, 64, device="cuda")).square().mean().backward()
    bad = [p.grad.clone() for p in model.parameters()]
    bad[0][0, 0] = float("nan")
    torch.cuda.synchronize()
    good = [p.grad for p in model.parameters()]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for grads in (good, bad, good):
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            tracker.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tracker.steps == 2 and tracker.skipped == 1
    assert torch.isfinite(tracker.snr()).all()


def _plain_moments(grads, beta):
    """The unmasked update (the arithmetic update() did before it was masked)."""
    m = torch.zeros(grads[0].numel(), dtype=torch.float64)
    v = torch.zeros_like(m)
    for g in grads:
        g = g.reshape(-1).to(torch.float64)
        m.mul_(beta).add_(g, alpha=1 - beta)
        v.mul_(beta).addcmul_(g, g, value=1 - beta)
    return m, v


@pytest.mark.parametrize("masked", [False, True], ids=["cpu-branch", "masked"])
def test_a_skipped_step_leaves_every_statistic_bit_identical(masked):
    """A non-finite step is exactly no step (a NaN in a masked-out lane must
    not leak: 0 * NaN is NaN), and the finite steps are folded in with the
    plain arithmetic bit for bit, on both paths."""
    grads = _grads_with_non_finite_steps()
    finite = [g for g in grads if torch.isfinite(g).all()]
    p = torch.nn.Parameter(torch.zeros(5))
    with_bad, without = GradientSNR([p], beta=0.9), GradientSNR([p], beta=0.9)
    with_bad._masked = without._masked = masked
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # state_dict() reports the skipped steps
        for g in grads:
            p.grad = g
            before = with_bad.state_dict()
            folded = with_bad.update()
            assert isinstance(folded, torch.Tensor) and bool(folded) == bool(torch.isfinite(g).all())
            if not folded:
                after = with_bad.state_dict()
                assert torch.equal(after["m"], before["m"]) and torch.equal(after["v"], before["v"])
                assert after["steps"] == before["steps"] and after["skipped"] == before["skipped"] + 1
        for g in finite:
            p.grad = g
            without.update()
        a, b = with_bad.state_dict(), without.state_dict()
        m, v = _plain_moments(finite, 0.9)
        assert torch.equal(a["m"], b["m"]) and torch.equal(a["v"], b["v"]) and torch.equal(a["m"], m)
        assert torch.equal(a["v"], v) and torch.isfinite(a["m"]).all() and torch.isfinite(a["v"]).all()
        assert (a["steps"], a["skipped"], b["steps"], b["skipped"]) == (9, 3, 9, 0)
        assert torch.equal(with_bad.snr(), without.snr()) and with_bad.summary() == without.summary()


def test_the_skip_warning_comes_once_when_the_result_is_read():
    p = torch.nn.Parameter(torch.zeros(3))
    tracker = GradientSNR([p], beta=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # update() itself cannot warn: it does not know yet
        for g in ([1.0, 2.0, 3.0], [float("nan"), 1.0, 1.0], [2.0, 1.0, 0.5]):
            p.grad = torch.tensor(g)
            tracker.update()
    with pytest.warns(RuntimeWarning, match="NaN or inf") as caught:
        tracker.summary()
    assert len(caught) == 1 and "1 of 3" in str(caught[0].message) and caught[0].filename == __file__
    p.grad = torch.tensor([float("inf")] * 3)
    tracker.update()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per tracker
        tracker.snr(), tracker.summary(), tracker.state_dict()
    assert tracker.skipped == 2
    # state_dict() is a read too: a checkpoint taken before any summary warns.
    fresh = GradientSNR([p], beta=0.9)
    p.grad = torch.tensor([float("nan")] * 3)
    fresh.update()
    with pytest.warns(RuntimeWarning, match="NaN or inf") as caught:
        fresh.state_dict()
    assert len(caught) == 1 and caught[0].filename == __file__
    # Every update skipped: the SNR is refused, and the warning says why.
    none_folded = GradientSNR([p], beta=0.9)
    none_folded.update()
    with pytest.warns(RuntimeWarning, match="NaN or inf"), pytest.raises(RuntimeError, match="1 update skipped"):
        none_folded.snr()


def test_state_round_trip_through_torch_save_with_the_skipped_count():
    grads = _grads_with_non_finite_steps()
    p = torch.nn.Parameter(torch.zeros(5))
    tracker = GradientSNR([p], beta=0.9)
    for g in grads:
        p.grad = g
        tracker.update()
    buffer = io.BytesIO()
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        torch.save(tracker.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["steps"] == 9 and state["skipped"] == 3
    restored = GradientSNR([p], beta=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the saving tracker warned already
        restored.load_state_dict(state)
        assert restored.steps == 9 and restored.skipped == 3
        assert torch.equal(restored.snr(), tracker.snr())
        # and it goes on counting where it left off
        p.grad = grads[3]
        restored.update()
    assert restored.skipped == 4 and restored.steps == 9


def test_an_old_format_state_loads():
    """States saved before the skipped count (no "skipped"), and with it as a
    plain int (before the count lived on the device), load; so do counts
    saved as 0-dim tensors."""
    m = torch.tensor([0.5, -0.25, 0.0], dtype=torch.float64)
    v = torch.tensor([0.5, 0.125, 0.0], dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(3))
    for state, skipped in (({"steps": 4, "m": m, "v": v}, 0),
                           ({"steps": 4, "m": m, "v": v, "skipped": 2}, 2),
                           ({"steps": torch.tensor(4), "m": m, "v": v, "skipped": torch.tensor(2)}, 2)):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        tracker = GradientSNR([p], beta=0.5)
        tracker.load_state_dict(torch.load(buffer, weights_only=True))
        assert (tracker.steps, tracker.skipped) == (4, skipped)
        assert torch.equal(tracker.state_dict()["m"], m) and torch.equal(tracker.state_dict()["v"], v)
        c = 1 - 0.5**4
        assert tracker.snr()[0].item() == pytest.approx(abs(0.5 / c) / math.sqrt(0.5 / c - (0.5 / c) ** 2), rel=1e-6)


def test_load_state_dict_names_missing_entries():
    """A state without "steps" (an optimizer's state given by mistake, say) failed with a bare KeyError."""
    model = torch.nn.Linear(3, 2)
    snr = GradientSNR(model)
    with pytest.raises(ValueError, match=r"state is missing \['steps', 'v'\]; pass a dict made by GradientSNR"):
        snr.load_state_dict({"m": torch.zeros(8)})


def test_a_state_of_another_beta_is_refused_and_beta_must_be_a_number():
    # The moments average over 1/(1 - beta) steps: continued at another beta, the SNR mixes two windows.
    model = torch.nn.Linear(3, 2)
    saved = GradientSNR(model, beta=0.9)
    model(torch.randn(4, 3)).sum().backward()
    saved.update()
    state = saved.state_dict()
    assert state["beta"] == 0.9
    with pytest.raises(ValueError, match=r"saved with beta=0.9, this tracker has beta=0.99; create it with beta=0.9"):
        GradientSNR(model).load_state_dict(state)
    GradientSNR(model, beta=0.9).load_state_dict(state)
    GradientSNR(model).load_state_dict({k: v for k, v in state.items() if k != "beta"})  # saved before beta was
    with pytest.raises(ValueError, match=r"beta must be a float in \(0, 1\).*got '0.9'"):
        GradientSNR(model, beta="0.9")


def test_a_sparse_gradient_is_read_as_its_dense_values():
    """nn.Embedding(sparse=True) leaves a sparse .grad: update() failed with "reshape is not
    implemented for sparse tensors"; it now reads the same values as the dense embedding's."""
    torch.manual_seed(0)
    sparse, dense = torch.nn.Embedding(6, 3, sparse=True), torch.nn.Embedding(6, 3)
    dense.load_state_dict(sparse.state_dict())
    trackers = GradientSNR(sparse, beta=0.9), GradientSNR(dense, beta=0.9)
    for _ in range(4):
        ids = torch.randint(0, 6, (5,))
        for emb, tracker in zip((sparse, dense), trackers):
            emb.zero_grad(set_to_none=True)
            emb(ids).pow(2).sum().backward()
            tracker.update()
    assert sparse.weight.grad.is_sparse
    assert torch.equal(trackers[0].snr(), trackers[1].snr())


def test_a_parameter_listed_twice_is_watched_once():
    """Two encoders sharing a layer, their parameters chained: the shared ones were tracked twice,
    so snr() had extra entries and the summary weighted them double (a module's parameters() lists
    a shared parameter once, and so does the tracker now)."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 4)
    query, doc = torch.nn.Sequential(shared, torch.nn.Linear(4, 2)), torch.nn.Sequential(shared, torch.nn.Linear(4, 2))
    both = torch.nn.ModuleList([query, doc])
    chained, module = GradientSNR([*query.parameters(), *doc.parameters()], beta=0.9), GradientSNR(both, beta=0.9)
    for _ in range(5):
        both.zero_grad()
        x = torch.randn(8, 3)
        (query(x) * doc(x + 0.1 * torch.randn(8, 3))).sum().backward()
        chained.update()
        module.update()
    assert chained.snr().numel() == sum(p.numel() for p in both.parameters()) == 16 + 10 + 10
    assert torch.equal(chained.snr(), module.snr()) and chained.summary() == module.summary()


@pytest.mark.parametrize("eps", ["1e-12", None, float("inf"), float("nan"), -1.0, True])
def test_eps_must_be_a_finite_number_at_least_zero(eps):
    """eps="1e-12" (from a config file) failed with "'>=' not supported between instances of 'str'
    and 'int'", and eps=inf was accepted and made every SNR 0."""
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0 \(relative to the second moment"):
        GradientSNR(torch.nn.Linear(2, 2), eps=eps)
    GradientSNR(torch.nn.Linear(2, 2), eps=0)


def test_load_state_dict_checks_the_second_moment_too():
    """Only m's shape was checked: a v of one element was broadcast over every parameter, silently."""
    model = torch.nn.Linear(3, 2)
    saved = GradientSNR(model)
    model(torch.randn(4, 3)).sum().backward()
    saved.update()
    state = saved.state_dict()
    tracker = GradientSNR(model)
    for bad in (torch.ones(1, dtype=torch.float64), torch.ones(()), [0.0] * 8):
        with pytest.raises(ValueError, match=r"state\['v'\] must be a tensor of 8 moments"):
            tracker.load_state_dict({**state, "v": bad})
    assert tracker.v.eq(0).all()  # nothing was loaded
    tracker.load_state_dict(state)
    assert torch.equal(tracker.snr(), saved.snr())
