"""False-negative filtering: drop candidates that look like positives.

GISTEmbed (Solatorio 2024) uses a frozen guide model to spot in-batch false
negatives: a candidate whose guide similarity to the anchor exceeds the
similarity of the anchor's own positive (minus a margin) is most likely
another positive, and is left out of the loss. Global batch sampling makes
this more pressing: on the digits, 30-45% of the in-batch pairs of a GCBS
batch are same-class false negatives.

:func:`false_negative_mask` computes the mask of one direction of the
candidate bank from any embeddings of the same rows (a guide model's, or the
model's own, detached); the losses apply it with ``filter_margin`` /
``filter_top`` and the embeddings passed as ``guide=``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import is_real

__all__ = ["false_negative_mask", "check_filter", "check_cosine_margin"]


def check_filter(margin: float | None, top: float | None) -> tuple[float | None, float | None]:
    """Validate the two filtering options (None: off)."""
    if margin is not None:
        if not is_real(margin) or not math.isfinite(margin):
            raise ValueError(f"filter_margin must be a finite float (or None: no margin filter), got {margin!r}")
        margin = float(margin)
    if top is not None:
        if not is_real(top) or not 0.0 < top < 1.0:
            raise ValueError(
                f"filter_top must be a fraction strictly between 0 and 1 (or None: no top filter), got {top!r}"
            )
        top = float(top)
    return margin, top


def check_cosine_margin(margin: float | None, judged_by: str) -> None:
    """With cosine similarities (in [-1, 1]) a margin of 2 or more masks every
    candidate of every anchor (the loss then learns nothing from negatives),
    and -2 or less masks none: refuse both, naming the option."""
    if margin is not None and not -2.0 < margin < 2.0:
        raise ValueError(
            f"filter_margin must lie in (-2, 2) when {judged_by} judges by cosine similarity (in [-1, 1]), got "
            f"{margin!r}: a margin >= 2 masks every candidate and one <= -2 none (GISTEmbed: 0; try 0 to 0.1)"
        )


@torch.no_grad()
def false_negative_mask(
    anchors: Tensor,
    bank: Tensor,
    positive_index: Tensor,
    *,
    self_index: Tensor | None = None,
    excluded: Tensor | None = None,
    positives: Tensor | None = None,
    margin: float | None = None,
    top: float | None = None,
) -> Tensor:
    """Candidates to mask as likely false negatives, by similarity.

    With ``sim = anchors @ bank.T`` (normalise the rows first for cosine
    similarities) and ``pos_i = sim[i, positive_index[i]]``, candidate j of
    anchor i is masked when

    * ``margin`` is given and ``sim[i, j] > pos_i - margin`` (GISTEmbed's
      absolute margin; 0: anything closer than the positive), or
    * ``top`` is given and j is among the ``floor(top * c_i)`` most similar of
      the anchor's ``c_i`` candidates.

    Candidates are the columns other than the positive(s), the anchor itself
    and already ``excluded`` ones; only candidates are ever masked. The
    similarities are computed in float32 at least: half-precision
    (bfloat16, float16) embeddings are judged by their exact float32 values,
    not by products rounded to their precision, whose ties would decide.

    Parameters
    ----------
    anchors : Tensor (n, d); bank : Tensor (m, d)
        The embeddings that judge similarity (no gradient is taken).
    positive_index : Tensor (n,) long
        Bank column of each anchor's positive.
    self_index : Tensor (n,) long, optional
        The anchor's own column (-1: none).
    excluded, positives : Tensor (n, m) bool, optional
        Columns already masked, and further positives: never candidates.
    margin, top : float, optional
        See above; at least one must be given.

    Returns
    -------
    Tensor (n, m) bool: True on the masked candidates.

    Examples
    --------
    >>> import torch
    >>> from negbatch.losses.filtering import false_negative_mask
    >>> anchors = torch.tensor([[1.0, 0.0]])
    >>> bank = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])   # column 0 is the positive
    >>> false_negative_mask(anchors, bank, torch.tensor([0]), margin=0.0)
    tensor([[False,  True, False]])
    """
    margin, top = check_filter(margin, top)
    if margin is None and top is None:
        raise ValueError("give filter_margin or filter_top (or both)")
    return _false_negatives(anchors, bank, positive_index, self_index=self_index, excluded=excluded,
                            positives=positives, margin=margin, top=top)[0]


@torch.no_grad()
def _false_negatives(
    anchors: Tensor,
    bank: Tensor,
    positive_index: Tensor,
    *,
    self_index: Tensor | None,
    excluded: Tensor | None,
    positives: Tensor | None,
    margin: float | None,
    top: float | None,
) -> tuple[Tensor, Tensor]:
    """:func:`false_negative_mask` (arguments checked) and the number of candidates."""
    n, m = anchors.shape[0], bank.shape[0]
    # Judged in float32 at least: bfloat16 products, rounded to 8 bits, tied
    # a candidate with the positive (margin 0) or reordered the top ones, so
    # rounding decided what was masked. Half-precision inputs are exact in float32.
    wide = torch.promote_types(torch.promote_types(anchors.dtype, bank.dtype), torch.float32)
    sim = anchors.to(wide) @ bank.to(wide).t()
    rows = torch.arange(n, device=anchors.device)
    candidate = torch.ones(n, m, dtype=torch.bool, device=anchors.device)
    if excluded is not None:
        candidate &= ~excluded
    if positives is not None:
        candidate &= ~positives
    candidate[rows, positive_index] = False
    if self_index is not None:
        has_self = self_index >= 0
        candidate[rows[has_self], self_index[has_self]] = False
    hit = torch.zeros_like(candidate)
    if margin is not None:
        hit |= sim > (sim[rows, positive_index] - margin)[:, None]
    if top is not None:
        count = torch.floor(top * candidate.sum(dim=1)).long()
        most = int(count.max()) if n else 0
        if most > 0:
            order = sim.masked_fill(~candidate, float("-inf")).topk(most, dim=1).indices
            keep = torch.arange(most, device=anchors.device)[None, :] < count[:, None]
            # topk's columns are distinct within a row: one write per column.
            hit |= torch.zeros_like(hit).scatter_(1, order, keep)
    return hit & candidate, candidate.sum()
