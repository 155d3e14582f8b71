"""A tiny end-to-end text run: the loss goes down, retrieval beats chance."""

from __future__ import annotations

import pytest
import torch

from negbatch import InfoNCE
from negbatch.data.text import TextPairs, builtin_pairs
from negbatch.evaluation.retrieval import evaluate_retrieval
from negbatch.text_training import indexed_loss_call, train_text_pairs

pytest.importorskip("tokenizers")
from negbatch.models.text import TextTokenizer, TransformerTextEncoder  # noqa: E402


def _setup(seed=0):
    pairs = builtin_pairs()
    tok = TextTokenizer.train(pairs.queries + pairs.documents, vocab_size=400, min_frequency=1, max_length=32)
    torch.manual_seed(seed)
    enc = TransformerTextEncoder(tok.vocab_size, dim=32, depth=1, heads=4, dropout=0.1, max_length=32)
    return pairs, tok, enc


def test_tiny_run_learns_and_retrieval_beats_chance():
    pairs, tok, enc = _setup()
    before = evaluate_retrieval(enc, tok, pairs)
    loss = InfoNCE(temperature=0.1, negatives=8, form="query_document", symmetric=True)
    result = train_text_pairs(enc, tok, pairs, loss, batch_size=20, steps=30, lr=5e-3, seed=0)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.5 * first
    after = evaluate_retrieval(enc, tok, pairs)
    # 40 documents: chance Recall@1 is 1/40, Recall@5 is 5/40. An untrained encoder already
    # beats chance on shared words, so training must also beat the untrained encoder.
    assert after["recall@1"] > 0.7 and after["recall@1"] > before["recall@1"] + 0.2
    assert after["recall@5"] > 0.9 and after["mrr@10"] > before["mrr@10"]
    assert after["num_documents"] == 40 and enc.training  # evaluation restores training mode


def test_runs_are_reproducible_for_a_seed():
    runs = []
    for _ in range(2):
        pairs, tok, enc = _setup(seed=1)
        loss = InfoNCE(form="query_document", negatives=4)
        runs.append(train_text_pairs(enc, tok, pairs, loss, batch_size=8, steps=4, seed=5).losses)
    assert runs[0] == runs[1]


def test_hard_negatives_reach_the_loss_with_their_shape():
    pairs, tok, enc = _setup()
    hard = TextPairs(pairs.queries, pairs.documents, hard_negatives=[[pairs.documents[(i + 1) % 40],
                                                                      pairs.documents[(i + 2) % 40]] for i in range(40)])
    seen = {}

    class Recording(torch.nn.Module):
        def forward(self, q, d, h):
            seen["shapes"] = (q.shape, d.shape, h.shape)
            return InfoNCE(form="query_document")(q, d, h)

    train_text_pairs(enc, tok, hard, Recording(), batch_size=6, steps=1)
    assert seen["shapes"] == ((6, 32), (6, 32), (6, 2, 32))


def test_indexed_call_passes_the_data_set_indices():
    pairs, tok, enc = _setup()
    seen = []

    class Indexed(torch.nn.Module):
        def forward(self, q, d, indices):
            # The indices must name the very pairs that were embedded.
            expected = enc.eval()(tok([pairs.queries[i] for i in indices.tolist()]))
            enc.train()
            seen.append(indices.tolist())
            assert expected.shape == q.shape
            return (q - d).pow(2).sum()

    train_text_pairs(enc, tok, pairs, Indexed(), batch_size=10, steps=8, loss_call=indexed_loss_call, lr=0.0)
    # 4 batches per epoch without replacement: each epoch covers all 40 pairs exactly once.
    assert sorted(sum(seen[:4], [])) == list(range(40)) and sorted(sum(seen[4:], [])) == list(range(40))


def test_rejects_bad_arguments():
    pairs, tok, enc = _setup()
    loss = InfoNCE(form="query_document")
    with pytest.raises(ValueError, match="larger than the number of pairs"):
        train_text_pairs(enc, tok, pairs, loss, batch_size=41, steps=1)
    with pytest.raises(ValueError, match="steps"):
        train_text_pairs(enc, tok, pairs, loss, batch_size=4, steps=0)
    with pytest.raises(TypeError, match="TextPairs"):
        train_text_pairs(enc, tok, list(pairs.queries), loss, batch_size=4, steps=1)
