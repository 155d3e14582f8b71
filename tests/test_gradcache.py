"""GradCache against a plain forward/backward written here.

With dropout, a full-batch forward draws other masks than a chunked one, so
the reference encodes the same chunks in the same order from the same seed,
*with* a graph held for the whole batch, and back-propagates the loss once:
the plain step that gradient caching claims to reproduce with the memory of
one chunk. Without dropout the reference is a single full-batch forward.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from negbatch import GlobalInfoNCE, InfoNCE, ReLIC
from negbatch.gradcache import GradCache

from _dist import run_distributed


class MLP(nn.Module):
    def __init__(self, d_in=6, d_out=5, p=0.3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Dropout(p), nn.Linear(16, d_out))

    def forward(self, x):
        return self.net(x)


class DictEncoder(MLP):
    """Takes a tokenizer-like dict: ``encoder(values=..., weights=...)``."""

    def forward(self, values, weights):
        return self.net(values * weights)


def split_input(x, size):
    if isinstance(x, dict):
        parts = {k: v.split(size) for k, v in x.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(len(next(iter(parts.values()))))]
    return list(x.split(size))


def call(encoder, chunk):
    return encoder(**chunk) if isinstance(chunk, dict) else encoder(chunk)


def reference(encoders, loss_fn, inputs, chunk_sizes, seed, loss_kwargs=None, autocast=None, reshape_hard=False):
    """Plain step: encode chunk by chunk from ``seed`` keeping every graph, one
    loss, one backward. Returns (loss, embeddings, {param: grad})."""
    torch.manual_seed(seed)
    ctx = torch.autocast(**autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        reps = [
            torch.cat([call(enc, c) for c in split_input(x, size)])
            for enc, x, size in zip(encoders, inputs, chunk_sizes)
        ]
        args = list(reps)
        if reshape_hard:
            args[2] = args[2].reshape(args[0].shape[0], -1, args[2].shape[-1])
        loss = loss_fn(*args, **(loss_kwargs or {}))
    loss.backward()
    return loss.detach(), [r.detach() for r in reps], grads_of(encoders)


def grads_of(encoders):
    out = {}
    for enc in {id(e): e for e in encoders}.values():
        for name, p in enc.named_parameters():
            if p.requires_grad:
                out[(id(enc), name)] = p.grad.detach().clone()
        enc.zero_grad(set_to_none=True)
    return out


def assert_grads_close(got, want, atol, rtol=0.0):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=rtol, msg=f"gradient of {key[1]}")


def cached_grads(encoders, loss_fn, inputs, chunk_sizes, seed, loss_kwargs=None, **options):
    shared = all(e is encoders[0] for e in encoders)
    cache = GradCache(encoders[0] if shared else encoders, loss_fn, list(chunk_sizes), **options)
    torch.manual_seed(seed)
    loss, reps = cache.step(*inputs, return_embeddings=True, **(loss_kwargs or {}))
    return loss, list(reps), grads_of(encoders)


def make_views(b, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 6, generator=g, dtype=dtype), torch.randn(b, 6, generator=g, dtype=dtype)


def sample_mask(b, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, b, generator=g) < 0.15
    mask.fill_diagonal_(False)
    return mask


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# (name, loss, kwargs factory)
TWO_VIEW_LOSSES = [
    ("infonce_all", lambda: InfoNCE(temperature=0.3), lambda b: {}),
    ("infonce_K", lambda: InfoNCE(temperature=0.3, negatives=5), lambda b: {"generator": torch.Generator().manual_seed(7)}),
    ("infonce_mask", lambda: InfoNCE(temperature=0.3), lambda b: {"mask": sample_mask(b)}),
    ("relic_all", lambda: ReLIC(temperature=0.3, alpha=0.5), lambda b: {}),
    ("relic_K_mask", lambda: ReLIC(temperature=0.3, alpha=1.0, negatives=3),
     lambda b: {"generator": torch.Generator().manual_seed(3), "mask": sample_mask(b)}),
    ("user_callable", lambda: (lambda a, b: (a - b).pow(2).sum(1).mean() + torch.logsumexp(a @ b.t(), 1).mean()),
     lambda b: {}),
    ("global_all", lambda: primed_global(), lambda b: {"indices": torch.arange(3, 3 + b)}),
    ("global_K", lambda: primed_global(negatives=4),
     lambda b: {"indices": torch.arange(3, 3 + b), "generator": torch.Generator().manual_seed(5)}),
]


def primed_global(**kwargs):
    """A GlobalInfoNCE whose per-sample state was set by an earlier step (the
    step under test then mixes it with the batch's estimates)."""
    loss = GlobalInfoNCE(num_samples=20, temperature=0.3, gamma=0.5, **kwargs)
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g)
    loss(a, b, torch.arange(20), generator=torch.Generator().manual_seed(2))
    return loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [3, 5, 1, 10, 64])
@pytest.mark.parametrize("name,make_loss,make_kwargs", TWO_VIEW_LOSSES, ids=[c[0] for c in TWO_VIEW_LOSSES])
def test_shared_encoder_two_view_matches_plain_step(dtype, chunk, name, make_loss, make_kwargs):
    torch.manual_seed(0)
    enc = MLP().to(dtype)
    b = 10
    views = make_views(b, dtype)
    want_loss, want_reps, want = reference([enc, enc], make_loss(), views, [chunk, chunk], 11, make_kwargs(b))
    got_loss, got_reps, got = cached_grads([enc, enc], make_loss(), views, [chunk, chunk], 11, make_kwargs(b))
    assert_grads_close(got, want, TOL[dtype])
    torch.testing.assert_close(got_loss, want_loss, atol=TOL[dtype], rtol=0)
    for g, w in zip(got_reps, want_reps):
        torch.testing.assert_close(g, w, atol=TOL[dtype], rtol=0)


def test_reference_is_sensitive_to_dropout_masks():
    """The comparison can fail: another seed (other dropout masks) gives another gradient."""
    torch.manual_seed(0)
    enc = MLP().double()
    views = make_views(10, torch.float64)
    _, _, a = reference([enc, enc], InfoNCE(temperature=0.3), views, [3, 3], 11)
    _, _, b = cached_grads([enc, enc], InfoNCE(temperature=0.3), views, [3, 3], 12)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4


