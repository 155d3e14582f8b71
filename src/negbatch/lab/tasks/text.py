"""The text task: a dual encoder trained on (query, document) pairs.

One shared transformer encoder
(:class:`negbatch.models.text.TransformerTextEncoder`) embeds queries,
documents and any hard negatives; ``InfoNCE(form="query_document")`` (or the
bias-corrected ``GlobalInfoNCE``) contrasts each query with the batch's other
documents. The trained encoder is evaluated by Recall@1/5/10, MRR@10 and
nDCG@10 of the test queries against the test corpus
(:func:`negbatch.evaluation.retrieval.evaluate_retrieval`), as is the same
encoder before training (``untrained_*``).

Data (``dataset``):

* ``"bible"`` -- ASV -> BBE verse pairs, split by chapter
  (:func:`negbatch.data.text.bible_pairs`; ``max_pairs`` subsamples before the
  split, so the split stays leakage-free);
* ``"builtin"`` -- the 40 built-in pairs (tests, smoke runs), split by pair;
* ``"pairs:PATH"`` -- the user's JSONL/CSV file
  (:func:`negbatch.data.text.load_pairs`, with ``query_column``,
  ``document_column`` and ``hard_negatives_column``), split by pair, pairs that
  share a text (query or document, or a hard negative that is another pair's
  query or document) on one side.

The split uses ``data_seed`` (not the run's ``seed``), so every seed of a study
sees the same test corpus. The WordPiece tokenizer is trained on the training
side only.
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from ... import distributed as nbdist
from ..config import TrainConfig
from ..objective import batch_loss, needs_indices
from .base import Task

__all__ = ["TextTask", "TEXT_METRICS", "load_text_split", "check_negatives", "text_tokenizer", "text_identity",
           "self_pairs", "starting_model", "pretrained"]

TEXT_METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")


def _pairs_path(dataset: str) -> str | None:
    return dataset.split(":", 1)[1].strip() if dataset.startswith("pairs:") else None


def load_text_split(cfg: TrainConfig):
    """(train, test) :class:`~negbatch.data.text.TextPairs` of a text configuration (cached per process)."""
    return _load_text_split(cfg.dataset, cfg.max_pairs, cfg.test_fraction, cfg.data_seed, cfg.query_column,
                            cfg.document_column, cfg.hard_negatives_column)


@lru_cache(maxsize=4)
def _load_text_split(dataset, max_pairs, test_fraction, data_seed, query_column, document_column, hard_column):
    from ...data.text import bible_pairs, builtin_pairs, load_pairs, split_by_group

    group = None  # the Bible's: whole chapters
    if dataset == "bible":
        split = bible_pairs(test_fraction=test_fraction, seed=data_seed, max_pairs=max_pairs)
        train, test = split.train, split.test
    else:
        path = _pairs_path(dataset)
        pairs = builtin_pairs() if path is None else load_pairs(
            path, query_column=query_column, document_column=document_column, hard_negatives_column=hard_column)
        if max_pairs is not None and max_pairs > len(pairs):
            # As n_train over the images: taken as all of them, it trained on fewer pairs than asked without a word.
            raise ValueError(f"max_pairs={max_pairs} exceeds the {len(pairs)} pairs of {dataset!r}; use at most "
                             f"{len(pairs)}")
        if max_pairs is not None and max_pairs < len(pairs):
            order = list(range(len(pairs)))
            random.Random(data_seed).shuffle(order)
            pairs = pairs.subset(sorted(order[:max_pairs]))
        group = _shared_text_groups(pairs)
        train, test = split_by_group(pairs, group.__getitem__, test_fraction=test_fraction, seed=data_seed)
    if len(test) < 2 or len(train) < 2:
        hint = " (the built-in 40 pairs: --test-fraction 0.25 holds out 6 at --data-seed 0)" if dataset == "builtin" else ""
        raise ValueError(f"dataset {dataset!r}: the split left {len(train)} training and {len(test)} test pairs; "
                         f"use more pairs (max_pairs) or another test_fraction{hint}{_largest_group(group)}")
    return train, test


def _largest_group(group: dict | None) -> str:
    """Why a split of pairs can be lopsided: pairs linked by their texts stay together (``group``: pair id ->
    its group, see :func:`_shared_text_groups`)."""
    if not group:
        return ""
    size = max(collections.Counter(group.values()).values())
    if size < 2:
        return ""
    return (f"; the pairs linked by a shared text (a query, a document, or a hard negative that is another pair's "
            f"query or document) stay on one side of the split, and the largest such group holds {size} of the "
            f"{len(group)} pairs")


def _shared_text_groups(pairs) -> dict:
    """Pair id -> its split group: pairs linked by a shared text (a query with several positives,
    a document of several queries, a text that is one pair's query and another's document, a
    hard negative that is another pair's query or document) form one group, named by its first
    pair's id, so no text is on both sides of the split and no test text is trained on as a hard
    negative (data without repeated texts splits pair by pair). A hard negative that is no pair's
    query or document links nothing: the evaluation never reads the test side's hard negatives."""
    parent = list(range(len(pairs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def link(i: int, j: int) -> None:
        a, b = root(i), root(j)
        parent[max(a, b)] = min(a, b)  # the root is the group's first pair

    first: dict[str, int] = {}
    for i, (q, d) in enumerate(zip(pairs.queries, pairs.documents)):
        for text in (q, d):
            link(i, first.setdefault(text, i))
    for i, negatives in enumerate(pairs.hard_negatives or ()):  # after every pair's texts: a later pair's count
        for text in negatives:
            if text in first:
                link(i, first[text])
    return {pair_id: pairs.ids[root(i)] for i, pair_id in enumerate(pairs.ids)}


def check_negatives(cfg: TrainConfig, hard_negatives: int) -> None:
    """Refuse ``cfg.negatives`` above what an anchor has to sample from, naming the direction that lacks them.

    A query contrasts the batch's B - 1 other documents and every hard negative of the batch (B * H),
    so K may exceed B - 1 with a hard-negatives column; the symmetric term's documents have only the
    B - 1 other queries, so with it K <= B - 1 (the loss samples K in each direction)."""
    k, b = cfg.negatives, cfg.batch_size
    if k == "all":
        return
    per_query = b - 1 + b * hard_negatives
    if k > per_query:
        hard = f" + its {b * hard_negatives} hard negatives" if hard_negatives else ""
        raise ValueError(f"negatives={k} exceeds the {per_query} in-batch candidates per query ({b - 1} other "
                         f"documents of the batch{hard}) at batch_size={b}; use negatives <= {per_query} or 'all'")
    if cfg.symmetric and k > b - 1:
        raise ValueError(f"negatives={k} exceeds the {b - 1} in-batch candidates per document of the symmetric "
                         f"term (the batch's other queries) at batch_size={b}; use negatives <= {b - 1}, 'all' "
                         "or symmetric=false")


def text_tokenizer(cfg: TrainConfig, train):
    """The WordPiece tokenizer trained on the training side (cached per process; deterministic)."""
    return _tokenizer(cfg.dataset, cfg.max_pairs, cfg.test_fraction, cfg.data_seed, cfg.query_column,
                      cfg.document_column, cfg.hard_negatives_column, cfg.vocab_size, cfg.max_length)


@lru_cache(maxsize=4)
def _tokenizer(dataset, max_pairs, test_fraction, data_seed, query_column, document_column, hard_column, vocab_size,
               max_length):
    from ...models.text import TextTokenizer

    train, _ = _load_text_split(dataset, max_pairs, test_fraction, data_seed, query_column, document_column,
                                hard_column)
    return TextTokenizer.train(train.queries + train.documents, vocab_size=vocab_size, max_length=max_length)


def self_pairs(pairs):
    """Each query paired with itself (``unsupervised``: SimCSE's positives, two dropout masks
    of one text); the documents and any hard negatives are left out."""
    from ...data.text import TextPairs

    return TextPairs(pairs.queries, list(pairs.queries), pairs.ids)


def text_identity(name: str, source: str | None, train, test) -> dict[str, Any]:
    """Name, source, sizes and a sha256 of every text of both sides."""
    digest = hashlib.sha256()
    for side in (train, test):
        digest.update(json.dumps([side.queries, side.documents, side.hard_negatives]).encode())
    return {"name": name, "source": source, "train": len(train), "test": len(test),
            "hard_negatives": train.num_hard_negatives if train.hard_negatives is not None else 0,
            "fingerprint": digest.hexdigest()}


def _to(features: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in features.items()}


class TextTask(Task):
    """A shared encoder on (query, document[, hard negatives]) pairs."""

    def __init__(self, cfg: TrainConfig, device: torch.device, data: Any = None) -> None:
        super().__init__(cfg, device)
        if data is not None:
            self.train, self.test = data
            source = None
        else:
            self.train, self.test = load_text_split(cfg)
            source = _pairs_path(cfg.dataset)
        if cfg.batch_size > len(self.train):
            raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the {len(self.train)} training pairs; "
                             "lower batch_size")
        check_negatives(cfg, self.train.num_hard_negatives)
        if cfg.unsupervised:  # the vocabulary too is learnt from the queries alone
            self.train = self_pairs(self.train)
        self.data_identity = text_identity(cfg.dataset, source, self.train, self.test)
        self.tokenizer = text_tokenizer(cfg, self.train) if data is None and not cfg.unsupervised \
            else self._own_tokenizer()
        self.untrained: dict[str, float] = {}

    def _own_tokenizer(self):
        from ...models.text import TextTokenizer

        return TextTokenizer.train(self.train.queries + self.train.documents, vocab_size=self.cfg.vocab_size,
                                   max_length=self.cfg.max_length)

    def build(self) -> None:
        from ...losses import GlobalInfoNCE
        from ...models.text import TransformerTextEncoder
        from ..global_loss import GammaSchedule

        cfg = self.cfg
        gather = nbdist.world_size() > 1  # every process's embeddings are candidates
        self.model = TransformerTextEncoder(self.tokenizer.vocab_size, dim=cfg.text_dim, depth=cfg.text_depth,
                                            heads=cfg.text_heads, dropout=cfg.dropout,
                                            max_length=cfg.max_length).to(self.device)
        if cfg.loss == "global":
            n = len(self.train)
            gamma = GammaSchedule(cfg.gamma, cfg.gamma_schedule, cfg.total_steps(max(n // cfg.batch_size, 1)))
            self.loss_fn: nn.Module = GlobalInfoNCE(n, temperature=cfg.temperature, gamma=gamma,
                                                    negatives=cfg.negatives, form="query_document",
                                                    symmetric=cfg.symmetric, gather=gather,
                                                    learnable_temperature=bool(cfg.learnable_temperature))
        else:
            self.loss_fn = batch_loss(cfg, form="query_document", gather=gather)
        self.build_key_encoder()  # MoCo: the documents are keys of a momentum encoder
        self.sampler = self._build_sampler()
        # Dropout draws from each process's own stream: exact only on the same number of processes.
        self.world_size_invariant = cfg.dropout == 0

    def _build_sampler(self):
        from ...sampling import GCBSampler, HardNegativeBatchSampler, NoDuplicateBatchSampler, RandomBatchSampler

        cfg, n = self.cfg, len(self.train)
        common = dict(drop_last=True, seed=cfg.seed, refresh_every=cfg.refresh_every or None)
        if cfg.sampler == "random":
            # One running generator for every epoch's permutation (seeded by the run's seed).
            return RandomBatchSampler(n, cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed),
                                      shuffle_batches=False, **common)
        if cfg.sampler == "no-duplicates":
            return NoDuplicateBatchSampler(self.train.documents, cfg.batch_size, **common)
        embedding = dict(model=self.model, chunk_size=256)
        if cfg.sampler == "gcbs":
            return GCBSampler(self._embed, n, cfg.batch_size, q=cfg.gcbs_q, **embedding, **common)
        return HardNegativeBatchSampler(lambda i: self._embed_texts(self.train.queries, i), n, cfg.batch_size,
                                        **embedding, **common)

    def _embed(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The (query, document) embeddings of the training pairs ``indices`` (for GCBS)."""
        queries = self._embed_texts(self.train.queries, indices)
        if self.cfg.unsupervised:
            # Each query is its own document, and the sampler embeds in eval
            # mode (no dropout): the same embedding, computed once.
            return queries, queries.clone()
        return queries, self._embed_texts(self.train.documents, indices)

    def _embed_texts(self, texts: list[str], indices: Tensor) -> Tensor:
        return self.model(self._features([texts[i] for i in indices.tolist()])).float().cpu()

    def _features(self, texts: list[str]) -> dict:
        return _to(self.tokenizer(texts), self.device)

    def before_training(self) -> None:
        before = self._retrieval()
        self.untrained = {k: float(before[k]) for k in TEXT_METRICS}

    def batch(self, index: list[int], streams) -> dict[str, Any]:
        train = self.train
        out = {"index": torch.as_tensor(index, dtype=torch.long, device=self.device),
               "queries": self._features([train.queries[i] for i in index]),
               "documents": self._features([train.documents[i] for i in index])}
        if train.hard_negatives is not None:
            out["hard"] = self._features([t for i in index for t in train.hard_negatives[i]])
        return out

    def _loss_with_index(self, queries: Tensor, documents: Tensor, hard_negatives: Tensor | None = None, *,
                         generator: torch.Generator | None = None) -> Tensor:
        kwargs: dict[str, Any] = {"generator": generator}
        if hard_negatives is not None:
            kwargs["hard_negatives"] = hard_negatives.reshape(queries.shape[0], -1, queries.shape[1])
        if self.cfg.loss == "global":
            return self.loss_fn(queries, documents, self._index, **kwargs)
        if needs_indices(self.loss_fn):
            kwargs["indices"] = self._index
        return self.loss_fn(queries, documents, **kwargs)

    def step(self, batch: dict[str, Any], streams) -> Tensor:
        self._index = batch["index"]
        inputs = [batch["queries"], batch["documents"]] + ([batch["hard"]] if "hard" in batch else [])
        if self.cfg.chunk_size:
            from ...gradcache import GradCache

            cache = GradCache(self.net, self._loss_with_index, chunk_size=self.cfg.chunk_size,
                              autocast=self.precision.autocast_kwargs, scaler=self.precision.scaler)
            return cache.step(*inputs, generator=streams.loss)
        keys = self.key_encoder if self.key_encoder is not None else self.net
        with self.precision.autocast():
            value = self._loss_with_index(self.net(inputs[0]), *[keys(x) for x in inputs[1:]], generator=streams.loss)
        self.precision.backward(value)
        return value.detach()

    def step_metrics(self) -> dict[str, float]:
        last = getattr(self.loss_fn, "last_infonce", None)
        return {**({"infonce": float(last)} if last is not None else {}), **self.loss_fn.log_values()}

    def _retrieval(self) -> dict[str, Any]:
        from ...evaluation.retrieval import evaluate_retrieval

        return evaluate_retrieval(self.model, self.tokenizer, self.test, device=self.device)

    def evaluate(self) -> dict[str, Any]:
        metrics = self._retrieval()
        out: dict[str, Any] = {k: metrics[k] for k in TEXT_METRICS}
        out.update({f"untrained_{k}": self.untrained[k] for k in TEXT_METRICS})
        out.update({"num_train_pairs": len(self.train), "num_test_queries": metrics["num_queries"],
                    "num_test_documents": metrics["num_documents"]})
        if self.device.type == "cuda":
            out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        last = rows[-10:]
        return {"first_loss": rows[0]["loss"] if rows else None,
                "final_loss": sum(r["loss"] for r in last) / len(last) if last else None}

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss_fn.state_dict(), "untrained": dict(self.untrained), **self.key_encoder_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_fn.load_state_dict(state["loss"])
        self.load_key_encoder_state(state)
        self.untrained = dict(state["untrained"])


def pretrained(encoder: str | None) -> bool:
    """Whether a text run's encoder starts pre-trained (MiniLM), so its ``untrained_*`` metrics
    are a zero-shot model's, not the shared words' an untrained encoder reaches."""
    return encoder == "minilm"


def starting_model(encoder: str | None) -> str:
    """The model whose metrics are a text run's ``untrained_*``, for a report."""
    if pretrained(encoder):
        return "the pre-trained model before fine-tuning (zero-shot)"
    return "the untrained encoder"
