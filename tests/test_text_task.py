"""Text pairs in the lab's run skeleton: against a hand-written training loop and a
brute-force retrieval reference, gradient caching, resume, configuration errors,
and the text studies end to end through the command's entry point, in-process
(skipped without the ``text`` extra)."""

import json
import math
import re

import pytest
import torch

pytest.importorskip("tokenizers", reason="text runs need the text extra: pip install -e '.[text]'")

from _runs import figures_not_drawn  # noqa: E402
from negbatch.lab import TrainConfig, train  # noqa: E402
from negbatch.lab.sweep import run_configs  # noqa: E402
from negbatch.lab.tasks.text import load_text_split, text_tokenizer  # noqa: E402

TINY = dict(dataset="builtin", test_fraction=0.25, batch_size=8, steps=4, text_dim=16, text_heads=2, vocab_size=600)
TINY_CLI = ["--data", "builtin", "--batch-size", "8", "--steps", "3", "--text-dim", "16", "--text-heads", "2",
            "--vocab-size", "600"]


def losses(folder):
    return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


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


def _reference_losses(cfg, train):
    """The run written out by hand: seed, encoder, AdamW, the seed again, one permutation per epoch
    from a generator seeded by the run's seed (tail dropped), InfoNCE(query_document) per batch."""
    from negbatch import InfoNCE
    from negbatch.models.text import TransformerTextEncoder

    tok = text_tokenizer(cfg, train)
    torch.manual_seed(cfg.seed)
    enc = TransformerTextEncoder(tok.vocab_size, dim=cfg.text_dim, depth=cfg.text_depth, heads=cfg.text_heads,
                                 dropout=cfg.dropout, max_length=cfg.max_length)
    loss = InfoNCE(temperature=cfg.temperature, form="query_document", symmetric=True)
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout draws from the seed again once the model is built
    out, batches = [], []
    while len(out) < cfg.steps:
        if not batches:
            order = torch.randperm(len(train), generator=order_gen)
            batches = list(order[: len(train) - len(train) % cfg.batch_size].split(cfg.batch_size))
        idx = batches.pop(0).tolist()
        value = loss(enc(tok([train.queries[i] for i in idx])), enc(tok([train.documents[i] for i in idx])))
        opt.zero_grad()
        value.backward()
        opt.step()
        out.append(float(value.detach()))
    return enc, tok, out


def test_run_equals_a_hand_written_loop_and_brute_force_retrieval(tmp_path):
    from negbatch.evaluation.retrieval import encode_texts

    cfg = TrainConfig(**TINY, seed=3)
    summary = train(cfg, tmp_path / "run")
    train_pairs, test = load_text_split(cfg)
    enc, tok, reference = _reference_losses(cfg, train_pairs)
    assert losses(tmp_path / "run") == pytest.approx(reference, abs=1e-6)
    q = encode_texts(enc, tok, test.queries)
    d = encode_texts(enc, tok, test.documents)  # builtin documents are distinct: one corpus entry each
    assert len(set(test.documents)) == len(test.documents)
    reference_metrics = _brute_force_metrics(q, d, list(range(len(test))))
    for key, value in reference_metrics.items():
        assert summary[key] == pytest.approx(value, abs=1e-9), key
    assert summary["num_test_queries"] == len(test) and summary["num_train_pairs"] == len(train_pairs)
    assert summary["steps"] == cfg.steps and summary["data"]["name"] == "builtin"


def test_gradient_cache_gives_the_same_run(tmp_path):
    # Without dropout: chunks draw dropout masks of other shapes than the whole batch, so with
    # dropout the two runs differ by their random draws (GradCache replays its own draws exactly).
    plain = train(TrainConfig(**TINY, dropout=0.0), tmp_path / "plain")
    cached = train(TrainConfig(**TINY, dropout=0.0, chunk_size=3), tmp_path / "cached")
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    assert cached["mrr@10"] == pytest.approx(plain["mrr@10"], abs=1e-6)