def test_without_dropout_equals_single_full_batch_forward():
    torch.manual_seed(0)
    enc = MLP(p=0.0).double()
    views = make_views(11, torch.float64)
    loss_fn = InfoNCE(temperature=0.2)
    loss = loss_fn(enc(views[0]), enc(views[1]))
    loss.backward()
    want = grads_of([enc])
    _, _, got = cached_grads([enc, enc], loss_fn, views, [4, 4], 0)
    assert_grads_close(got, want, 1e-10)


def make_qd(b, h, dtype, dict_input):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(b, 6, generator=g, dtype=dtype)
    d = torch.randn(b, 6, generator=g, dtype=dtype)
    hard = torch.randn(b * h, 6, generator=g, dtype=dtype)
    if dict_input:
        w = lambda n: torch.rand(n, 6, generator=g, dtype=dtype)  # noqa: E731
        q, d, hard = ({"values": x, "weights": w(x.shape[0])} for x in (q, d, hard))
    return q, d, hard


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dict_input", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("negatives", ["all", 4])
@pytest.mark.parametrize("keep_last", [False, True])
def test_two_towers_query_document_with_hard_negatives(dtype, dict_input, symmetric, negatives, keep_last):
    torch.manual_seed(0)
    cls = DictEncoder if dict_input else MLP
    q_enc, d_enc = cls().to(dtype), cls().to(dtype)
    b, h = 7, 2
    q, d, hard = make_qd(b, h, dtype, dict_input)
    make_loss = lambda: InfoNCE(temperature=0.2, negatives=negatives, form="query_document", symmetric=symmetric)  # noqa: E731
    kwargs = lambda: {"generator": torch.Generator().manual_seed(1)} if negatives != "all" else {}  # noqa: E731
    encoders, sizes = [q_enc, d_enc, d_enc], [3, 4, 5]
    want_loss, _, want = reference(encoders, make_loss(), (q, d, hard), sizes, 2, kwargs(), reshape_hard=True)
    got_loss, _, got = cached_grads(
        encoders, make_loss(), (q, d, hard), sizes, 2, kwargs(), keep_last_graph=keep_last
    )
    assert_grads_close(got, want, TOL[dtype])
    torch.testing.assert_close(got_loss, want_loss, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("chunk", [4, 5])
def test_keep_last_graph_shared_encoder(chunk):
    torch.manual_seed(0)
    enc = MLP().double()
    views = make_views(10, torch.float64)
    _, _, want = reference([enc, enc], ReLIC(temperature=0.3), views, [chunk, chunk], 4)
    _, _, got = cached_grads([enc, enc], ReLIC(temperature=0.3), views, [chunk, chunk], 4, keep_last_graph=True)
    assert_grads_close(got, want, 1e-10)


def test_list_input_passes_positional_arguments():
    class Two(MLP):
        def forward(self, x, y):
            return self.net(x + y)

    torch.manual_seed(0)
    enc = Two().double()
    a, b = make_views(9, torch.float64)
    c, d = make_views(9, torch.float64, seed=3)
    loss_fn = InfoNCE(temperature=0.5)
    torch.manual_seed(1)
    ref = loss_fn(torch.cat([enc(x, y) for x, y in zip(a.split(4), b.split(4))]),
                  torch.cat([enc(x, y) for x, y in zip(c.split(4), d.split(4))]))
    ref.backward()
    want = grads_of([enc])
    torch.manual_seed(1)
    GradCache(enc, loss_fn, 4).step([a, b], (c, d))
    assert_grads_close(grads_of([enc]), want, 1e-10)


class FeaturesAndScale(MLP):
    """``encoder(features, scale)``: a dict of tensors and a tensor, positionally."""

    def forward(self, features, scale):
        return self.net(features["values"] * features["weights"] * scale)


@pytest.mark.parametrize("keep_last", [False, True])
def test_list_input_holding_a_dict_and_a_tensor(keep_last):
    torch.manual_seed(0)
    enc = FeaturesAndScale().double()
    g = torch.Generator().manual_seed(4)

    def make():
        features = {"values": torch.randn(10, 6, generator=g, dtype=torch.float64),
                    "weights": torch.rand(10, 6, generator=g, dtype=torch.float64)}
        return [features, torch.rand(10, 1, generator=g, dtype=torch.float64)]

    a, b = make(), make()
    torch.manual_seed(2)
    reps = [torch.cat([enc({k: v[i:i + 4] for k, v in x[0].items()}, x[1][i:i + 4]) for i in range(0, 10, 4)])
            for x in (a, b)]
    InfoNCE(temperature=0.3)(*reps).backward()
    want = grads_of([enc])
    torch.manual_seed(2)
    GradCache(enc, InfoNCE(temperature=0.3), 4, keep_last_graph=keep_last).step(a, b)
    assert_grads_close(grads_of([enc]), want, 1e-10)
    with pytest.raises(ValueError, match=r"input 0\[0\]\['values'\]"):
        bad = [{"values": a[0]["values"][:9], "weights": a[0]["weights"]}, a[1]]
        GradCache(enc, InfoNCE(temperature=0.3), 4, paired=False).step(bad, b)


def test_cpu_autocast_bfloat16():
    torch.manual_seed(0)
    enc = MLP()
    views = make_views(12, torch.float32)
    amp = {"device_type": "cpu", "dtype": torch.bfloat16}
    want_loss, _, want = reference([enc, enc], InfoNCE(temperature=0.3), views, [5, 5], 3, autocast=amp)
    got_loss, reps, got = cached_grads([enc, enc], InfoNCE(temperature=0.3), views, [5, 5], 3, autocast=amp)
    assert reps[0].dtype == torch.bfloat16  # the passes really ran under autocast
    assert_grads_close(got, want, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(got_loss.float(), want_loss.float(), atol=1e-2, rtol=1e-2)


def test_grad_scaler_scale_applied_exactly_once_on_cpu():
    # The CUDA test below checks fp16; this one runs everywhere. Powers of two scale
    # exactly, so the scaled gradients equal the plain step's times the scale.
    scale = 2.0**10
    torch.manual_seed(0)
    enc = MLP().double()
    views = make_views(12, torch.float64)
    want_loss, _, want = reference([enc, enc], InfoNCE(temperature=0.3), views, [5, 5], 3)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    got_loss, _, got = cached_grads([enc, enc], InfoNCE(temperature=0.3), views, [5, 5], 3, scaler=scaler)
    assert_grads_close(got, {k: v * scale for k, v in want.items()}, 1e-10 * scale)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-12, rtol=0)  # the true loss, not the scaled one
    # The usual recipe then unscales once: scaler.step(optimizer) sees the plain gradients.
    opt = torch.optim.SGD(enc.parameters(), lr=1.0)
    torch.manual_seed(3)
    GradCache(enc, InfoNCE(temperature=0.3), 5, scaler=scaler).step(*views)
    scaler.unscale_(opt)
    unscaled = {(id(enc), n): p.grad for n, p in enc.named_parameters()}
    assert_grads_close(unscaled, want, 1e-10)


@pytest.mark.parametrize("ambient", [False, True])
def test_cpu_autocast_bfloat16_equals_a_plain_step_with_one_region_per_chunk(ambient):
    # One autocast region per chunk caches its own bf16 weight copies, as GradCache's
    # passes do; then the two agree to float32 rounding (the looser test above compares
    # with a single region, whose cached weight copy sums the gradients in bf16).
    torch.manual_seed(0)
    enc = MLP()
    views = make_views(12, torch.float32)
    amp = {"device_type": "cpu", "dtype": torch.bfloat16}

    def chunk_forward(c):
        with torch.autocast(**amp):
            return enc(c)

    torch.manual_seed(3)
    reps = [torch.cat([chunk_forward(c) for c in x.split(5)]) for x in views]
    with torch.autocast(**amp):
        InfoNCE(temperature=0.3)(*reps).backward()
    want = grads_of([enc])
    torch.manual_seed(3)
    if ambient:
        with torch.autocast(**amp):
            GradCache(enc, InfoNCE(temperature=0.3), 5).step(*views)
    else:
        GradCache(enc, InfoNCE(temperature=0.3), 5, autocast=amp).step(*views)
    assert_grads_close(grads_of([enc]), want, atol=1e-6)


def test_ambient_autocast_region_is_honoured():
    torch.manual_seed(0)
    enc = MLP()
    views = make_views(12, torch.float32)
    cache = GradCache(enc, InfoNCE(temperature=0.3), 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, reps = cache.step(*views, return_embeddings=True)
    assert reps[0].dtype == torch.bfloat16


def test_gradient_accumulation_and_clipping():
    torch.manual_seed(0)
    enc = MLP().double()
    v1, v2 = make_views(10, torch.float64), make_views(10, torch.float64, seed=9)
    # Plain: two steps accumulated, then clipped.
    torch.manual_seed(5)
    for views in (v1, v2):
        InfoNCE(temperature=0.3)(*[torch.cat([enc(c) for c in x.split(3)]) for x in views]).backward()
    norm_want = torch.nn.utils.clip_grad_norm_(enc.parameters(), 0.05)
    want = grads_of([enc])
    cache = GradCache(enc, InfoNCE(temperature=0.3), 3)
    torch.manual_seed(5)
    cache.step(*v1)
    cache.step(*v2)
    norm_got = torch.nn.utils.clip_grad_norm_(enc.parameters(), 0.05)
    assert norm_want > 0.05  # the clipping did something
    torch.testing.assert_close(norm_got, norm_want, atol=1e-10, rtol=0)
    assert_grads_close(grads_of([enc]), want, 1e-10)


def test_rng_stream_left_where_a_plain_step_leaves_it():
    torch.manual_seed(0)
    enc = MLP().double()
    views = make_views(10, torch.float64)
    reference([enc, enc], InfoNCE(temperature=0.3), views, [3, 3], 8)
    after_plain = torch.rand(3)
    cached_grads([enc, enc], InfoNCE(temperature=0.3), views, [3, 3], 8)
    torch.testing.assert_close(torch.rand(3), after_plain)


def test_an_encoder_on_a_device_without_replay_is_warned_once():
    """Random numbers are replayed on CPU and CUDA; on any other device (MPS,
    XPU; here the meta device stands in) a training-mode encoder gets a warning."""
    from negbatch.gradcache import _warn_unreplayed_devices

    elsewhere = nn.Linear(3, 2, device="meta")
    chunk = torch.empty(4, 3, device="meta")
    with pytest.warns(UserWarning, match="replays the random numbers of CPU and CUDA only; this encoder runs on meta"):
        _warn_unreplayed_devices(elsewhere, chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_unreplayed_devices(elsewhere, chunk)  # once per encoder
        _warn_unreplayed_devices(nn.Linear(3, 2, device="meta").eval(), chunk)  # eval: nothing random
        _warn_unreplayed_devices(nn.Linear(3, 2), torch.zeros(4, 3))  # CPU: replayed


class BNEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x)


def test_batchnorm_warns_once_and_updates_running_stats_once_per_chunk():
    torch.manual_seed(0)
    enc, twin = BNEncoder().double(), BNEncoder().double()
    twin.load_state_dict(enc.state_dict())
    views = make_views(10, torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # only our own bookkeeping can keep it to one
        GradCache(enc, InfoNCE(temperature=0.3), 4).step(*views)
        GradCache(enc, InfoNCE(temperature=0.3), 4).step(*views)  # the lab builds a new cache every step
    assert [str(w.message)[:40] for w in caught] == [str(caught[0].message)[:40]]
    assert "BatchNorm" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's line, not into the library
    with torch.no_grad():  # the plain chunked forward, twice
        for _ in range(2):
            for x in views:
                for c in x.split(4):
                    twin(c)
    bn, bn_twin = enc.net[1], twin.net[1]
    torch.testing.assert_close(bn.running_mean, bn_twin.running_mean)
    torch.testing.assert_close(bn.running_var, bn_twin.running_var)
    assert int(bn.num_batches_tracked) == int(bn_twin.num_batches_tracked) == 12


def test_batchnorm_eval_policy_is_exact_and_error_policy_raises():
    torch.manual_seed(0)
    enc = BNEncoder().double()
    views = make_views(10, torch.float64)
    enc.eval()
    InfoNCE(temperature=0.3)(enc(views[0]), enc(views[1])).backward()
    want = grads_of([enc])
    enc.train()
    before = enc.net[1].running_mean.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradCache(enc, InfoNCE(temperature=0.3), 3, batchnorm="eval").step(*views)
    assert enc.net[1].training  # restored
    torch.testing.assert_close(enc.net[1].running_mean, before)
    assert_grads_close(grads_of([enc]), want, 1e-10)
    with pytest.raises(ValueError, match="BatchNorm"):
        GradCache(enc, InfoNCE(temperature=0.3), 3, batchnorm="error").step(*views)


def test_step_by_step_api():
    """The three steps give the plain step's gradient, and refuse to run twice on
    one batch: a second backward_chunks added its gradient again (.grad doubled,
    silently), and a second representation_gradients ran a stateful loss twice;
    plain autograd refuses a second backward too."""
    torch.manual_seed(0)
    enc = MLP().double()
    views = make_views(10, torch.float64)
    _, _, want = reference([enc, enc], InfoNCE(temperature=0.3), views, [4, 4], 1)
    cache = GradCache(enc, InfoNCE(temperature=0.3), 4)
    torch.manual_seed(1)
    cached = cache.forward_no_grad(*views)
    assert all(p.grad is None for p in enc.parameters())
    cache.representation_gradients(cached)
    assert all(p.grad is None for p in enc.parameters())
    with pytest.raises(RuntimeError, match="representation_gradients.*already ran"):
        cache.representation_gradients(cached)
    cache.backward_chunks(cached)
    with pytest.raises(RuntimeError, match="backward_chunks.*already ran"):
        cache.backward_chunks(cached)
    with pytest.raises(RuntimeError, match="representation_gradients.*already ran"):
        cache.representation_gradients(cached)
    assert_grads_close(grads_of([enc]), want, 1e-10)  # the batch's gradient, once

    state = GlobalInfoNCE(10, temperature=0.3, gamma=0.9)
    cached = GradCache(enc, state, 4).forward_no_grad(*views)
    GradCache(enc, state, 4).representation_gradients(cached, indices=torch.arange(10))
    with pytest.raises(RuntimeError, match="already ran"):
        GradCache(enc, state, 4).representation_gradients(cached, indices=torch.arange(10))
    assert int(state.num_updates) == 1

@pytest.mark.parametrize("keep_last", [False, True])
def test_weights_or_inputs_changed_between_the_passes_are_refused(keep_last):
    """An optimizer step (or a refilled input buffer) between forward_no_grad and
    backward_chunks made the second pass re-encode with other weights or data: the
    gradient was silently another one (the first-pass cache no longer matches)."""
    torch.manual_seed(0)
    enc = MLP(p=0.0).double()
    views = make_views(10, torch.float64)
    cache = GradCache(enc, InfoNCE(temperature=0.3), 4, keep_last_graph=keep_last)
    optimizer = torch.optim.SGD(enc.parameters(), lr=0.5)
    cached = cache.forward_no_grad(*views)
    for p in enc.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    cache.representation_gradients(cached)
    with pytest.raises(RuntimeError, match="parameter 'net.0.weight' was modified in place after forward_no_grad"):
        cache.backward_chunks(cached)
    assert all(p.grad is None for p in enc.parameters())
    cached = cache.forward_no_grad(*views)
    views[1].mul_(2.0)  # a loader that reuses its buffer
    cache.representation_gradients(cached)
    with pytest.raises(RuntimeError, match=r"input 1 \(an input\) was modified in place"):
        cache.backward_chunks(cached)
    # Unchanged weights and inputs: the steps one by one still run.
    cached = cache.forward_no_grad(*views)
    cache.representation_gradients(cached)
    cache.backward_chunks(cached)


def test_a_batch_finished_by_another_cache_keeps_its_own_chunks():
    """backward_chunks sliced the cached gradients by its own cache's chunk size, not
    the batch's: a batch encoded with chunk 3 and finished by a cache with chunk 4
    failed with "the encoder must be deterministic given its RNG", which it was."""
    torch.manual_seed(0)
    enc = MLP().double()
    views = make_views(10, torch.float64)
    _, _, want = reference([enc, enc], InfoNCE(temperature=0.3), views, [3, 3], 1)
    torch.manual_seed(1)
    cached = GradCache(enc, InfoNCE(temperature=0.3), 3).forward_no_grad(*views)
    other = GradCache(enc, InfoNCE(temperature=0.3), 4)
    other.representation_gradients(cached)
    other.backward_chunks(cached)
    assert_grads_close(grads_of([enc]), want, 1e-10)


def test_frozen_tower_gets_no_second_forward():
    torch.manual_seed(0)
    q_enc, d_enc = MLP().double(), MLP().double()
    d_enc.requires_grad_(False)
    calls = []
    d_enc.register_forward_hook(lambda *a: calls.append(1))
    q, d, _ = make_qd(8, 1, torch.float64, False)
    loss_fn = InfoNCE(temperature=0.2, form="query_document")
    _, _, want = reference([q_enc, d_enc], loss_fn, (q, d), [3, 3], 1)
    calls.clear()
    _, _, got = cached_grads([q_enc, d_enc], loss_fn, (q, d), [3, 3], 1, keep_last_graph=True)
    assert len(calls) == 3  # first pass only
    assert_grads_close(got, want, 1e-10)


class LearnedTemperature(nn.Module):
    """A loss with its own trainable tensor (CLIP's logit scale)."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, a, b):
        logits = a @ b.t() * self.log_scale.exp()
        return torch.nn.functional.cross_entropy(logits, torch.arange(a.shape[0]))


def test_a_loss_with_trainable_parameters_gets_its_gradient_once():
    torch.manual_seed(0)
    enc, loss_fn = MLP().double(), LearnedTemperature()
    views = make_views(10, torch.float64)
    _, _, want = reference([enc, enc], loss_fn, views, [4, 4], 2)
    want_scale = loss_fn.log_scale.grad.clone()
    loss_fn.zero_grad(set_to_none=True)
    _, _, got = cached_grads([enc, enc], loss_fn, views, [4, 4], 2)
    assert_grads_close(got, want, 1e-10)
    torch.testing.assert_close(loss_fn.log_scale.grad, want_scale, atol=1e-10, rtol=0)


@pytest.mark.parametrize("encoder", ["frozen", "identity"])
def test_inputs_that_require_grad_get_it_through_a_frozen_encoder(encoder):
    torch.manual_seed(0)
    enc = MLP().double().requires_grad_(False) if encoder == "frozen" else nn.Identity()
    views = [v.requires_grad_() for v in make_views(10, torch.float64)]
    reference([enc, enc], InfoNCE(temperature=0.3), views, [4, 4], 2)
    want = [v.grad.clone() for v in views]
    for v in views:
        v.grad = None
    cached_grads([enc, enc], InfoNCE(temperature=0.3), views, [4, 4], 2)
    for v, w in zip(views, want):
        torch.testing.assert_close(v.grad, w, atol=1e-10, rtol=0)


@pytest.mark.parametrize("keep_last", [False, True])
def test_inputs_on_an_upstream_graph_back_propagate_through_it(keep_last):
    # The inputs are outputs of a trainable module: every chunk's backward passes
    # through the same upstream graph, which must survive until the last one.
    torch.manual_seed(0)
    enc, upstream = MLP().double(), nn.Linear(6, 6).double()
    raw = make_views(10, torch.float64)
    reference([enc, enc], InfoNCE(temperature=0.3), [upstream(x) for x in raw], [4, 4], 2)
    want = {**grads_of([upstream])}
    enc.zero_grad(set_to_none=True)
    cached_grads([enc, enc], InfoNCE(temperature=0.3), [upstream(x) for x in raw], [4, 4], 2, keep_last_graph=keep_last)
    assert_grads_close(grads_of([upstream]), want, 1e-10)


@pytest.mark.parametrize("head_kind", ["module", "function"])
def test_a_trainable_output_fn_on_a_frozen_backbone_is_trained(head_kind):
    torch.manual_seed(0)
    backbone = MLP(d_out=8).double().requires_grad_(False)
    head = nn.Linear(8, 4).double()
    output_fn = head if head_kind == "module" else (lambda out: head(out))
    views = make_views(10, torch.float64)
    torch.manual_seed(2)
    reps = [torch.cat([head(backbone(c)) for c in x.split(4)]) for x in views]
    InfoNCE(temperature=0.3)(*reps).backward()
    want = grads_of([head])
    cache = GradCache(backbone, InfoNCE(temperature=0.3), 4, output_fn=output_fn)
    torch.manual_seed(2)
    cache.step(*views)
    assert_grads_close(grads_of([head]), want, 1e-10)


def test_a_frozen_target_whose_embeddings_the_loss_detaches_is_accepted():
    # BYOL/distillation: the teacher is frozen and its embeddings are constants.
    torch.manual_seed(0)
    student, teacher = MLP().double(), MLP().double().requires_grad_(False)
    x = make_views(10, torch.float64)[0]

    def loss_fn(s, t):
        return (torch.nn.functional.normalize(s, dim=1) - torch.nn.functional.normalize(t.detach(), dim=1)).pow(2).mean()

    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    _, _, want = reference([student, teacher], loss_fn, [x, x], [4, 4], 3)
    calls.clear()
    _, _, got = cached_grads([student, teacher], loss_fn, [x, x], [4, 4], 3)
    assert_grads_close(got, want, 1e-10)
    assert len(calls) == 3  # the teacher is encoded once


def test_global_infonce_query_document_with_hard_negatives():
    torch.manual_seed(0)
    q_enc, d_enc = MLP().double(), MLP().double()
    q, d, h = make_qd(6, 2, torch.float64, False)
    idx = torch.arange(6)

    def plain(loss_fn):
        torch.manual_seed(5)
        reps = [torch.cat([e(c) for c in x.split(4)]) for e, x in ((q_enc, q), (d_enc, d), (d_enc, h))]
        loss_fn(reps[0], reps[1], idx, reps[2].reshape(6, 2, -1)).backward()
        return grads_of([q_enc, d_enc])

    want = plain(GlobalInfoNCE(num_samples=6, temperature=0.3, form="query_document"))
    cache = GradCache([q_enc, d_enc, d_enc], GlobalInfoNCE(num_samples=6, temperature=0.3, form="query_document"), 4)
    torch.manual_seed(5)
    cache.step(q, d, h, indices=idx)
    assert_grads_close(grads_of([q_enc, d_enc]), want, 1e-10)


def test_hard_negatives_follow_the_loss_signature_not_its_class():
    """A user's loss with a ``hard_negatives`` parameter gets the third input as
    GradCache gives it to InfoNCE: by keyword, shaped (B, H, d); with
    ``hard_negatives=False`` it comes positionally, as encoded."""
    torch.manual_seed(0)
    q_enc, d_enc = MLP().double(), MLP().double()
    q, d, h = make_qd(6, 2, torch.float64, False)
    encoders, sizes = [q_enc, d_enc, d_enc], [4, 4, 4]
    shapes = []

    def my_loss(queries, documents, hard_negatives=None):
        shapes.append(tuple(hard_negatives.shape))
        return InfoNCE(temperature=0.3, form="query_document")(queries, documents, hard_negatives)

    want_loss, _, want = reference(encoders, my_loss, (q, d, h), sizes, 2, reshape_hard=True)
    got_loss, _, got = cached_grads(encoders, my_loss, (q, d, h), sizes, 2)
    assert shapes == [(6, 2, 5), (6, 2, 5)]
    assert_grads_close(got, want, 1e-10)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-10, rtol=0)

    def flat_loss(queries, documents, hard_negatives):
        shapes.append(tuple(hard_negatives.shape))
        return my_loss(queries, documents, hard_negatives.reshape(6, 2, -1))

    cached_grads(encoders, flat_loss, (q, d, h), sizes, 2, hard_negatives=False)
    assert shapes[-2] == (12, 5)
    assert GradCache(q_enc, InfoNCE(form="query_document"), 4).hard_negatives
    assert not GradCache(q_enc, ReLIC(), 4).hard_negatives
    assert not GradCache(q_enc, lambda a, b, **kwargs: a.sum(), 4).hard_negatives
    with pytest.raises(ValueError, match="takes no such keyword"):
        GradCache(q_enc, ReLIC(), 4, hard_negatives=True)
    with pytest.raises(TypeError, match="hard_negatives must be True, False or None"):
        GradCache(q_enc, InfoNCE(), 4, hard_negatives="yes")


# ---------------------------------------------------------------- bad input


def test_bad_chunk_sizes():
    enc = MLP()
    for bad in (0, -2):
        with pytest.raises(ValueError, match="chunk_size"):
            GradCache(enc, InfoNCE(), bad)
    for bad in (2.5, True, "4"):
        with pytest.raises(TypeError, match="chunk_size"):
            GradCache(enc, InfoNCE(), bad)
    with pytest.raises(TypeError, match=r"got '64'"):  # not "got '6'": a string is not one size per character
        GradCache(enc, InfoNCE(), "64")
    assert GradCache(enc, InfoNCE(), np.int64(4)).chunk_sizes == [4]
    with pytest.raises(ValueError, match="one chunk_size per encoder"):
        GradCache([enc, enc], InfoNCE(), [2, 3, 4])
    with pytest.raises(ValueError, match="chunk_size"):
        GradCache(enc, InfoNCE(), [2, 0])


def test_unpaired_batches_rejected_before_any_forward():
    enc = MLP()
    calls = []
    enc.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="batch lengths 8 and 6"):
        GradCache(enc, InfoNCE(), 4).step(torch.randn(8, 6), torch.randn(6, 6))
    assert not calls
    with pytest.raises(ValueError, match="multiple"):
        GradCache([enc, enc, enc], InfoNCE(form="query_document"), 4).step(
            torch.randn(4, 6), torch.randn(4, 6), torch.randn(7, 6)
        )
    with pytest.raises(ValueError, match="batch length"):
        GradCache(enc, InfoNCE(), 4).step({"x": torch.randn(4, 6), "y": torch.randn(3, 6)}, torch.randn(4, 6))


def test_bad_losses():
    enc = MLP()
    views = make_views(6, torch.float32)
    with pytest.raises(ValueError, match="scalar"):
        GradCache(enc, InfoNCE(reduction="none"), 4).step(*views)
    with pytest.raises(ValueError, match="no gradient"):
        GradCache(enc, lambda a, b: torch.tensor(1.0), 4).step(*views)
    with pytest.raises(ValueError, match="no gradient"):
        GradCache(enc, lambda a, b: (a.detach() * b.detach()).sum(), 4).step(*views)
    with pytest.raises(ValueError, match="input 1"):
        GradCache(enc, lambda a, b: a.sum(), 4).step(*views)
    with pytest.raises(TypeError, match="tensor"):
        GradCache(enc, lambda a, b: 1.0, 4).step(*views)


def test_no_grad_region_is_refused_before_any_forward():
    enc = MLP()
    calls = []
    enc.register_forward_hook(lambda *a: calls.append(1))
    for region in (torch.no_grad, torch.inference_mode):
        with region(), pytest.raises(RuntimeError, match="autograd"):
            GradCache(enc, InfoNCE(), 4).step(*make_views(8, torch.float32))
    assert not calls


def test_batchnorm_chunk_of_one_row_and_untracked_statistics():
    enc = BNEncoder().double()
    views = make_views(10, torch.float64)
    with pytest.raises(ValueError, match="chunk_size"):
        GradCache(enc, InfoNCE(temperature=0.3), 3).step(*views)  # 10 = 3 + 3 + 3 + 1
    GradCache(enc, InfoNCE(temperature=0.3), 3, batchnorm="eval").step(*views)  # running statistics: fine
    untracked = BNEncoder().double()
    untracked.net[1] = nn.BatchNorm1d(8, track_running_stats=False).double()
    untracked.eval()  # without running statistics it still normalises by each chunk
    with pytest.raises(ValueError, match="track_running_stats"):
        GradCache(untracked, InfoNCE(temperature=0.3), 4, batchnorm="eval").step(*views)
    with pytest.raises(ValueError, match="BatchNorm"):
        GradCache(untracked, InfoNCE(temperature=0.3), 4, batchnorm="error").step(*views)


def test_bad_encoders_and_inputs():
    with pytest.raises(TypeError, match="encoders"):
        GradCache([], InfoNCE(), 4)
    with pytest.raises(TypeError, match="loss_fn"):
        GradCache(MLP(), "infonce", 4)
    with pytest.raises(ValueError, match="one input per encoder"):
        GradCache([MLP(), MLP()], InfoNCE(), 4).step(torch.randn(4, 6))
    with pytest.raises(TypeError, match="dict of tensors"):
        GradCache(MLP(), InfoNCE(), 4).step("text", torch.randn(4, 6))

    class TupleOut(MLP):
        def forward(self, x):
            return (self.net(x), x)

    with pytest.raises(TypeError, match="output_fn"):
        GradCache(TupleOut(), InfoNCE(), 4).step(*make_views(4, torch.float32))
    GradCache(TupleOut(), InfoNCE(), 4, output_fn=lambda out: out[0]).step(*make_views(4, torch.float32))


# ---------------------------------------------------------------- distributed


def _ddp_worker(rank, world_size, out_dir):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    dtype = torch.float64
    b_local = 5
    g = torch.Generator().manual_seed(0)
    global_q = torch.randn(world_size * b_local, 6, generator=g, dtype=dtype)
    global_d = torch.randn(world_size * b_local, 6, generator=g, dtype=dtype)
    rows = slice(rank * b_local, (rank + 1) * b_local)
    results = {}
    for case in ("shared_all", "shared_K_keep", "towers_symmetric", "towers_keep", "shared_relic_K", "shared_global"):
        torch.manual_seed(0)
        towers = case.startswith("towers")
        q_enc, d_enc = MLP().to(dtype), MLP().to(dtype)
        if towers:
            loss_fn = InfoNCE(temperature=0.3, form="query_document", symmetric=True, gather=True)
            ref_loss = InfoNCE(temperature=0.3, form="query_document", symmetric=True)
            wrapped = [DDP(q_enc), DDP(d_enc)]
            encoders, plain = wrapped, [q_enc, d_enc]
        else:
            negatives = 4 if "K" in case else "all"
            if "relic" in case:
                loss_fn, ref_loss = ReLIC(temperature=0.3, alpha=0.5, negatives=negatives, gather=True), ReLIC(temperature=0.3, alpha=0.5, negatives=negatives)
            elif "global" in case:
                loss_fn = GlobalInfoNCE(world_size * b_local, temperature=0.3, gather=True).double()
                ref_loss = GlobalInfoNCE(world_size * b_local, temperature=0.3, sync_state=False).double()
            else:
                loss_fn, ref_loss = InfoNCE(temperature=0.3, negatives=negatives, gather=True), InfoNCE(temperature=0.3, negatives=negatives)
            wrapped = DDP(q_enc)
            encoders, plain = wrapped, [q_enc, q_enc]
        def kwargs(global_rows=False):
            out = {"generator": torch.Generator().manual_seed(3)} if "K" in case else {}
            if "global" in case:
                out["indices"] = torch.arange(world_size * b_local) if global_rows else torch.arange(b_local) + rank * b_local
            return out

        # Count the gradient all-reduces of each DDP module (one bucket each: these
        # MLPs are far below DDP's bucket size): no_sync must leave exactly one.
        all_reduces = {}
        for name, module in zip("qd", wrapped if towers else [wrapped]):
            all_reduces[name] = 0

            def counting(state, bucket, name=name):
                all_reduces[name] += 1
                return allreduce_hook(state, bucket)

            module.register_comm_hook(None, counting)
        cache = GradCache(encoders, loss_fn, 2, keep_last_graph=case.endswith("keep"))
        torch.manual_seed(100 + rank)  # each rank its own dropout masks
        loss = cache.step(global_q[rows], global_d[rows], **kwargs())
        got = {n: p.grad.clone() for n, p in (q_enc.named_parameters() if not towers else
               [*(("q." + n, p) for n, p in q_enc.named_parameters()), *(("d." + n, p) for n, p in d_enc.named_parameters())])}
        # Single-process reference on the global batch, each rank's rows under that rank's masks.
        for p in [*q_enc.parameters(), *d_enc.parameters()]:
            p.grad = None
        reps = [[], []]
        for r in range(world_size):
            torch.manual_seed(100 + r)
            sl = slice(r * b_local, (r + 1) * b_local)
            for k, (enc, x) in enumerate(zip(plain, (global_q[sl], global_d[sl]))):
                reps[k].append(torch.cat([enc(c) for c in x.split(2)]))
        ref = ref_loss(torch.cat(reps[0]), torch.cat(reps[1]), **kwargs(global_rows=True))
        ref.backward()
        want = {n: p.grad.clone() for n, p in (q_enc.named_parameters() if not towers else
                [*(("q." + n, p) for n, p in q_enc.named_parameters()), *(("d." + n, p) for n, p in d_enc.named_parameters())])}
        losses = [torch.zeros(()) for _ in range(world_size)]
        torch.distributed.all_gather(losses, loss.float())
        results[case] = (got, want, torch.stack(losses).mean(), ref.detach())
        results[f"all_reduces {case}"] = all_reduces
    # Gradient accumulation under DDP: two cached steps, only the second synchronised.
    torch.manual_seed(0)
    enc = MLP().to(dtype)
    cache = GradCache(DDP(enc), InfoNCE(temperature=0.3, gather=True), 3)
    halves = [(global_q[:, :3].repeat(1, 2), global_d[:, :3].repeat(1, 2)), (global_q, global_d)]
    torch.manual_seed(200 + rank)
    cache.step(halves[0][0][rows], halves[0][1][rows], sync=False)
    unsynced = [p.grad.clone() for p in enc.parameters()]
    cache.step(halves[1][0][rows], halves[1][1][rows])
    got = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad(set_to_none=True)
    reps = {0: [[], []], 1: [[], []]}
    for r in range(world_size):  # each rank's two steps under its own random stream
        torch.manual_seed(200 + r)
        sl = slice(r * b_local, (r + 1) * b_local)
        for step, (q, d) in enumerate(halves):
            for k, x in enumerate((q[sl], d[sl])):
                reps[step][k].append(torch.cat([enc(c) for c in x.split(3)]))
    for step in (0, 1):
        InfoNCE(temperature=0.3)(torch.cat(reps[step][0]), torch.cat(reps[step][1])).backward()
    want = [p.grad.clone() for p in enc.parameters()]
    results["accumulate"] = (dict(enumerate(got)), dict(enumerate(want)), torch.zeros(()), torch.zeros((), dtype=dtype))
    results["unsynced_first_step"] = unsynced
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.distributed
def test_ddp_two_processes_match_single_process_global_batch():
    with tempfile.TemporaryDirectory() as out:
        run_distributed(_ddp_worker, 2, out)
        unsynced = []
        for rank in range(2):
            results = torch.load(os.path.join(out, f"rank{rank}.pt"))
            unsynced.append(results.pop("unsynced_first_step"))
            for key in [k for k in results if k.startswith("all_reduces")]:
                counts = results.pop(key)
                assert set(counts.values()) == {1}, (key, counts)  # one synchronised backward per module
            for case, (got, want, loss, ref) in results.items():
                for name in want:
                    torch.testing.assert_close(got[name], want[name], atol=1e-10, rtol=0, msg=f"{case} {name}")
                torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=0)
        # sync=False really left each rank with its own local gradient.
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(*unsynced))


# ---------------------------------------------------------------- CUDA


class OnDevice(MLP):
    """Moves its (CPU) input to its own device: the CUDA RNG must still be replayed."""

    def forward(self, x):
        return self.net(x.to(self.net[0].weight.device))


@pytest.mark.cuda
@pytest.mark.parametrize("cpu_inputs", [False, True])
def test_cuda_rng_replay_and_fp16_grad_scaler(cpu_inputs):
    device = torch.device("cuda")
    torch.manual_seed(0)
    enc = OnDevice(p=0.5).to(device)
    views = [v if cpu_inputs else v.to(device) for v in make_views(64, torch.float32)]
    # fp32: exact replay of the CUDA dropout masks.
    want_loss, _, want = reference([enc, enc], InfoNCE(temperature=0.3), views, [16, 16], 4)
    _, _, got = cached_grads([enc, enc], InfoNCE(temperature=0.3), views, [16, 16], 4)
    assert_grads_close(got, want, 1e-5)
    # fp16 autocast with a GradScaler: the scale is applied exactly once.
    amp = {"device_type": "cuda", "dtype": torch.float16}
    scale = 2.0**8
    torch.manual_seed(4)
    with torch.autocast(**amp):
        reps = [torch.cat([enc(c) for c in x.split(16)]) for x in views]
        loss = InfoNCE(temperature=0.3)(*reps)
    scaler = torch.amp.GradScaler("cuda", init_scale=scale)
    scaler.scale(loss).backward()
    want = grads_of([enc])
    scaler = torch.amp.GradScaler("cuda", init_scale=scale)
    cache = GradCache(enc, InfoNCE(temperature=0.3), 16, autocast=amp, scaler=scaler)
    torch.manual_seed(4)
    cache.step(*views)
    got = grads_of([enc])
    for k in want:
        torch.testing.assert_close(got[k] / scale, want[k] / scale, atol=1e-3, rtol=1e-2)
    ratio = max((got[k].abs().max() / want[k].abs().max()).item() for k in want)
    assert 0.9 < ratio < 1.1  # not scaled twice (ratio 256) nor not at all (1/256)


def test_one_row_chunks_are_refused_only_where_they_reach_a_batchnorm1d_in_training():
    torch.manual_seed(0)
    q, d = make_views(10, torch.float64)
    bn, plain = BNEncoder().double(), MLP(d_out=4).double()
    loss = InfoNCE(temperature=0.3, form="query_document")
    # Query chunks 5, 5 through BatchNorm; document chunks 3, 3, 3, 1 through a tower without one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm's per-chunk statistics
        GradCache([bn, plain], loss, [5, 3]).step(q, d)
        with pytest.raises(ValueError, match=r"chunk of 1 row of input 1 reaches BatchNorm1d.*chunk size 3"):
            GradCache([plain, bn], loss, [5, 3]).step(q, d)
        running = bn.net[1].running_mean.clone()
        with pytest.raises(ValueError, match="input 0"):
            GradCache(bn, loss, 3).step(q, d)
        assert torch.equal(bn.net[1].running_mean, running)  # refused before anything was encoded
        GradCache([plain, bn], loss, [5, 3], batchnorm="eval").step(q, d)

    class Conv(nn.Module):  # BatchNorm2d normalises over positions too: one image passes
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 4))

        def forward(self, x):
            return self.net(x)

    images = torch.randn(10, 1, 4, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GradCache(Conv().double(), InfoNCE(temperature=0.3), 3).step(images, images + 0.1)


def test_backward_chunks_outside_the_first_pass_autocast_region_reenters_it():
    # As in a trainer: the forward (GradCache's first pass and the loss) inside an autocast
    # region, the backward (which runs the second pass) outside it. The second pass must be
    # in bf16 too, or it back-propagates through other activations than the first pass's.
    torch.manual_seed(0)
    enc = MLP()
    views = make_views(12, torch.float32)
    amp = {"device_type": "cpu", "dtype": torch.bfloat16}
    torch.manual_seed(3)
    with torch.autocast(**amp):
        GradCache(enc, InfoNCE(temperature=0.3), 5).step(*views)
    want = grads_of([enc])
    enc.zero_grad(set_to_none=True)
    cache = GradCache(enc, InfoNCE(temperature=0.3), 5)
    torch.manual_seed(3)
    with torch.autocast(**amp):
        cached = cache.forward_no_grad(*views)
        cache.representation_gradients(cached)
    assert not torch.is_autocast_enabled("cpu")
    cache.backward_chunks(cached)
    assert not torch.is_autocast_enabled("cpu")  # the region is left again
    assert_grads_close(grads_of([enc]), want, atol=1e-7)


def test_a_one_row_chunk_through_batchnorm2d_after_pooling_leaves_the_statistics_alone():
    class Pooled(nn.Module):  # one value per channel after pooling: a 1-row chunk fails in BatchNorm2d
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x).mean(dim=(2, 3), keepdim=True)).flatten(1)

    torch.manual_seed(0)
    enc = Pooled().double()
    images = torch.randn(9, 1, 4, 4, dtype=torch.float64)
    before = [b.clone() for b in enc.bn.buffers()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="chunk of 1 row reached a BatchNorm.*as before this step"):
            GradCache(enc, InfoNCE(temperature=0.3), 4).step(images, images + 0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, enc.bn.buffers()))


def test_backward_chunks_inside_an_autocast_region_the_first_pass_was_outside_of():
    torch.manual_seed(0)
    enc = MLP()
    views = make_views(12, torch.float32)
    torch.manual_seed(3)
    GradCache(enc, InfoNCE(temperature=0.3), 5).step(*views)
    want = grads_of([enc])
    enc.zero_grad(set_to_none=True)
    cache = GradCache(enc, InfoNCE(temperature=0.3), 5)
    torch.manual_seed(3)
    cached = cache.forward_no_grad(*views)
    cache.representation_gradients(cached)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's region: the second pass stays float32
        cache.backward_chunks(cached)
    assert_grads_close(grads_of([enc]), want, atol=1e-7)
