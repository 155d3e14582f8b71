"""Use this package's losses as a sentence-transformers loss (``SentenceTransformerTrainer``).

sentence-transformers gives a loss the tokenized columns of a batch (anchor,
positive, then any negative columns) and the label column. :class:`NegbatchLoss`
embeds every column with the model, stacks the negative columns into hard
negatives of shape (B, H, d), and calls the wrapped loss through a
``loss_call``:

* default, :func:`pair_loss_call`:
  ``loss(anchor, positive[, hard_negatives])`` -- :class:`negbatch.InfoNCE`
  with ``form="query_document"`` and any ``negatives`` (all, or K sampled).
* :func:`indexed_loss_call`:
  ``loss(anchor, positive, indices)`` with the batch's ``label`` column as the
  indices -- the generic path for losses that keep per-sample state, such as a
  global contrastive loss: put each row's data-set index in a ``label`` column.
* any callable of the same signature, for other losses.

sentence-transformers is imported only by the code that needs it; this module
itself needs only torch (optional extra ``st``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NegbatchLoss", "LossCall", "pair_loss_call", "indexed_loss_call"]

LossCall = Callable[[nn.Module, Tensor, Tensor, "Tensor | None", Tensor], Tensor]


def pair_loss_call(loss: nn.Module, queries: Tensor, documents: Tensor, hard_negatives: Tensor | None,
                   indices: Tensor) -> Tensor:
    """``loss(queries, documents[, hard_negatives])``; ``indices`` is not used."""
    if hard_negatives is None:
        return loss(queries, documents)
    return loss(queries, documents, hard_negatives)


def indexed_loss_call(loss: nn.Module, queries: Tensor, documents: Tensor, hard_negatives: Tensor | None,
                      indices: Tensor) -> Tensor:
    """``loss(queries, documents, indices)``: for losses that keep state per data-set sample."""
    if hard_negatives is not None:
        raise ValueError("indexed_loss_call takes no hard negatives; use pairs without them")
    return loss(queries, documents, indices)


class NegbatchLoss(nn.Module):
    """A negbatch loss in sentence-transformers' loss protocol.

    Parameters
    ----------
    model : SentenceTransformer
        The model being trained (the trainer may swap it for a wrapped copy).
    loss : nn.Module
        A negbatch loss, e.g. ``InfoNCE(form="query_document", negatives=16)``.
    loss_call : callable, default pair_loss_call
        ``loss_call(loss, anchor, positive, hard_negatives_or_None, labels)``.

    Examples
    --------
    >>> from datasets import Dataset  # doctest: +SKIP
    >>> from sentence_transformers import SentenceTransformerTrainer  # doctest: +SKIP
    >>> from negbatch import InfoNCE  # doctest: +SKIP
    >>> from negbatch.models.text import load_minilm  # doctest: +SKIP
    >>> model = load_minilm("cpu")  # doctest: +SKIP
    >>> data = Dataset.from_dict({"anchor": ["a cat sleeps", "rain falls"],
    ...                           "positive": ["the cat is asleep", "it is raining"]})  # doctest: +SKIP
    >>> loss = NegbatchLoss(model, InfoNCE(temperature=0.05, negatives=1, form="query_document"))  # doctest: +SKIP
    >>> SentenceTransformerTrainer(model=model, train_dataset=data, loss=loss).train()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, loss: nn.Module, *, loss_call: LossCall = pair_loss_call) -> None:
        super().__init__()
        if not isinstance(loss, nn.Module):
            raise TypeError(f"loss must be a torch.nn.Module (a negbatch loss), got {type(loss).__name__}")
        if not callable(loss_call):
            raise TypeError("loss_call must be callable: loss_call(loss, anchor, positive, hard_negatives, labels)")
        self.model = model
        self.loss = loss
        self.loss_call = loss_call

    def embed(self, sentence_features: Iterable[dict[str, Tensor]]) -> list[Tensor]:
        """One (B, d) embedding tensor per column."""
        return [self.model(features)["sentence_embedding"] for features in sentence_features]

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        embeddings = self.embed(sentence_features)
        if len(embeddings) < 2:
            raise ValueError(
                f"the data set needs an anchor and a positive column (then optional negatives), got {len(embeddings)} "
                f"text column(s)"
            )
        anchor, positive, *negatives = embeddings
        hard = torch.stack(negatives, dim=1) if negatives else None
        return self.loss_call(self.loss, anchor, positive, hard, labels)

    def get_config_dict(self) -> dict[str, Any]:
        # sentence-transformers writes this into the model card.
        return {"loss": repr(self.loss), "loss_call": getattr(self.loss_call, "__name__", repr(self.loss_call))}
