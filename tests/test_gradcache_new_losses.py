"""GradCache with the losses of issue 15: the cached step equals the plain
step (encoder gradients, the loss's own parameters' gradients, its value),
and a queue is filled once per optimizer step, with the batch's entries."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from negbatch import DCL, GradCache, InfoNCE, MomentumEncoder, SigLIP


def _encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Dropout(0.2), nn.Tanh(), nn.Linear(12, 4)).double()


CASES = {  # (loss, takes indices, takes labels)
    "queue_supcon_k": (lambda: InfoNCE(temperature=0.3, queue_size=30, positives="mask", negatives=5,
                                       learnable_temperature=True), True, True),
    "dcl_queue_filter": (lambda: DCL(temperature=0.3, queue_size=20, filter_top=0.2), True, False),
    "siglip": (lambda: SigLIP(temperature=0.2, bias=-2.0), False, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_steps_equal_plain_steps_and_fill_the_queue_once_per_step(name):
    make, with_index, with_labels = CASES[name]
    plain_enc, plain_loss = _encoder(), make().double()
    cached_enc, cached_loss = copy.deepcopy(plain_enc), copy.deepcopy(plain_loss)
    cache = GradCache(cached_enc, cached_loss, chunk_size=3)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x1, x2 = torch.randn(10, 6, generator=g).double(), torch.randn(10, 6, generator=g).double()
        kw = {"labels": torch.randint(0, 3, (10,), generator=g)} if with_labels else {}
        if with_index:
            kw["indices"] = torch.arange(10) + 4 * step
        for module in (plain_enc, plain_loss, cached_enc, cached_loss):
            module.zero_grad(set_to_none=True)
        torch.manual_seed(100 + step)  # dropout: the same draws in both
        kw["generator"] = torch.Generator().manual_seed(7)
        want = plain_loss(plain_enc(x1), plain_enc(x2), **kw)
        want.backward()
        torch.manual_seed(100 + step)
        kw["generator"] = torch.Generator().manual_seed(7)
        got = cache.step(x1, x2, **kw)
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
        for (pname, p), q in zip(cached_enc.named_parameters(), plain_enc.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=pname)
        for (pname, p), q in zip(cached_loss.named_parameters(), plain_loss.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=f"loss's {pname}")
        if with_index:
            # The same entries (chunked encoding rounds the embeddings in the last bits).
            for key, value in cached_loss.queue.state_dict().items():
                torch.testing.assert_close(value, plain_loss.queue.state_dict()[key], rtol=1e-12, atol=1e-14, msg=key)
            assert len(cached_loss.queue) == min(20 * (step + 1), cached_loss.queue.size)  # 2 x 10 views a step
        with torch.no_grad():  # one optimizer step on both
            for module in (plain_enc, plain_loss, cached_enc, cached_loss):
                for p in module.parameters():
                    p -= 0.1 * p.grad


def test_moco_with_a_momentum_encoder_under_gradcache():
    online = _encoder().eval()  # no dropout: the keys are the same function of x
    keys = MomentumEncoder(online, momentum=0.5)
    loss_fn = InfoNCE(temperature=0.2, form="query_document", queue_size=16).double()
    plain_loss = copy.deepcopy(loss_fn)
    plain_online = copy.deepcopy(online)
    cache = GradCache([online, keys], loss_fn, chunk_size=4)
    x1, x2 = torch.randn(8, 6).double(), torch.randn(8, 6).double()
    got = cache.step(x1, x2, indices=torch.arange(8))
    want = plain_loss(plain_online(x1), keys(x2), indices=torch.arange(8))
    want.backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=0)
    for p, q in zip(online.parameters(), plain_online.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in keys.parameters()) and len(loss_fn.queue) == 8
