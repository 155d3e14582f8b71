"""global_train_gap against a per-anchor float64 loop over the dense matrix."""

from __future__ import annotations

import math

import pytest
import torch

from negbatch.diagnostics import global_train_gap


def reference(x, y, batches, tau):
    x = torch.nn.functional.normalize(x.double(), dim=1).tolist()
    y = torch.nn.functional.normalize(y.double(), dim=1).tolist()
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))
    glob, train = [], []
    for batch in batches:
        for i in batch:
            pos = dot(x[i], y[i]) / tau
            glob.append(-pos + math.log(sum(math.exp(dot(x[i], y[j]) / tau) for j in range(len(y)))))
            train.append(-pos + math.log(sum(math.exp(dot(x[i], y[j]) / tau) for j in batch)))
    return sum(glob) / len(glob), sum(train) / len(train)


@pytest.mark.parametrize("block", [1, 7, 4096])
def test_matches_dense_float64_loop(block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=g, dtype=torch.float64)
    y = x + 0.3 * torch.randn(37, 5, generator=g, dtype=torch.float64)
    perm = torch.randperm(37, generator=g).tolist()
    batches = [perm[i : i + 8] for i in range(0, 37, 8)]  # a short tail batch too
    r = global_train_gap((x, y), batches, 0.2, block_size=block)
    gl, tr = reference(x, y, batches, 0.2)
    assert r.global_loss == pytest.approx(gl, rel=1e-10)
    assert r.train_loss == pytest.approx(tr, rel=1e-10)
    assert r.gap == pytest.approx(gl - tr, rel=1e-9, abs=1e-12)
    assert r.gap > 0 and r.num_anchors == 37


def test_subset_of_anchors_and_single_tensor_form():
    x = torch.randn(20, 4, dtype=torch.float64)
    batches = [[0, 5, 9], [3, 4]]
    r = global_train_gap(x, batches, 0.5)
    gl, tr = reference(x, x, batches, 0.5)
    assert (r.global_loss, r.train_loss) == (pytest.approx(gl), pytest.approx(tr))
    assert r.num_anchors == 5


def test_one_batch_of_everything_has_zero_gap():
    x = torch.randn(30, 4, dtype=torch.float64)
    assert global_train_gap((x, x.flip(0)), [list(range(30))], 0.1).gap == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "emb,batches,tau,exc,match",
    [
        ((torch.randn(5, 3), torch.randn(4, 3)), [[0]], 0.1, ValueError, "dimension 0"),
        (torch.full((5, 3), float("nan")), [[0]], 0.1, ValueError, "NaN"),
        (torch.randn(5, 3), [[0, 5]], 0.1, ValueError, "outside"),
        (torch.randn(5, 3), [[0, 1], [1]], 0.1, ValueError, "repeat"),
        (torch.randn(5, 3), [], 0.1, ValueError, "empty"),
        (torch.randn(5, 3), [[0]], 0.0, ValueError, "temperature"),
        ("x", [[0]], 0.1, TypeError, "embeddings"),
        # one batch not wrapped in a list: it was taken as 4 batches of one sample (gap = L^Global - 0)
        (torch.randn(5, 3), [0, 1, 2, 3], 0.1, ValueError, r"batches\[0\] is 0, not a 1-d sequence.*\[batch\]"),
        (torch.randn(5, 3), [[[0, 1], [2, 3]]], 0.1, ValueError, r"batches\[0\] has shape \(2, 2\)"),
    ],
)
def test_bad_input(emb, batches, tau, exc, match):
    with pytest.raises(exc, match=match):
        global_train_gap(emb, batches, tau)


def test_half_precision_embeddings_give_the_float64_gap_and_float_indices_are_refused():
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=1)
    x, y = z.bfloat16(), (z + 0.3 * torch.randn(64, 8, generator=g)).bfloat16()
    batches = [list(range(i, i + 16)) for i in range(0, 64, 16)]
    want = global_train_gap((x.double(), y.double()), batches, temperature=0.05)
    got = global_train_gap((x, y), batches, temperature=0.05)
    assert got.gap == pytest.approx(want.gap, rel=1e-5)
    assert got.global_loss == pytest.approx(want.global_loss, rel=1e-5)
    with pytest.raises(TypeError, match="integer sample indices"):
        global_train_gap((x, y), [[0.5, 1.9, 2.2]], temperature=0.05)
