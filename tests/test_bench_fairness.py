"""The benches' races compare the same computation on both sides (bench/_agree.py).

Each race checks, once before timing, that ours and the peer give the same
value and the same gradients; these tests run those checks at tiny sizes
with the timing left out, and check that the check itself catches sides that
differ.
"""

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def bench_module(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def no_timing(bench, monkeypatch) -> list[dict]:
    """Replace the bench's race by a record of what it would time."""
    raced = []

    def race(variants, leaves, repeats):
        raced.append(variants)
        return {name: 1.0 for name in variants}

    monkeypatch.setattr(bench, "race", race)
    return raced


def peers_args(**kw):
    args = dict(dim=16, repeats=1, ks=[4], queue=48, classes=4, sampled_at=32, scale_repeats=1, pml_ntxent=False,
                tolerance=0.03)
    return types.SimpleNamespace(**{**args, **kw})


@pytest.fixture
def peers(monkeypatch):
    pytest.importorskip("info_nce")
    pytest.importorskip("sentence_transformers")
    bench = bench_module("bench_peers")
    no_timing(bench, monkeypatch)
    return bench


def test_check_same_passes_equal_sides_and_reports_what_it_compared():
    agree = bench_module("_agree")
    z = torch.randn(8, 4, requires_grad=True)
    line = agree.check_same("sum", lambda: (2 * z).sum(), lambda: (z + z).sum(), [z])
    assert line.startswith("same value and gradients") and "sum" in line


@pytest.mark.parametrize("peer, says", [
    (lambda z, s: (2.5 * z).sum(), "values"),                          # another temperature
    (lambda z, s: (2 * z).sum() + (z[0] - z[0].detach()).sum(), "gradients differ"),  # same value
    (lambda z, s: (2 * z).sum() + 0 * s, "does not use"),              # the peer learns a scale ours keeps fixed
    (lambda z, s: (2 * z.detach()).sum() + 0 * s.sum(), "side only"),  # no gradient to the inputs
])
def test_check_same_refuses_sides_that_differ(peer, says):
    agree = bench_module("_agree")
    z = torch.randn(8, 4, requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(agree.RaceMismatch, match=says):
        agree.check_same("race", lambda: (2 * z).sum(), lambda: peer(z, scale), [z], others=[scale])


def test_check_same_compares_a_learnable_scale_on_both_sides():
    agree = bench_module("_agree")
    z = torch.randn(8, 4, requires_grad=True)
    ours_scale, peer_log_scale = torch.tensor(10.0, requires_grad=True), torch.tensor(math.log(10.0), requires_grad=True)
    # d/d scale against d/d log_scale: the same value, not the same gradient of the parameter
    with pytest.raises(agree.RaceMismatch, match="leaf 1: gradients differ"):
        agree.check_same("scale", lambda: (ours_scale * z).sum(), lambda: (peer_log_scale.exp() * z).sum(),
                         [z, ours_scale], [z, peer_log_scale])


def test_dense_races_compare_the_same_computation(peers):
    # The ClipLoss formula's scale required a gradient here while ours had a
    # fixed temperature: the peer computed d loss / d scale on every call.
    report = peers.Report(0.03)
    peers.dense_peers(32, peers_args(), report)
    assert len(report.rows) == len(peers.SOFTMAX_PAIRS)


def test_new_loss_races_compare_the_same_computation(peers, capsys):
    pytest.importorskip("pytorch_metric_learning")
    report = peers.Report(0.03)
    peers.new_losses(32, peers_args(), report)
    out = capsys.readouterr().out
    assert out.count("same value and gradients") == 4
    assert out.count("same value (gradients not compared)") == 1 and "queue 48" in out  # PML's memory is detached


def test_new_loss_races_refuse_a_peer_with_another_temperature(peers, monkeypatch):
    pytest.importorskip("pytorch_metric_learning")
    formula = peers.dcl_formula
    monkeypatch.setattr(peers, "dcl_formula", lambda z1, z2, tau: formula(z1, z2, 2 * tau))
    with pytest.raises(AssertionError, match="DCL: negbatch / plain formula"):
        peers.new_losses(32, peers_args(), peers.Report(0.03))


def test_high_scale_races_compare_the_same_computation(peers, capsys):
    report = peers.Report(0.03)
    peers.high_scale(32, peers_args(), report)
    assert capsys.readouterr().out.count("same value and gradients") == len(peers.SOFTMAX_PAIRS) + 1


def test_dense_races_refuse_a_peer_that_does_not_normalise(peers, monkeypatch):
    monkeypatch.setattr(peers, "plain_nt_xent", lambda z1, z2, tau: peers.F.cross_entropy(
        (torch.cat([z1, z2]) @ torch.cat([z1, z2]).t() / tau).fill_diagonal_(float("-inf")),
        torch.cat([torch.arange(z1.shape[0], 2 * z1.shape[0]), torch.arange(z1.shape[0])])))
    with pytest.raises(AssertionError, match="two_view / plain NT-Xent"):
        peers.dense_peers(32, peers_args(), peers.Report(0.03))
