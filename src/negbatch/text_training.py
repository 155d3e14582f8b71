"""A minimal dual-encoder training loop on text pairs.

One shared (siamese) encoder embeds queries, documents and optional hard
negatives; a loss of this package turns the embeddings into a scalar. The lab
builds its text studies on this loop; it is deliberately small: random batches
without replacement, one optimizer, no scheduler.

How the loss is called is a parameter (``loss_call``), so that losses with
other signatures fit in: :func:`pair_loss_call` (the default) calls
``loss(queries, documents)`` or ``loss(queries, documents, hard_negatives)``,
the signature of :class:`negbatch.InfoNCE` in ``form="query_document"``;
:func:`indexed_loss_call` calls ``loss(queries, documents, indices)`` with
the pairs' positions in the data set, for stateful per-sample losses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data.text import TextPairs

__all__ = ["LossCall", "pair_loss_call", "indexed_loss_call", "TextTrainResult", "train_text_pairs"]

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


@dataclass
class TextTrainResult:
    """Loss of every step, and the number of pairs seen."""

    losses: list[float]
    pairs_seen: int


def epoch_batches_without_replacement(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch: a permutation of ``range(n)`` cut into full batches (the short remainder is dropped)."""
    order = torch.randperm(n, generator=generator)
    return list(order[: n - n % batch_size].split(batch_size))


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    done = 0
    while done < steps:  # each epoch reshuffles when its first batch is needed
        for batch in epoch_batches_without_replacement(n, batch_size, generator)[: steps - done]:
            yield batch
            done += 1


def _to(features: Mapping[str, Tensor], device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in features.items()}


def train_text_pairs(
    encoder: nn.Module,
    tokenize: Callable[[list[str]], Mapping[str, Tensor]],
    pairs: TextPairs,
    loss: nn.Module,
    *,
    batch_size: int = 64,
    steps: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str | torch.device = "cpu",
    loss_call: LossCall = pair_loss_call,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TextTrainResult:
    """Train ``encoder`` on ``pairs`` with ``loss`` for ``steps`` optimizer steps.

    Parameters
    ----------
    encoder : nn.Module
        ``encoder(tokenize(texts)) -> (B, d)``; shared by queries and documents.
    tokenize : callable
        Texts to a dict of tensors (e.g. :class:`negbatch.models.text.TextTokenizer`).
    pairs : TextPairs
        The training side; its hard negatives, if any, are passed to the loss.
    loss : nn.Module
        E.g. ``InfoNCE(form="query_document", negatives=K)``.
    batch_size, steps : int
        Pairs per step (batches drawn without replacement, reshuffled each
        epoch, the remainder dropped) and number of steps.
    lr, weight_decay : float
        AdamW's, unless ``optimizer`` is given.
    seed : int
        Seeds the batch order and, through ``torch.manual_seed``, dropout and
        sampled negatives.
    loss_call : callable, default :func:`pair_loss_call`
        ``loss_call(loss, queries, documents, hard_negatives, indices)``.
    on_step : callable, optional
        ``on_step(step, loss_value)`` after every step (logging, evaluation).

    Examples
    --------
    >>> from negbatch import InfoNCE
    >>> from negbatch.data.text import builtin_pairs
    >>> from negbatch.models.text import TextTokenizer, TransformerTextEncoder
    >>> pairs = builtin_pairs()
    >>> tok = TextTokenizer.train(pairs.queries + pairs.documents, vocab_size=400, min_frequency=1)
    >>> enc = TransformerTextEncoder(tok.vocab_size, dim=32, depth=1, heads=2)
    >>> result = train_text_pairs(enc, tok, pairs, InfoNCE(form="query_document"), batch_size=8, steps=3)
    >>> len(result.losses)
    3
    """
    if not isinstance(pairs, TextPairs):
        raise TypeError(f"pairs must be a TextPairs, got {type(pairs).__name__}")
    for name, value in (("batch_size", batch_size), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if batch_size > len(pairs):
        raise ValueError(f"batch_size ({batch_size}) is larger than the number of pairs ({len(pairs)})")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder.to(device).train()
    if optimizer is None:
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    for step, batch in enumerate(_batches(len(pairs), batch_size, steps, generator)):
        idx = batch.tolist()
        queries = encoder(_to(tokenize([pairs.queries[i] for i in idx]), device))
        documents = encoder(_to(tokenize([pairs.documents[i] for i in idx]), device))
        hard = None
        if pairs.hard_negatives is not None:
            h = pairs.num_hard_negatives
            flat = [text for i in idx for text in pairs.hard_negatives[i]]
            hard = encoder(_to(tokenize(flat), device)).reshape(len(idx), h, -1)
        value = loss_call(loss, queries, documents, hard, batch.to(device))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return TextTrainResult(losses, steps * batch_size)
