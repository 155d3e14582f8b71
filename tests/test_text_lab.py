"""Text pairs in the lab: the run loop against train_text_pairs and a brute-force
retrieval reference, gradient caching, configuration errors, and the text
negatives study end to end through the CLI in a subprocess (skipped without the
``text`` extra)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers", reason="text runs need the text extra: pip install -e '.[text]'")

from negbatch.lab.text_runs import (  # noqa: E402
    TextRunConfig,
    _tokenizer,
    load_text_split,
    parse_data,
    run_text_configs,
    train_text_run,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = dict(data="builtin", test_fraction=0.25, batch_size=8, steps=4, dim=16, heads=2, vocab_size=600)
TINY_CLI = ["--data", "builtin", "--batch-size", "8", "--steps", "3", "--text-dim", "16", "--text-heads", "2",
            "--vocab-size", "600"]


def negbatch(*args):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "negbatch.cli", *args], capture_output=True, text=True, env=env, timeout=240)


def _brute_force_metrics(q: torch.Tensor, d: torch.Tensor, relevant: list[int]) -> dict[str, float]:
    """Cosine scores in float64, rank by a Python sort (ties: lower index first), metrics by hand."""
    q = torch.nn.functional.normalize(q.double(), dim=1)
    d = torch.nn.functional.normalize(d.double(), dim=1)
    out = {"recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0, "mrr@10": 0.0, "ndcg@10": 0.0}
    for i, rel in enumerate(relevant):
        scores = [float(q[i] @ d[j]) for j in range(d.shape[0])]
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        rank = order.index(rel) + 1
        for k in (1, 5, 10):
            out[f"recall@{k}"] += rank <= k
        if rank <= 10:
            out["mrr@10"] += 1 / rank
            out["ndcg@10"] += 1 / math.log2(1 + rank)
    return {k: v / len(relevant) for k, v in out.items()}


def test_run_equals_train_text_pairs_and_brute_force_retrieval(tmp_path):
    from negbatch import InfoNCE
    from negbatch.evaluation.retrieval import encode_texts
    from negbatch.models.text import TransformerTextEncoder
    from negbatch.text_training import train_text_pairs

    cfg = TextRunConfig(**TINY, seed=3)
    summary = train_text_run(cfg, tmp_path / "run")
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    # Independent path: the library's loop with the same seed, then a brute-force evaluation.
    train, test = load_text_split(cfg.data, cfg.max_pairs, cfg.test_fraction, cfg.data_seed)
    tok = _tokenizer(cfg.data, cfg.max_pairs, cfg.test_fraction, cfg.data_seed, cfg.vocab_size, cfg.max_length)
    torch.manual_seed(cfg.seed)
    enc = TransformerTextEncoder(tok.vocab_size, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dropout=cfg.dropout,
                                 max_length=cfg.max_length)
    loss = InfoNCE(temperature=cfg.temperature, form="query_document", symmetric=True)
    result = train_text_pairs(enc, tok, train, loss, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
                              weight_decay=cfg.weight_decay, seed=cfg.seed)
    assert logged == pytest.approx(result.losses, abs=1e-6)
    q = encode_texts(enc, tok, test.queries)
    d = encode_texts(enc, tok, test.documents)  # builtin documents are distinct: one corpus entry each
    assert len(set(test.documents)) == len(test.documents)
    reference = _brute_force_metrics(q, d, list(range(len(test))))
    for key, value in reference.items():
        assert summary[key] == pytest.approx(value, abs=1e-9), key
    assert summary["num_test_queries"] == len(test) and summary["num_train_pairs"] == len(train)
    assert summary["steps"] == cfg.steps


def test_gradient_cache_gives_the_same_run(tmp_path):
    # Without dropout: chunks draw dropout masks of other shapes than the whole batch, so with
    # dropout the two runs differ by their random draws (GradCache replays its own draws exactly).
    plain = train_text_run(TextRunConfig(**TINY, dropout=0.0), tmp_path / "plain")
    cached = train_text_run(TextRunConfig(**TINY, dropout=0.0, chunk_size=3), tmp_path / "cached")
    losses = lambda name: [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("cached") == pytest.approx(losses("plain"), abs=1e-5)
    assert cached["mrr@10"] == pytest.approx(plain["mrr@10"], abs=1e-6)


def test_sampled_negatives_are_seeded_and_differ_from_all(tmp_path):
    a = train_text_run(TextRunConfig(**TINY, negatives=2), tmp_path / "a")
    b = train_text_run(TextRunConfig(**TINY, negatives=2), tmp_path / "b")
    c = train_text_run(TextRunConfig(**TINY), tmp_path / "c")
    assert a["first_loss"] == b["first_loss"] and a["final_loss"] == b["final_loss"]
    assert a["first_loss"] < c["first_loss"]  # 2 negatives instead of 7: an easier softmax
    # A finished folder refuses another configuration; a refused set-up claims no folder.
    with pytest.raises(ValueError, match="different configuration .differs in negatives"):
        train_text_run(TextRunConfig(**TINY, negatives=3), tmp_path / "a")
    with pytest.raises(ValueError, match="batch_size"):
        train_text_run(TextRunConfig(**{**TINY, "batch_size": 10**6}), tmp_path / "d")
    assert not (tmp_path / "d" / "config.json").exists()


def test_finished_run_is_skipped_and_other_config_refused(tmp_path):
    cfg = TextRunConfig(**TINY)
    first = train_text_run(cfg, tmp_path / "run")
    stamp = (tmp_path / "run" / "summary.json").stat().st_mtime_ns
    assert train_text_run(cfg, tmp_path / "run") == first
    assert (tmp_path / "run" / "summary.json").stat().st_mtime_ns == stamp
    (tmp_path / "run" / "summary.json").unlink()
    with pytest.raises(ValueError, match="different configuration.*lr"):
        train_text_run(cfg.replace(lr=0.5), tmp_path / "run")


@pytest.mark.parametrize("sampler, chunk_size", [("random", 0), ("gcbs", 3)])
def test_interrupted_run_resumes_exactly(tmp_path, sampler, chunk_size):
    # 7 steps over 22 training pairs in batches of 8: epochs of 2 batches, so the
    # interruptions fall mid-epoch and on an epoch boundary; dropout and K sampled
    # negatives draw from the restored random streams.
    cfg = TextRunConfig(**{**TINY, "steps": 7, "negatives": 3, "sampler": sampler, "chunk_size": chunk_size})
    whole = train_text_run(cfg, tmp_path / "whole", checkpoint_every=0)
    assert train_text_run(cfg, tmp_path / "cut", checkpoint_every=2, stop_after=3) is None
    assert not (tmp_path / "cut" / "summary.json").exists()
    logged = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in logged] == [1, 2, 3]
    assert train_text_run(cfg, tmp_path / "cut", checkpoint_every=2, stop_after=4) is None
    resumed = train_text_run(cfg, tmp_path / "cut", checkpoint_every=2)
    losses = lambda name: [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("cut") == losses("whole") and len(losses("whole")) == 7
    for key in ("recall@1", "mrr@10", "ndcg@10", "untrained_mrr@10", "final_loss", "first_loss"):
        assert resumed[key] == whole[key], key
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_control_other_random_state_changes_the_run(tmp_path):
    # The comparison above can fail: a checkpoint whose dropout stream is replaced gives another run.
    cfg = TextRunConfig(**{**TINY, "steps": 5, "negatives": 3})
    whole = train_text_run(cfg, tmp_path / "whole")
    train_text_run(cfg, tmp_path / "cut", stop_after=2)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    state["rng"]["torch"] = torch.Generator().manual_seed(123).get_state()
    torch.save(state, tmp_path / "cut" / "checkpoint.pt")
    assert train_text_run(cfg, tmp_path / "cut")["final_loss"] != whole["final_loss"]


def test_checkpoint_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 0"):
        train_text_run(TextRunConfig(**TINY), tmp_path / "a", checkpoint_every=-1)
    with pytest.raises(ValueError, match="stop_after must be a positive int"):
        train_text_run(TextRunConfig(**TINY), tmp_path / "a", stop_after=0)


def test_bad_configurations_name_the_field():
    with pytest.raises(ValueError, match="'bible', 'builtin' or 'pairs:PATH'"):
        TextRunConfig(data="wiki")
    with pytest.raises(ValueError, match="negatives: exceeds the 7 in-batch candidates"):
        TextRunConfig(data="builtin", batch_size=8, negatives=8)
    with pytest.raises(ValueError, match="heads: must divide dim"):
        TextRunConfig(dim=10, heads=4)
    with pytest.raises(ValueError, match="sampler"):
        TextRunConfig(sampler="best")
    with pytest.raises(ValueError, match="unknown text run option"):
        TextRunConfig.from_dict({"epochs": 3})
    assert parse_data("pairs:/x/y.jsonl") == ("pairs", "/x/y.jsonl")
    with pytest.raises(ValueError, match="batch_size \\(64\\) is larger"):
        train_text_run(TextRunConfig(data="builtin", test_fraction=0.25, dim=16, heads=2, vocab_size=600), "/tmp/never-created-by-negbatch-test")


def test_sweep_rows_and_rerun(tmp_path):
    base = TextRunConfig(**{**TINY, "steps": 1})
    rows = run_text_configs([base, base.replace(seed=1)], tmp_path)
    assert len(rows) == 2 and len(json.loads((tmp_path / "results.json").read_text())) == 2
    with pytest.raises(ValueError, match="identical"):
        run_text_configs([base, base], tmp_path)


def test_study_negatives_on_text_through_the_cli(tmp_path):
    out = tmp_path / "study"
    args = ["study", "negatives", *TINY_CLI, "--ks", "2,5,100", "--seeds", "0,1", "--out", str(out)]
    r = negbatch(*args)
    assert r.returncode == 0, r.stderr
    spec = json.loads((out / "study.json").read_text())
    assert spec["ks"] == [2, 5, "all"] and spec["data"] == "builtin"  # 100 >= 7 candidates: all
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 6 and {r["negatives"] for r in rows} == {2, 5, "all"}
    assert all(0 <= r["recall@1"] <= r["recall@5"] <= r["recall@10"] <= 1 for r in rows)
    report = (out / "report.md").read_text()
    assert "nDCG@10" in report or "ndcg@10" in report
    assert "all (7)" in report and (out / "retrieval_vs_k.png").exists()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    again = negbatch(*args)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == stamps  # finished runs skipped
    (out / "report.md").unlink()
    rep = negbatch("report", str(out))
    assert rep.returncode == 0 and (out / "report.md").exists(), rep.stderr


def test_study_on_the_users_pairs_file_and_errors(tmp_path):
    from negbatch.data.text import builtin_pairs

    pairs = builtin_pairs()
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in zip(pairs.queries, pairs.documents)))
    r = negbatch("study", "negatives", *TINY_CLI[2:], "--data", f"pairs:{path}", "--test-fraction", "0.25",
                 "--ks", "all", "--seeds", "0", "--symmetric", "false", "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "s" / "results.json").read_text())[0]
    assert row["symmetric"] is False and row["data"] == f"pairs:{path}"
    bad = negbatch("study", "negatives", "--data", "wiki", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "pairs:PATH" in bad.stderr
    missing = negbatch("study", "negatives", "--data", f"pairs:{tmp_path / 'nope.jsonl'}", "--out", str(tmp_path / "bad2"))
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr
    big = negbatch("study", "negatives", "--data", "builtin", "--out", str(tmp_path / "bad3"))  # default batch 64 > 34 pairs
    assert big.returncode == 2 and "--batch-size 64 exceeds the 34 training pairs" in big.stderr
    assert not (tmp_path / "bad3").exists()


def test_study_text_gradcache_through_the_cli(tmp_path):
    out = tmp_path / "gc"
    r = negbatch("study", "text-gradcache", *TINY_CLI[:2], *TINY_CLI[4:], "--batch-sizes", "4,16", "--chunk-size", "4",
                 "--seeds", "0,1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "results.json").read_text())
    spec = json.loads((out / "study.json").read_text())
    n_train = rows[0]["num_train_pairs"]
    assert sorted((r["batch_size"], r["chunk_size"], r["steps"]) for r in rows) == sorted(
        [(4, 0, n_train // 4)] * 2 + [(16, 4, n_train // 16)] * 2)  # same pairs seen; cache only when B > chunk
    mem = spec["saved_activation_bytes"]
    assert mem["16"]["with_cache"] < mem["16"]["without_cache"] / 2
    assert "Activation memory" in (out / "report.md").read_text() and (out / "retrieval_vs_batch_size.png").exists()


def test_saved_activation_bytes_grow_with_the_batch_not_with_the_cache():
    from negbatch.lab.studies.text_gradcache import saved_activation_bytes

    cfg = TextRunConfig(**TINY)
    plain = [saved_activation_bytes(cfg.replace(batch_size=b), 0) for b in (4, 16, 32)]
    cached = [saved_activation_bytes(cfg.replace(batch_size=b), 4) for b in (4, 16, 32)]
    assert plain[0] < plain[1] < plain[2]
    # B = chunk: the cache re-encodes queries and documents one after the other, so it holds
    # one input's graph at a time, about half of a plain step's (both inputs' graphs).
    assert cached[0] == pytest.approx(plain[0] / 2, rel=0.2)
    assert max(cached) < plain[1] / 2  # bounded by one chunk's graph (plus the small loss graph)


@pytest.mark.parametrize("sampler", ["gcbs", "hard", "no-duplicates"])
def test_sampler_batches_are_full_disjoint_and_seeded(sampler):
    from negbatch.lab.text_samplers import epoch_batches
    from negbatch.models.text import TransformerTextEncoder

    cfg = TextRunConfig(**{**TINY, "sampler": sampler})
    train, _ = load_text_split(cfg.data, cfg.max_pairs, cfg.test_fraction, cfg.data_seed)
    tok = _tokenizer(cfg.data, cfg.max_pairs, cfg.test_fraction, cfg.data_seed, cfg.vocab_size, cfg.max_length)
    torch.manual_seed(0)
    enc = TransformerTextEncoder(tok.vocab_size, dim=cfg.dim, depth=1, heads=cfg.heads)
    enc.train()
    first = [b.tolist() for b in epoch_batches(cfg, enc, tok, train, epoch=0)]
    again = [b.tolist() for b in epoch_batches(cfg, enc, tok, train, epoch=0)]
    assert first == again and enc.training  # seeded; the encoder's mode is restored
    flat = [i for b in first for i in b]
    assert all(len(b) == cfg.batch_size for b in first) and len(first) == len(train) // cfg.batch_size
    assert len(set(flat)) == len(flat) and all(0 <= i < len(train) for i in flat)


def test_study_text_batches_through_the_cli(tmp_path):
    out = tmp_path / "tb"
    r = negbatch("study", "text-batches", *TINY_CLI[:2], *TINY_CLI[6:], "--batch-size", "8", "--samplers", "random,gcbs",
                 "--seeds", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "results.json").read_text())
    assert sorted(r["sampler"] for r in rows) == ["gcbs", "random"]
    assert all(r["steps"] == r["num_train_pairs"] // 8 for r in rows)  # one epoch by default
    assert "gcbs** vs random" in (out / "report.md").read_text()
    bad = negbatch("study", "text-batches", "--data", "builtin", "--samplers", "best", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "unknown sampler" in bad.stderr
