"""Batch samplers of :mod:`negbatch.sampling` on text pairs, for text runs.

``TextRunConfig.sampler`` picks how an epoch's batches are composed:

* ``gcbs`` -- :class:`~negbatch.sampling.GCBSampler` on the (query, document)
  embeddings of the current encoder (Sachidananda et al.);
* ``hard`` -- :class:`~negbatch.sampling.HardNegativeBatchSampler`: k-means on
  the query embeddings, batches filled cluster by cluster;
* ``no-duplicates`` -- :class:`~negbatch.sampling.NoDuplicateBatchSampler`
  keyed by the document text (no copy of a positive among the negatives).

The model-dependent samplers embed the training side with the encoder as it is
at the start of each epoch (in eval mode). Batches are full (``drop_last``), so
every step has the configured batch size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["build_text_sampler", "epoch_batches"]


def build_text_sampler(cfg, encoder: nn.Module, tokenize, train):
    """The sampler named by ``cfg.sampler`` over the training pairs ``train``."""
    from ..sampling import GCBSampler, HardNegativeBatchSampler, NoDuplicateBatchSampler

    device = torch.device(cfg.device)

    def features(texts: list[str]) -> dict:
        return {k: v.to(device) for k, v in tokenize(texts).items()}

    def embed(indices: Tensor) -> tuple[Tensor, Tensor]:
        idx = indices.tolist()
        q = encoder(features([train.queries[i] for i in idx]))
        d = encoder(features([train.documents[i] for i in idx]))
        return q.float().cpu(), d.float().cpu()

    common = dict(drop_last=True, seed=cfg.seed)
    if cfg.sampler == "gcbs":
        return GCBSampler(embed, len(train), cfg.batch_size, model=encoder, chunk_size=256, **common)
    if cfg.sampler == "hard":
        return HardNegativeBatchSampler(lambda i: embed(i)[0], len(train), cfg.batch_size, model=encoder, chunk_size=256, **common)
    if cfg.sampler == "no-duplicates":
        return NoDuplicateBatchSampler(train.documents, cfg.batch_size, **common)
    raise ValueError(f"sampler must be gcbs, hard or no-duplicates here, got {cfg.sampler!r}")


def epoch_batches(cfg, encoder: nn.Module, tokenize, train, epoch: int) -> Iterator[Tensor]:
    """The batches (LongTensor of pair indices) of epoch ``epoch``, planned now."""
    sampler = build_text_sampler(cfg, encoder, tokenize, train)
    sampler.set_epoch(epoch)
    was_training = encoder.training
    batches = [torch.as_tensor(b, dtype=torch.long) for b in sampler]  # plans (and embeds) once, here
    encoder.train(was_training)
    yield from batches
