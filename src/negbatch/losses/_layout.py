"""The candidate bank every loss of negbatch contrasts its anchors with.

InfoNCE, ReLIC and GlobalInfoNCE see a batch the same way: the embeddings are
normalised and (with ``gather``) gathered from every rank, then each family
of anchors (a :class:`Direction`) is contrasted with one bank of candidates,
knowing for each anchor the bank column of its positive, the column holding
the anchor itself, the known false negatives (``mask``) and its global row
(so that sampled negatives do not depend on the world size).
:func:`build_layout` makes these directions once; each loss adds only its
per-direction math and reduces with :meth:`Layout.reduce`.

The directions of each layout, in order (B local rows, T = B_global rows of
all ranks, H hard negatives per query):

* ``two_view``, ``bank="both_views"`` (InfoNCE, GlobalInfoNCE): one direction,
  anchors ``[view 1; view 2]`` (2B), bank ``[view 1 of all; view 2 of all]``
  (2T), each view's positive the other view, itself never a negative, the
  sample-level (B, T) mask applied to all four blocks;
* ``two_view``, ``bank="other_view"`` (ReLIC): view 1 against the other
  view's bank (T), then view 2 against view 1's; no self column; the (B, T)
  mask as given for both;
* ``query_document``: queries against ``[documents of all; their hard
  negatives]`` (T + T*H); with ``symmetric``, then documents against the
  queries of all ranks, with the transposed mask.

Concatenating the directions' per-anchor values gives the anchor roles in
order (view 1 then view 2, or queries then documents): B values per role
(see :func:`anchor_roles`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    Form,
    Negatives,
    OnShortage,
    Reduction,
    check_embeddings,
    check_loss_options,
    check_mask,
    check_nonempty,
    check_same,
    check_temperature,
)
from ..distributed import gather_nograd, gather_with_grad, global_batch_mean
from ..negatives import NegativeSelection, select_negatives, validate_negatives

Bank = Literal["both_views", "other_view"]

#: Elements of one row block of the fused dense paths: the block's
#: temporaries (logsumexp, the inverted mask) stay small.
BLOCK_ELEMENTS = 1 << 22


@dataclass
class Direction:
    """One family of anchors contrasted with one candidate bank: the inputs
    of :func:`negbatch.negatives.select_negatives`.

    Attributes
    ----------
    anchors : Tensor (n, d)
        This rank's anchors.
    bank : Tensor (m, d)
        The candidates (of every rank with ``gather``).
    positive_index, self_index : Tensor (n,) long
        Bank column of each anchor's positive, and of the anchor itself
        (None where the anchor is not in the bank).
    mask : Tensor (n, m) bool or None
        Known false negatives of each anchor.
    row_index : Tensor (n,) long; n_rows_global : int
        Global row of each anchor among ``n_rows_global`` rows: the random
        numbers for sampled negatives are drawn per global row.
    """

    anchors: Tensor
    bank: Tensor
    positive_index: Tensor
    self_index: Tensor | None
    mask: Tensor | None
    row_index: Tensor
    n_rows_global: int

    @property
    def num_excluded(self) -> int | None:
        """Columns that are never negatives (the positive, the anchor itself)
        when there is no mask; None with a mask (it differs per anchor)."""
        return None if self.mask is not None else 1 + (self.self_index is not None)

    def select(
        self, negatives: Negatives, generator: torch.Generator | None, on_shortage: OnShortage
    ) -> NegativeSelection:
        """The negatives of every anchor (all, or K sampled)."""
        return select_negatives(
            self.positive_index, self.bank.shape[0], negatives, self_index=self.self_index, mask=self.mask,
            generator=generator, on_shortage=on_shortage, row_index=self.row_index, n_rows_global=self.n_rows_global,
        )


@dataclass
class Layout:
    """The directions of one batch and its sample counts.

    ``n_local`` rows on this rank, ``n_global`` rows on all ranks (equal
    without gather), this rank's rows starting at global row ``offset``.
    """

    directions: list[Direction]
    n_local: int
    n_global: int
    offset: int
    gathered: bool

    def reduce(self, per_anchor: Tensor, reduction: Reduction) -> Tensor:
        """``reduction`` over this rank's anchors. Gathered, "mean" is this
        rank's share of the global mean (ranks may hold different numbers of
        rows; see :func:`negbatch.distributed.global_batch_mean`)."""
        if reduction == "mean":
            if not self.gathered:
                return per_anchor.mean()
            return global_batch_mean(per_anchor, self.n_local, self.n_global)
        if reduction == "sum":
            return per_anchor.sum()
        return per_anchor


def anchor_roles(form: Form, symmetric: bool) -> int:
    """Anchor roles per sample: both views, queries and documents (symmetric),
    or queries only."""
    return 2 if (form == "two_view" or symmetric) else 1


def check_views(a: Tensor, b: Tensor, form: Form, check_finite: bool) -> None:
    """The two embedding inputs of a loss: 2-d, finite, paired row by row."""
    names = ("view1", "view2") if form == "two_view" else ("queries", "documents")
    check_embeddings(a, names[0], check_finite=check_finite)
    check_embeddings(b, names[1], check_finite=check_finite)
    check_same(a, b, names[0], names[1], dims=(0, 1))
    check_nonempty(a, names[0])


def _check_hard_negatives(hard: Tensor, queries: Tensor, check_finite: bool) -> None:
    n, d = queries.shape
    check_embeddings(hard, "hard_negatives", dim=3, check_finite=check_finite)
    if hard.shape[0] != n or hard.shape[2] != d:
        raise ValueError(f"hard_negatives must have shape (B, H, d) = ({n}, H, {d}), got {tuple(hard.shape)}")
    if hard.device != queries.device or hard.dtype != queries.dtype:
        raise ValueError("hard_negatives must be on the device and of the dtype of the queries")


def build_layout(
    a: Tensor,
    b: Tensor,
    hard_negatives: Tensor | None = None,
    *,
    form: Form,
    symmetric: bool = False,
    gather: bool = False,
    mask: Tensor | None = None,
    normalize: bool = True,
    check_finite: bool = True,
    bank: Bank = "both_views",
) -> Layout:
    """The directions of a batch (see the module docstring).

    ``a`` and ``b`` must have passed :func:`check_views`; ``hard_negatives``
    and ``mask`` are checked here (the mask once the global row count is
    known). With ``gather``, every rank must call this in the same step.
    """
    n, d = a.shape
    device = a.device
    if form == "two_view" and hard_negatives is not None:
        raise ValueError("hard_negatives applies to form='query_document' only")
    if hard_negatives is not None:
        _check_hard_negatives(hard_negatives, a, check_finite)
    with_hard = hard_negatives is not None and hard_negatives.shape[1] > 0  # H = 0: none
    z = [F.normalize(x, dim=-1) for x in (a, b)] if normalize else [a, b]
    if with_hard:
        hard = F.normalize(hard_negatives, dim=-1) if normalize else hard_negatives
        z.append(hard.reshape(n, -1))
    # One gather for every input: a single collective, one offset.
    local = torch.cat(z, dim=1)
    gathered, offset = gather_with_grad(local) if gather else (local, 0)
    total = gathered.shape[0]
    rows = torch.arange(n, device=device) + offset
    first, second = gathered[:, :d], gathered[:, d : 2 * d]

    if form == "two_view":
        check_mask(mask, (n, total), device)
        if bank == "other_view":
            directions = [
                Direction(z[0], second, rows, None, mask, rows, 2 * total),
                Direction(z[1], first, rows, None, mask, rows + total, 2 * total),
            ]
        else:
            row_index = torch.cat([rows, rows + total])
            directions = [
                Direction(
                    torch.cat([z[0], z[1]]),
                    torch.cat([first, second]),
                    torch.cat([rows + total, rows]),
                    row_index,
                    mask.repeat(2, 2) if mask is not None else None,
                    row_index,
                    2 * total,
                )
            ]
        return Layout(directions, n, total, offset, gather)

    documents = second
    if with_hard:
        documents = torch.cat([second, gathered[:, 2 * d :].reshape(-1, d)])
    check_mask(mask, (n, documents.shape[0]), device)
    directions = [Direction(z[0], documents, rows, None, mask, rows, total)]
    if symmetric:
        doc_mask = None
        if mask is not None:
            # Row j of the document-to-query mask is column j of the query-to-document mask.
            all_rows = gather_nograd(mask.to(torch.uint8)).bool() if gather else mask
            doc_mask = all_rows[:, :total].t()[offset : offset + n]
        directions.append(Direction(z[1], first, rows, None, doc_mask, rows, total))
    return Layout(directions, n, total, offset, gather)


class BankLoss(nn.Module):
    """What the losses share: their common options (validated and kept as
    attributes of the same names) and the layout of a batch under them."""

    def _set_options(
        self,
        *,
        temperature: float,
        negatives: Negatives,
        form: Form,
        symmetric: bool,
        gather: bool,
        normalize: bool,
        on_shortage: OnShortage,
        reduction: Reduction,
        check_finite: bool,
    ) -> None:
        self.temperature = check_temperature(temperature)
        self.negatives = validate_negatives(negatives)
        check_loss_options(form=form, symmetric=symmetric, on_shortage=on_shortage, reduction=reduction)
        self.form, self.symmetric, self.gather, self.normalize = form, symmetric, gather, normalize
        self.on_shortage, self.reduction, self.check_finite = on_shortage, reduction, check_finite

    def _layout(
        self, a: Tensor, b: Tensor, hard_negatives: Tensor | None, mask: Tensor | None, bank: Bank = "both_views"
    ) -> Layout:
        return build_layout(
            a, b, hard_negatives, form=self.form, symmetric=self.symmetric, gather=self.gather, mask=mask,
            normalize=self.normalize, check_finite=self.check_finite, bank=bank,
        )


def autocast_active(device: torch.device) -> bool:
    """Whether an autocast region is active for ``device``'s type (the
    argument-free ``torch.is_autocast_enabled()`` answers for CUDA only)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device.type == "cpu" else torch.is_autocast_enabled()


def fused_dense(selection: NegativeSelection, anchors: Tensor) -> bool:
    """Whether a loss may take its fused all-candidates path: dense, in
    float32/64 and outside autocast (which the fused matmul would bypass)."""
    return (
        selection.is_dense
        and anchors.dtype in (torch.float32, torch.float64)
        and not autocast_active(anchors.device)
    )


def row_blocks(n_rows: int, n_columns: int) -> list[slice]:
    """Row slices of about :data:`BLOCK_ELEMENTS` elements each."""
    step = max(1, BLOCK_ELEMENTS // max(1, n_columns))
    return [slice(start, start + step) for start in range(0, n_rows, step)]
