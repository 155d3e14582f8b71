"""negbatch inside sentence-transformers' ``SentenceTransformerTrainer`` (extra ``st``).

* :class:`NegbatchLoss`: InfoNCE (all or K negatives, symmetric), ReLIC and
  GlobalInfoNCE as sentence-transformers losses, with any number of negative
  columns; ``cached=True`` / ``chunk_size=`` runs them through GradCache with
  exact gradients. :func:`with_index_column` adds the data-set index column
  that GlobalInfoNCE's per-sample state is keyed by.
* Batch samplers for ``SentenceTransformerTrainingArguments(batch_sampler=...)``:
  :class:`GCBSBatches` (global contrastive batch sampling, re-planned from the
  model being trained each epoch or every N batches), :class:`HardNegativeBatches`,
  :class:`NoDuplicateBatches` and :class:`RandomBatches`. Pass the same object
  in ``callbacks=[...]`` as well: a resumed run then replays the epoch's batches
  exactly.
* :class:`NegbatchDiagnostics`: gradient SNR, the global-minus-training loss
  gap and the fraction of false (same-label) negatives per batch, logged with
  the trainer's metrics.
* :class:`NegbatchLossState`: the loss's own state (a learnable temperature,
  a queue, GlobalInfoNCE's normalisers) in the trainer's checkpoints.
* :func:`retrieval_scores`: negbatch's Recall@k / MRR@10 / nDCG@10 of a model
  on the inputs of sentence-transformers' ``InformationRetrievalEvaluator``.

The loss needs only torch; the samplers and the callback import
sentence-transformers (and transformers) when first used.
"""

from __future__ import annotations

from typing import Any

from .losses import INDEX_COLUMN, LossCall, NegbatchLoss, indexed_loss_call, pair_loss_call, with_index_column

__all__ = [
    "NegbatchLoss",
    "with_index_column",
    "INDEX_COLUMN",
    "LossCall",
    "pair_loss_call",
    "indexed_loss_call",
    "GCBSBatches",
    "HardNegativeBatches",
    "NoDuplicateBatches",
    "RandomBatches",
    "NegbatchDiagnostics",
    "NegbatchLossState",
    "retrieval_scores",
]

_LAZY = {
    "GCBSBatches": "samplers",
    "HardNegativeBatches": "samplers",
    "NoDuplicateBatches": "samplers",
    "RandomBatches": "samplers",
    "NegbatchDiagnostics": "callbacks",
    "NegbatchLossState": "callbacks",
    "retrieval_scores": "evaluation",
}


def __getattr__(name: str) -> Any:
    # The samplers and the callback subclass sentence-transformers' and transformers'
    # classes: importing them is deferred until they are asked for.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
