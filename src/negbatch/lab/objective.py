"""The batch losses of the lab's tasks, built from one :class:`TrainConfig`.

Both tasks name their softmax loss differently (``simclr`` for two views of
an image, ``infonce`` for query-document pairs) and share the others:
``dcl`` (decoupled: the positive leaves the denominator, optionally DCL-W's
weight ``dcl_sigma``), ``siglip`` (sigmoid pairs with a learnable scale and
bias). ``queue_size`` adds a queue of past embeddings as negatives (softmax
losses), ``learnable_temperature`` learns the temperature (default on for
SigLIP only, as its paper does).

Losses with a queue are called with the batch's data-set indices (an anchor
never meets its own queued entries): :func:`needs_indices` says which.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..losses import DCL, InfoNCE, SigLIP
from .config import TrainConfig

__all__ = ["batch_loss", "needs_indices", "loss_parameter_groups"]

#: The softmax InfoNCE's name in each task.
INFONCE_NAMES = ("simclr", "infonce")


def batch_loss(cfg: TrainConfig, *, form: str, gather: bool) -> nn.Module:
    """``cfg.loss`` (one of simclr/infonce, dcl, siglip) for ``form``
    (``"two_view"`` images, ``"query_document"`` text pairs)."""
    common = dict(temperature=cfg.temperature, negatives=cfg.negatives, form=form, gather=gather)
    if form == "query_document":
        common["symmetric"] = bool(cfg.symmetric)  # images with a momentum encoder: MoCo's one direction
    if cfg.loss == "siglip":
        learnable = True if cfg.learnable_temperature is None else cfg.learnable_temperature
        return SigLIP(bias=cfg.siglip_bias, learnable_temperature=learnable, **common)
    learnable = bool(cfg.learnable_temperature)
    if cfg.loss == "dcl":
        return DCL(sigma=cfg.dcl_sigma, learnable_temperature=learnable, queue_size=cfg.queue_size, **common)
    if cfg.loss in INFONCE_NAMES:
        return InfoNCE(learnable_temperature=learnable, queue_size=cfg.queue_size, **common)
    raise ValueError(f"loss={cfg.loss!r} is not a batch loss of negbatch.lab.objective")


def needs_indices(loss: nn.Module) -> bool:
    """Whether ``loss`` must be called with ``indices=`` (it keeps a queue)."""
    return getattr(loss, "queue", None) is not None


def loss_parameter_groups(model: nn.Module, loss: nn.Module) -> list[dict] | Iterator[nn.Parameter]:
    """The optimizer's parameters: the model's, and the loss's own (a
    learnable temperature, SigLIP's bias) in a group without weight decay,
    as CLIP and SigLIP train their scale and bias."""
    own = [p for p in loss.parameters() if p.requires_grad]
    if not own:
        return model.parameters()
    return [{"params": list(model.parameters())}, {"params": own, "weight_decay": 0.0}]