def test_sampled_negatives_are_seeded_and_differ_from_all(tmp_path):
    a = train(TrainConfig(**TINY, negatives=2), tmp_path / "a")
    b = train(TrainConfig(**TINY, negatives=2), tmp_path / "b")
    c = train(TrainConfig(**TINY), tmp_path / "c")
    assert a["first_loss"] == b["first_loss"] and a["final_loss"] == b["final_loss"]
    assert a["first_loss"] < c["first_loss"]  # 2 negatives instead of 7: an easier softmax
    # A finished folder refuses another configuration; a refused set-up claims no folder.
    with pytest.raises(ValueError, match="different configuration .differs in negatives"):
        train(TrainConfig(**TINY, negatives=3), tmp_path / "a")
    with pytest.raises(ValueError, match="batch_size"):
        train(TrainConfig(**{**TINY, "batch_size": 10**6}), tmp_path / "d")
    assert not (tmp_path / "d" / "config.json").exists()


def test_the_global_loss_follows_its_gamma_schedule(tmp_path):
    # Two epochs of 4 batches: the first meets every sample once, which sets its
    # normaliser whatever gamma is; in the second, gamma (0.5, or decaying from 1
    # to 0.5) mixes the old normaliser with the new estimate.
    base = dict(TINY, loss="global", gamma=0.5, steps=8)
    train(TrainConfig(**base), tmp_path / "constant")
    train(TrainConfig(**base, gamma_schedule="linear"), tmp_path / "linear")
    constant, linear = losses(tmp_path / "constant"), losses(tmp_path / "linear")
    assert constant[:4] == linear[:4] and constant[5:] != linear[5:]


def test_finished_run_is_skipped_and_other_config_refused(tmp_path):
    cfg = TrainConfig(**TINY)
    first = train(cfg, tmp_path / "run")
    stamp = (tmp_path / "run" / "summary.json").stat().st_mtime_ns
    assert train(cfg, tmp_path / "run") == first
    assert (tmp_path / "run" / "summary.json").stat().st_mtime_ns == stamp
    (tmp_path / "run" / "summary.json").unlink()
    with pytest.raises(ValueError, match="different configuration.*lr"):
        train(cfg.replace(lr=0.5), tmp_path / "run")


@pytest.mark.parametrize("sampler, chunk_size", [("random", 0), ("gcbs", 3)])
def test_interrupted_run_resumes_exactly(tmp_path, sampler, chunk_size):
    # 7 steps over 34 training pairs in batches of 8: epochs of 4 batches, so the
    # interruptions fall mid-epoch and on an epoch boundary; dropout and K sampled
    # negatives draw from the restored random streams.
    cfg = TrainConfig(**{**TINY, "steps": 7, "negatives": 3, "sampler": sampler, "chunk_size": chunk_size})
    whole = train(cfg, tmp_path / "whole")
    assert train(cfg, tmp_path / "cut", stop_after=3) is None
    assert not (tmp_path / "cut" / "summary.json").exists()
    logged = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in logged] == [1, 2, 3]
    assert train(cfg, tmp_path / "cut", stop_after=4) is None
    resumed = train(cfg.replace(checkpoint_every=2), tmp_path / "cut")
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 7
    for key in ("recall@1", "mrr@10", "ndcg@10", "untrained_mrr@10", "final_loss", "first_loss"):
        assert resumed[key] == whole[key], key
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_control_other_random_state_changes_the_run(tmp_path):
    # The comparison above can fail: a checkpoint whose dropout stream is replaced gives another run.
    cfg = TrainConfig(**{**TINY, "steps": 5, "negatives": 3})
    whole = train(cfg, tmp_path / "whole")
    train(cfg, tmp_path / "cut", stop_after=2)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    state["rng"]["torch"] = torch.Generator().manual_seed(123).get_state()
    torch.save(state, tmp_path / "cut" / "checkpoint.pt")
    assert train(cfg, tmp_path / "cut")["final_loss"] != whole["final_loss"]


