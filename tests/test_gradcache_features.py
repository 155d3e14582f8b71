"""GradCache on tokenizer-style inputs whose dicts hold entries that are not tensors.

sentence-transformers 6 puts ``"modality": "text"`` into its features; other
tokenizers add flags, names or None. Such entries must reach every chunk
unchanged, and the cached gradient must still be the full-batch gradient
(float64, compared with a plain step on the whole batch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from negbatch import GradCache, InfoNCE

OPTIONS = {"pool": "mean", "scale": 2.0}
TAGS = ["a", "b"]


class DictEncoder(nn.Module):
    """Embeds token ids and mean-pools over the mask; checks the constants it is given."""

    def __init__(self, options: dict = OPTIONS) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.options = options
        self.emb = nn.Embedding(50, 6).double()
        self.proj = nn.Linear(6, 4).double()
        self.calls = 0

    def forward(self, input_ids, attention_mask, modality, flag, options, tags, nested):
        assert modality == "text" and flag is None and options is self.options and tags is TAGS
        assert nested["name"] == "inner" and nested["weight"].shape[0] == input_ids.shape[0]
        self.calls += 1
        mask = attention_mask.unsqueeze(-1).double()
        pooled = (self.emb(input_ids) * mask).sum(1) / mask.sum(1)
        return self.proj(pooled) * nested["weight"].unsqueeze(1) * options["scale"]


def features(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, 5), generator=g)
    mask = torch.ones(n, 5, dtype=torch.long)
    mask[::2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "modality": "text", "flag": None, "options": OPTIONS,
            "tags": TAGS, "nested": {"weight": torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
                                     "name": "inner"}}


def grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_non_tensor_entries_reach_every_chunk_and_the_gradient_is_exact(chunk):
    enc = DictEncoder()
    loss_fn = InfoNCE(temperature=0.3, form="query_document")
    q, d = features(7, 1), features(7, 2)
    plain = loss_fn(enc(**q), enc(**d))
    plain.backward()
    expected = grads(enc)
    enc.zero_grad()
    enc.calls = 0
    loss = GradCache(enc, loss_fn, chunk_size=chunk).step(q, d)
    n_chunks = -(-7 // chunk)
    assert enc.calls == 2 * 2 * n_chunks  # both inputs, both passes, every chunk saw the constants
    assert float(loss) == pytest.approx(float(plain.detach()), rel=1e-12)
    for got, want in zip(grads(enc), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert q["modality"] == "text" and set(q) == {"input_ids", "attention_mask", "modality", "flag", "options",
                                                  "tags", "nested"}


class WritingEncoder(nn.Module):
    """Like sentence-transformers' modules: writes its outputs into the dict it is given."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(3, 4).double()
        self.seen_keys: list[set] = []

    def forward(self, feats: dict, mode: str):
        assert mode == "train"
        self.seen_keys.append(set(feats))
        feats["token_embeddings"] = self.lin(feats["x"])
        feats["sentence_embedding"] = feats["token_embeddings"] * 2
        return feats


def test_list_input_with_a_dict_and_a_string_and_an_encoder_that_writes_into_its_input():
    enc = WritingEncoder()
    g = torch.Generator().manual_seed(3)
    a = {"x": torch.randn(6, 3, generator=g, dtype=torch.float64), "modality": "text"}
    b = {"x": torch.randn(6, 3, generator=g, dtype=torch.float64), "modality": "text"}
    loss_fn = InfoNCE(temperature=0.5)
    pick = lambda out: out["sentence_embedding"]  # noqa: E731
    plain = loss_fn(pick(enc(dict(a), "train")), pick(enc(dict(b), "train")))
    plain.backward()
    expected = grads(enc)
    enc.zero_grad()
    enc.seen_keys.clear()
    GradCache(enc, loss_fn, chunk_size=4, output_fn=pick).step([a, "train"], [b, "train"])
    # The second pass gets a fresh dict: no activation of the first pass is left in it.
    assert all(keys == {"x", "modality"} for keys in enc.seen_keys) and len(enc.seen_keys) == 8
    assert set(a) == {"x", "modality"}
    for got, want in zip(grads(enc), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_inputs_without_tensors_or_with_foreign_arrays_are_refused():
    enc = DictEncoder()
    cache = GradCache(enc, InfoNCE(), chunk_size=2)
    with pytest.raises(TypeError, match="input 0 holds no tensor"):
        cache.step("a text", features(4, 0))
    with pytest.raises(TypeError, match="input 1 holds no tensor"):
        cache.step(features(4, 0), ["a text", "another"])
    with pytest.raises(TypeError, match=r"input 0\['input_ids'\] is a ndarray.*torch tensors"):
        cache.step({**features(4, 0), "input_ids": np.zeros((4, 5), dtype=np.int64)}, features(4, 1))
    with pytest.raises(ValueError, match="share their batch length"):
        cache.step({**features(4, 0), "nested": {"weight": torch.ones(3), "name": "inner"}}, features(4, 1))
    assert enc.calls == 0  # every check runs before any forward


def test_a_numpy_scalar_is_a_constant():
    opts = {"pool": "mean", "scale": np.float64(2.0)}
    enc = DictEncoder(opts)
    q, d = features(4, 0), features(4, 1)
    q["options"] = d["options"] = opts
    GradCache(enc, InfoNCE(form="query_document"), chunk_size=3).step(q, d)
    assert enc.calls == 8  # 2 inputs x 2 chunks x 2 passes