def _hard_pairs(tmp_path):
    """30 pairs with two hard negatives each, as a JSONL file (columns q, d, h)."""
    rows = [{"q": f"question {i} about topic {i % 7}", "d": f"answer {i} on subject {i % 7}",
             "h": [f"other answer {i + 1}", f"unrelated text {i + 2}"]} for i in range(30)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hard_negative_column_reaches_the_loss(tmp_path):
    path = _hard_pairs(tmp_path)
    cfg = TrainConfig(dataset=f"pairs:{path}", query_column="q", document_column="d", hard_negatives_column="h",
                      test_fraction=0.25, batch_size=4, steps=3, text_dim=16, text_heads=2, vocab_size=300)
    s = train(cfg, tmp_path / "run")
    assert s["data"]["hard_negatives"] == 2 and s["data"]["source"] == str(path)
    # The same run without the column sees fewer candidates: its first loss is lower.
    plain = train(cfg.replace(hard_negatives_column=None), tmp_path / "plain")
    assert plain["first_loss"] < s["first_loss"]


def test_sampled_negatives_may_reach_into_the_hard_negatives(tmp_path):
    """A query's candidates are the batch's other documents and every hard negative of the batch: K up to
    B - 1 + B * H trains without the symmetric term (it was refused as above "the 3 in-batch candidates per
    query"); with it, a document has only the B - 1 other queries, and the refusal says so."""
    path = _hard_pairs(tmp_path)
    cfg = TrainConfig(dataset=f"pairs:{path}", query_column="q", document_column="d", hard_negatives_column="h",
                      test_fraction=0.25, batch_size=4, steps=2, text_dim=16, text_heads=2, vocab_size=300,
                      symmetric=False, negatives=11)  # 3 other documents + 4 * 2 hard negatives
    assert train(cfg, tmp_path / "k11")["steps"] == 2
    with pytest.raises(ValueError, match=r"negatives=12 exceeds the 11 in-batch candidates per query \(3 other documents "
                                         r"of the batch \+ its 8 hard negatives\) at batch_size=4"):
        train(cfg.replace(negatives=12), tmp_path / "k12")
    with pytest.raises(ValueError, match=r"negatives=4 exceeds the 3 in-batch candidates per document of the symmetric term "
                                         r"\(the batch's other queries\) at batch_size=4; use negatives <= 3, 'all' "
                                         r"or symmetric=false"):
        train(cfg.replace(negatives=4, symmetric=True), tmp_path / "k4")
    assert not (tmp_path / "k12" / "config.json").exists()  # refused before the run claims its folder


def test_text_negatives_study_counts_the_hard_negatives_among_a_querys_candidates(tmp_path, capsys):
    """With a hard-negatives column a query's "all" is B - 1 + B * H candidates: K = B - 1 is a sampled
    K (it was run as all and labelled K = B - 1 merged into "all (B - 1)"); a K the symmetric term
    cannot take is refused before the study writes anything."""
    from negbatch.cli import main

    path = _hard_pairs(tmp_path)
    common = ["--data", f"pairs:{path}", "--query-column", "q", "--document-column", "d",
              "--hard-negatives-column", "h", "--test-fraction", "0.25", "--batch-size", "4", "--steps", "1",
              "--text-dim", "16", "--text-heads", "2", "--vocab-size", "300", "--seeds", "0"]
    out = tmp_path / "study"
    assert main(["study", "negatives", *common, "--ks", "3,all", "--out", str(out)]) == 0, capsys.readouterr().err
    assert sorted(json.loads((out / "study.json").read_text())["ks"], key=str) == [3, "all"]
    assert sorted(str(r["negatives"]) for r in json.loads((out / "results.json").read_text())) == ["3", "all"]
    assert "all (11)" in (out / "report.md").read_text()
    refused = tmp_path / "refused"
    assert main(["study", "negatives", *common, "--ks", "5", "--out", str(refused)]) != 0
    assert "negatives=5 exceeds the 3 in-batch candidates per document of the symmetric term" in capsys.readouterr().err
    assert not refused.exists()


def test_bad_configurations_name_the_field():
    with pytest.raises(ValueError, match="dataset: expected one of .*pairs:PATH"):
        TrainConfig(dataset="wiki")
    with pytest.raises(ValueError, match="heads: must divide text_dim"):
        TrainConfig(dataset="bible", text_dim=10, text_heads=4)
    with pytest.raises(ValueError, match="sampler: expected one of random, gcbs, hard, no-duplicates for text data"):
        TrainConfig(dataset="bible", sampler="best")
    with pytest.raises(ValueError, match="max_pairs: applies to text data sets only"):
        TrainConfig(dataset="digits", max_pairs=100)
    with pytest.raises(ValueError, match="encoder_widths: applies to image data sets only"):
        TrainConfig(dataset="bible", encoder_widths=(4,))
    with pytest.raises(ValueError, match="loss: expected one of infonce, global, dcl, siglip for text data"):
        TrainConfig(dataset="bible", loss="relic")
    with pytest.raises(ValueError, match="give one of them, not both"):
        TrainConfig(dataset="bible", epochs=2, steps=3)
    with pytest.raises(ValueError, match="negatives=8 exceeds the 7 in-batch candidates"):
        train(TrainConfig(**{**TINY, "negatives": 8}), "/tmp/never-created-by-negbatch-test")
    with pytest.raises(ValueError, match="batch_size \\(64\\) is larger"):
        train(TrainConfig(dataset="builtin", test_fraction=0.25, text_dim=16, text_heads=2, vocab_size=600),
              "/tmp/never-created-by-negbatch-test")
    assert TrainConfig(dataset="bible", epochs=2).steps is None


def test_max_pairs_above_the_pairs_of_the_data_is_refused(tmp_path, capsys):
    """max_pairs over the data trained on every pair without a word, as if the data were that large
    (n_train over the images is refused alike)."""
    from negbatch.cli import main

    assert sum(map(len, load_text_split(TrainConfig(**{**TINY, "max_pairs": 40})))) == 40  # all of them: fine
    with pytest.raises(ValueError, match="max_pairs=41 exceeds the 40 pairs of 'builtin'; use at most 40"):
        load_text_split(TrainConfig(**{**TINY, "max_pairs": 41}))
    out = tmp_path / "study"
    assert main(["study", "negatives", *TINY_CLI, "--test-fraction", "0.25", "--max-pairs", "100", "--ks", "all",
                 "--seeds", "0", "--out", str(out)]) == 2
    assert "max_pairs=100 exceeds the 40 pairs of 'builtin'; use at most 40" in capsys.readouterr().err
    assert not out.exists()


def test_sweep_rows_and_rerun(tmp_path):
    base = TrainConfig(**{**TINY, "steps": 1})
    rows = run_configs([base, base.replace(seed=1)], tmp_path)
    assert len(rows) == 2 and len(json.loads((tmp_path / "results.json").read_text())) == 2
    with pytest.raises(ValueError, match="identical"):
        run_configs([base, base], tmp_path)


def test_study_negatives_on_text(tmp_path, capsys, monkeypatch):
    from negbatch.cli import main

    out = tmp_path / "study"
    args = ["study", "negatives", *TINY_CLI, "--ks", "2,5,100", "--seeds", "0", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    spec = json.loads((out / "study.json").read_text())
    assert spec["ks"] == [2, 5, "all"] and spec["modality"] == "text" and spec["base"]["dataset"] == "builtin"
    assert spec["base"]["test_fraction"] == 0.25  # the text studies' default on the built-in pairs
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 3 and {r["negatives"] for r in rows} == {2, 5, "all"}  # 100 >= 7 candidates: all
    assert all(0 <= r["recall@1"] <= r["recall@5"] <= r["recall@10"] <= 1 for r in rows)
    assert all(r["steps"] == 3 and r["temperature"] == 0.05 for r in rows)
    report = (out / "report.md").read_text()
    assert "ndcg@10" in report and "all (7)" in report and (out / "retrieval_vs_k.png").exists()
    figures_not_drawn(monkeypatch)  # drawn above
    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == stamps  # finished runs skipped
    assert "3 finished earlier (skipped)" in capsys.readouterr().err
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").exists()


def test_text_negatives_report_counts_the_untrained_baseline_once_per_seed(tmp_path, capsys):
    """Every run of a seed repeats its untrained encoder's score; the baseline's spread is over seeds,
    not over runs (counted once per K it read too small: 0.570 ± 0.006 for ± 0.007 on the Bible pairs)."""
    from negbatch.cli import main
    from negbatch.lab.stats import fmt_mean_std

    out = tmp_path / "study"
    assert main(["study", "negatives", *TINY_CLI, "--ks", "2,100", "--seeds", "0,1", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())
    for key, name in (("untrained_recall@1", "Recall@1"), ("untrained_ndcg@10", "nDCG@10")):
        per_seed = {r["seed"]: r[key] for r in rows}
        assert all(r[key] == per_seed[r["seed"]] for r in rows)  # the seed's encoder, whatever K
        right, counted_per_run = fmt_mean_std(per_seed.values()), fmt_mean_std(r[key] for r in rows)
        assert right != counted_per_run  # the data tell the two apart
        assert f"{name} {right}" in (out / "report.md").read_text()


def test_text_study_defaults_match_the_old_text_studies():
    # The text studies' defaults (8,000 Bible pairs, 120 steps, B = 64, lr 1e-3, temperature 0.05):
    # the same runs, hence the same numbers, as before the studies shared one configuration.
    import argparse

    from negbatch.lab.studies import get_study

    study = get_study("negatives", "text")
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    bible = study.base_config(parser.parse_args(["--data", "bible"]))
    assert (bible.max_pairs, bible.steps, bible.batch_size, bible.lr, bible.temperature, bible.test_fraction) == (
        8000, 120, 64, 1e-3, 0.05, 0.1)
    assert (bible.text_dim, bible.text_depth, bible.text_heads, bible.vocab_size, bible.max_length, bible.dropout,
            bible.symmetric, bible.weight_decay, bible.optimizer, bible.schedule) == (
        64, 1, 4, 8000, 64, 0.1, True, 0.01, "adamw", "constant")
    assert study.base_config(parser.parse_args(["--data", "bible", "--max-pairs", "0"])).max_pairs is None
    assert study.base_config(parser.parse_args(["--data", "builtin"])).test_fraction == 0.25
    epochs = study.base_config(parser.parse_args(["--data", "bible", "--epochs", "2"]))
    assert (epochs.epochs, epochs.steps) == (2, None)


def test_a_query_with_several_positives_stays_on_one_side_of_the_split(tmp_path):
    from negbatch.lab.tasks.text import load_text_split

    path = tmp_path / "several.jsonl"
    rows = [{"query": f"question {i // 3}", "document": f"answer {i // 3} variant {i % 3}"} for i in range(300)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, test = load_text_split(TrainConfig(dataset=f"pairs:{path}", test_fraction=0.2))
    assert len(train) + len(test) == 300 and len(test) >= 30
    assert not set(train.queries) & set(test.queries)  # each query's three pairs on one side


def test_no_text_is_on_both_sides_of_the_users_split(tmp_path):
    # A document of three queries, and pairs given both ways round ((a, b) and (b, a)): a test
    # document (or query) trained on is a leak, as a test query trained on is.
    path = tmp_path / "shared.jsonl"
    rows = [{"query": f"question {i}", "document": f"answer {i // 3}"} for i in range(150)]
    rows += [{"query": f"left {i}", "document": f"right {i}"} for i in range(50)]
    rows += [{"query": f"right {i}", "document": f"left {i}"} for i in range(50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, test = load_text_split(TrainConfig(dataset=f"pairs:{path}", test_fraction=0.2))
    assert len(train) + len(test) == 250 and len(test) >= 25
    assert not set(train.queries + train.documents) & set(test.queries + test.documents)


def test_no_test_text_reaches_training_as_a_hard_negative(tmp_path):
    """Mined hard negatives are often other pairs' texts: a training query's hard negative that is a test
    document (or query) trained on a test text (34 of 160 training pairs here did). Pairs linked by a hard
    negative now stay on one side, as pairs that share a query or document do."""
    path = tmp_path / "mined.jsonl"
    # Pairs 2k and 2k + 1 are each other's hard negatives (a document and a query); "noise" is no pair's text.
    rows = [{"query": f"question {i}", "document": f"answer {i}",
             "hard": [f"answer {i ^ 1}", f"question {i ^ 1}" if i % 4 < 2 else f"noise {i}"]} for i in range(200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, test = load_text_split(TrainConfig(dataset=f"pairs:{path}", hard_negatives_column="hard", test_fraction=0.2))
    assert len(train) + len(test) == 200 and len(test) >= 20
    test_texts = set(test.queries + test.documents)
    assert not {h for negatives in train.hard_negatives for h in negatives} & test_texts
    assert not set(train.queries + train.documents) & test_texts
    assert {i // 2 for i in train.ids}.isdisjoint(i // 2 for i in test.ids)  # each linked pair of rows on one side


def test_a_split_that_hard_negatives_link_into_one_group_says_so(tmp_path):
    """Each pair's hard negative the next pair's document: one group, which cannot be split; the error says why."""
    path = tmp_path / "chain.jsonl"
    rows = [{"query": f"question {i}", "document": f"answer {i}", "hard": [f"answer {(i + 1) % 50}"]} for i in range(50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"left (0 training and 50|50 training and 0) test pairs.*a hard negative "
                                         r"that is another pair's query or document.*largest such group holds 50 of "
                                         r"the 50 pairs"):
        load_text_split(TrainConfig(dataset=f"pairs:{path}", hard_negatives_column="hard", test_fraction=0.2))


def test_study_on_the_users_pairs_file_and_errors(tmp_path, capsys):
    from negbatch.cli import main
    from negbatch.data.text import builtin_pairs

    pairs = builtin_pairs()
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in zip(pairs.queries, pairs.documents)))
    assert main(["study", "negatives", *TINY_CLI[2:], "--data", f"pairs:{path}", "--test-fraction", "0.25",
                 "--ks", "all", "--seeds", "0", "--symmetric", "false", "--out", str(tmp_path / "s")]) == 0
    row = json.loads((tmp_path / "s" / "results.json").read_text())[0]
    assert row["symmetric"] is False and row["dataset"] == f"pairs:{path}"
    capsys.readouterr()
    cases = [(["--data", "wiki"], "pairs:PATH"), (["--data", f"pairs:{tmp_path / 'nope.jsonl'}"], "nope.jsonl"),
             (["--data", "builtin"], "--batch-size 64 exceeds the 34 training pairs")]  # default batch 64 > 34 pairs
    for extra, message in cases:
        assert main(["study", "negatives", *extra, "--out", str(tmp_path / "bad")]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "bad").exists()


def test_study_gradcache_on_text(tmp_path, capsys):
    from negbatch.cli import main

    out = tmp_path / "gc"
    # --budget pairs (the default): no --steps (it was ignored; now it is refused).
    assert main(["study", "gradcache", *TINY_CLI[:2], *TINY_CLI[6:], "--batch-sizes", "4,16", "--chunk-size", "4",
                 "--seeds", "0", "--out", str(out)]) == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())
    spec = json.loads((out / "study.json").read_text())
    assert spec["study"] == "gradcache" and spec["modality"] == "text"
    n_train = rows[0]["num_train_pairs"]
    assert sorted((r["batch_size"], r["chunk_size"], r["steps"]) for r in rows) == sorted(
        [(4, None, n_train // 4), (16, 4, n_train // 16)])  # same pairs seen; cache only when B > chunk
    mem = spec["saved_activation_bytes"]
    assert mem["16"]["with_cache"] < mem["16"]["without_cache"] / 2
    assert "Activation memory" in (out / "report.md").read_text() and (out / "retrieval_vs_batch_size.png").exists()
    # B = 4 <= the chunk: its runs took plain steps, so its "with cache" cell is not applicable (it held a
    # measurement of a cache no run used), in a folder of this version and in one written before.
    assert mem["4"]["with_cache"] is None
    report = (out / "report.md").read_text()
    assert re.search(r"^\| 4 \|.*\| n/a \|$", report, flags=re.M) and "n/a with cache where B ≤ 4" in report
    assert not re.search(r"^\| 16 \|.*\| n/a \|$", report, flags=re.M)
    (out / "study.json").write_text(json.dumps({**spec, "saved_activation_bytes": {**mem, "4": {
        "with_cache": mem["4"]["without_cache"], "without_cache": mem["4"]["without_cache"]}}}))
    from negbatch.lab.studies import report_folder

    assert re.search(r"^\| 4 \|.*\| n/a \|$", report_folder(out).read_text(), flags=re.M)
    for extra, message in ((["--steps", "3"], "--steps applies with --budget steps"),
                           (["--pairs", "6"], "--pairs: with --budget pairs, at least the largest batch size (16")):
        # 6 pairs at B = 16 took one step of 16 pairs, and the report said every B saw 6.
        assert main(["study", "gradcache", *TINY_CLI[:2], *TINY_CLI[6:], "--batch-sizes", "4,16", *extra,
                     "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_saved_activation_bytes_grow_with_the_batch_not_with_the_cache():
    from negbatch.lab.studies.text_gradcache import saved_activation_bytes

    cfg = TrainConfig(**TINY)
    plain = [saved_activation_bytes(cfg.replace(batch_size=b), 0) for b in (4, 16, 32)]
    cached = [saved_activation_bytes(cfg.replace(batch_size=b), 4) for b in (4, 16, 32)]
    assert plain[0] < plain[1] < plain[2]
    # B = chunk: the cache re-encodes queries and documents one after the other, so it holds
    # one input's graph at a time, about half of a plain step's (both inputs' graphs).
    assert cached[0] == pytest.approx(plain[0] / 2, rel=0.2)
    assert max(cached) < plain[1] / 2  # bounded by one chunk's graph (plus the small loss graph)


def test_saved_activation_bytes_encode_the_hard_negatives_with_the_runs_loss(tmp_path):
    """A run with a hard-negatives column encodes B * H more documents each step; the memory the
    gradcache study reports left them out (and measured InfoNCE whatever --loss was)."""
    from negbatch.lab.studies.text_gradcache import saved_activation_bytes

    path = _hard_pairs(tmp_path)
    cfg = TrainConfig(dataset=f"pairs:{path}", query_column="q", document_column="d", hard_negatives_column="h",
                      test_fraction=0.25, batch_size=8, steps=1, text_dim=16, text_heads=2, vocab_size=300)
    plain = saved_activation_bytes(cfg.replace(hard_negatives_column=None), 0)
    hard = saved_activation_bytes(cfg, 0)
    assert hard > 1.5 * plain  # queries 8 + documents 8 + hard negatives 16 texts against 16
    assert saved_activation_bytes(cfg, 4) < hard / 2  # chunks of the hard negatives too
    for loss in ("dcl", "siglip", "global"):
        assert saved_activation_bytes(cfg.replace(loss=loss, negatives=3), 0) > 1.5 * plain


@pytest.mark.parametrize("sampler", ["gcbs", "hard", "no-duplicates"])
def test_sampler_batches_are_full_disjoint_and_seeded(sampler):
    from negbatch.lab.tasks.text import TextTask

    cfg = TrainConfig(**{**TINY, "sampler": sampler})

    def first_epoch():
        task = TextTask(cfg, torch.device("cpu"))
        torch.manual_seed(0)
        task.build()
        task.model.train()
        task.sampler.set_epoch(0)
        return [list(map(int, b)) for b in task.sampler], task

    first, task = first_epoch()
    again, _ = first_epoch()
    assert first == again and task.model.training  # seeded; the encoder's mode is restored
    flat = [i for b in first for i in b]
    n = len(task.train)
    assert all(len(b) == cfg.batch_size for b in first) and len(first) == n // cfg.batch_size
    assert len(set(flat)) == len(flat) and all(0 <= i < n for i in flat)


@pytest.mark.parametrize("sampler,unsupervised", [("gcbs", False), ("gcbs", True), ("hard", False)])
def test_samplers_embed_each_text_they_use_once(sampler, unsupervised):
    # GCBS needs queries and documents, hard batches the queries; unsupervised,
    # the documents are the queries (in eval mode, the same embedding).
    from negbatch.lab.tasks.text import TextTask

    cfg = TrainConfig(**{**TINY, "sampler": sampler, "unsupervised": unsupervised, "dropout": 0.1})
    task = TextTask(cfg, torch.device("cpu"))
    task.build()
    embedded = []
    task.model.register_forward_hook(lambda module, args, out: embedded.append(out.shape[0]))
    task.sampler.set_epoch(0)
    batches = list(task.sampler)
    sides = 2 if sampler == "gcbs" and not unsupervised else 1
    assert batches and sum(embedded) == sides * len(task.train)


def test_study_batches_on_text(tmp_path, capsys):
    from negbatch.cli import main

    out = tmp_path / "tb"
    assert main(["study", "batches", *TINY_CLI[:2], *TINY_CLI[6:], "--batch-size", "8", "--samplers", "random,gcbs",
                 "--seeds", "0", "--out", str(out)]) == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())
    assert sorted(r["sampler"] for r in rows) == ["gcbs", "random"]
    assert all(r["steps"] == r["num_train_pairs"] // 8 for r in rows)  # one epoch by default
    assert "gcbs** vs random" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["study", "batches", "--data", "builtin", "--samplers", "best", "--out", str(tmp_path / "x")]) == 2
    assert "unknown sampler" in capsys.readouterr().err


def test_study_batches_on_text_keeps_a_config_files_length(tmp_path, capsys):
    """A --config file's steps (or epochs) set the runs' length, as in every other study; the study's own
    default (one epoch) applied over them silently. --epochs and --steps together are refused."""
    from negbatch.cli import main

    common = ["study", "batches", *TINY_CLI[:2], *TINY_CLI[6:], "--batch-size", "8", "--samplers", "random",
              "--seeds", "0"]
    for line, expected in (("steps = 3", lambda n: 3), ("epochs = 2", lambda n: 2 * (n // 8))):
        config = tmp_path / f"{line[0]}.toml"
        config.write_text(line + "\n")
        out = tmp_path / line[0]
        assert main([*common, "--config", str(config), "--out", str(out)]) == 0, capsys.readouterr().err
        (row,) = json.loads((out / "results.json").read_text())
        assert row["steps"] == expected(row["num_train_pairs"])
    config = tmp_path / "s.toml"
    assert main([*common, "--config", str(config), "--steps", "2", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "results.json").read_text())[0]["steps"] == 2  # the command line wins
    capsys.readouterr()
    assert main([*common, "--epochs", "3", "--steps", "5", "--out", str(tmp_path / "both")]) == 2
    assert "give --epochs or --steps, not both" in capsys.readouterr().err


def test_text_gradcache_finding_with_one_seed_gives_no_verdict():
    from negbatch.lab.studies.text_gradcache import _finding

    mem = {str(b): {"with_cache": 2**20, "without_cache": 2**21} for b in (4, 16)}
    spec = {"budget": "pairs", "saved_activation_bytes": mem, "chunk_size": 4}
    by_b = {4: [{"ndcg@10": 0.30, "batch_size": 4}], 16: [{"ndcg@10": 0.31, "batch_size": 16}]}
    text = _finding([4, 16], by_b, spec)
    assert "With one seed per batch size there is no test" in text and "within seed noise" not in text


@pytest.mark.parametrize("study, options, says", [
    ("negatives", ["--batch-size", "8", "--ks", "2", "--epochs", "1", "--optimizer", "adam"],
     ["1 epoch of Adam (weight decay 0.01)"]),
    ("batches", ["--batch-size", "8", "--samplers", "random", "--loss", "dcl", "--negatives", "3", "--optimizer", "sgd"],
     ["DCL (query_document, 3 sampled negatives per query", "steps of SGD (momentum 0.9, weight decay 0.01) lr 0.001"]),
    ("gradcache", ["--batch-sizes", "4,8", "--chunk-size", "4", "--loss", "siglip", "--optimizer", "adam"],
     ["SigLIP (query_document, all in-batch negatives", "Adam (weight decay 0.01) lr 0.001 for every batch size"]),
])
def test_text_study_reports_name_the_loss_optimizer_and_length_the_runs_trained(tmp_path, capsys, study, options, says):
    """The three text reports said InfoNCE with every in-batch negative and AdamW, whatever --loss, --negatives and
    --optimizer the runs trained with, and "None steps" for a negatives study given --epochs."""
    from negbatch.cli import main

    out = tmp_path / study
    assert main(["study", study, *TINY_CLI[:2], *TINY_CLI[6:], "--seeds", "0", *options, "--out", str(out)]) == 0, \
        capsys.readouterr().err
    run = json.loads((out / "results.json").read_text())[0]
    header = (out / "report.md").read_text().split("\n\n")[1]
    for words in says:
        assert words in header, header
    assert "None" not in header and ("AdamW" in header) == (run["optimizer"] == "adamw")
    assert ("InfoNCE" in header) == (run["loss"] == "infonce")
