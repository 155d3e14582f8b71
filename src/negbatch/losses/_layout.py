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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._autocast import autocast_active
from .._checks import (
    BATCH_OF_ONE_HINT,
    Form,
    Negatives,
    OnShortage,
    Reduction,
    check_embeddings,
    check_loss_options,
    check_mask,
    check_choice,
    check_flag,
    check_nonempty,
    check_same,
    check_temperature,
)
from ..distributed import (
    every_rank, gather_nograd, gather_with_sizes, global_batch_mean, global_batch_sum, name_ranks, rank, rows_rank,
    world_size,
)
from ..negatives import (
    NegativeSelection, ShortageError, _select, candidate_counts, shortage_message, validate_negatives,
)
from .filtering import _false_negatives, check_cosine_margin, check_filter
from .temperature import LearnableTemperature

Bank = Literal["both_views", "other_view"]

#: Elements of one row block of the fused dense paths: the block's
#: temporaries (logsumexp, the inverted mask) stay small.
BLOCK_ELEMENTS = 1 << 22

#: Dense losses over at most this many logits (n x m) per direction take
#: autograd's kernels on the logits (a plain call: the losses' short path;
#: otherwise InfoNCE's cross-entropy) instead of the fused buffers: at small
#: sizes ATen's one-pass kernels beat the buffers' separate passes, and the
#: memory the buffers save (about 2.4 copies of n x m) is small
#: (bench/bench_peers.py measures both sides).
SMALL_DENSE_LOGITS = 1 << 16


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
    positives : Tensor (n, m) bool or None
        Further positives of each anchor (``positives="mask"``: the masked
        and same-label candidates), besides ``positive_index``.
    counts_everywhere : callable or None
        With gather and a mask: the valid candidates of the anchor(s) of
        every sample of every rank, ``() -> Tensor (n_global,)``, when every
        rank holds what decides them (the gathered labels, a mask gathered
        whole); None where only this rank knows its anchors' counts (a mask
        of its own rows, the filter, a queue). A change of ``mask`` or
        ``positives`` must drop it.
    counts_by_rank : Tensor (world_size, 4) long or None
        Without gather, a loss whose queue holds every rank's batch: each
        rank's anchors short of K, its anchors without a candidate, its
        fewest candidates of an anchor and its bank's columns, as the ranks
        exchanged them (each rank's bank is its own batch and the queue).
        Set once the direction is final.
    """

    anchors: Tensor
    bank: Tensor
    positive_index: Tensor
    self_index: Tensor | None
    mask: Tensor | None
    row_index: Tensor
    n_rows_global: int
    positives: Tensor | None = None
    counts_everywhere: Callable[[], Tensor] | None = None
    counts_by_rank: Tensor | None = None

    @property
    def num_excluded(self) -> int | None:
        """Columns that are never negatives (the positive, the anchor itself)
        when there is no mask; None with a mask (it differs per anchor)."""
        if self.mask is not None or self.positives is not None:
            return None
        return 1 + (self.self_index is not None)

    def select(
        self, negatives: Negatives, generator: torch.Generator | None, on_shortage: OnShortage
    ) -> NegativeSelection:
        """The negatives of every anchor (all, or K sampled)."""
        # A direction holding every global row holds them in order (one
        # process): select_negatives then skips the row lookup.
        every_row = self.row_index.shape[0] == self.n_rows_global
        return _select(  # select_negatives without re-checking the indices this layout built
            self.positive_index, self.bank.shape[0], negatives, self_index=self.self_index, mask=self.mask,
            positives=self.positives, generator=generator, on_shortage=on_shortage,
            row_index=None if every_row else self.row_index, n_rows_global=self.n_rows_global,
        )

    def extended(self, columns: Tensor, mask: Tensor | None = None, positives: Tensor | None = None) -> "Direction":
        """This direction with ``columns`` (c, d) appended to its bank (a
        queue's entries): ``mask`` and ``positives`` (n, c) mark them, and the
        existing masks are padded with False."""
        n, c = self.anchors.shape[0], columns.shape[0]

        def pad(old: Tensor | None, new: Tensor | None) -> Tensor | None:
            if old is None and new is None:
                return None
            old = old if old is not None else torch.zeros(n, self.bank.shape[0], dtype=torch.bool, device=columns.device)
            new = new if new is not None else torch.zeros(n, c, dtype=torch.bool, device=columns.device)
            return torch.cat([old, new], dim=1)

        return replace(self, bank=torch.cat([self.bank, columns.to(self.bank.dtype)]), mask=pad(self.mask, mask),
                       positives=pad(self.positives, positives), counts_everywhere=None)


@dataclass
class Layout:
    """The directions of one batch and its sample counts.

    ``n_local`` rows on this rank, ``n_global`` rows on all ranks (equal
    without gather), this rank's rows starting at global row ``offset``;
    ``sizes``: the rows of every rank, in rank order (``[n_local]`` without
    gather).
    """

    directions: list[Direction]
    n_local: int
    n_global: int
    offset: int
    gathered: bool
    #: The normalised first and second inputs of every rank (views, or
    #: queries and documents), (n_global, d) each, and the labels of every
    #: rank (n_global,) when labels were given.
    first: Tensor | None = None
    second: Tensor | None = None
    labels: Tensor | None = field(default=None)
    sizes: list[int] = field(default_factory=list)

    def scale_anchors(self, scale: Tensor) -> None:
        """Multiply every direction's anchors by ``scale`` (a learnable
        1/temperature): the logits are then ``scale * s`` with the gradient
        of ``scale`` from autograd, and every kernel runs at temperature 1."""
        self.directions = [replace(d, anchors=d.anchors * scale) for d in self.directions]

    def reduce(self, per_anchor: Tensor, reduction: Reduction) -> Tensor:
        """``reduction`` over this rank's anchors. Gathered, "mean" and "sum"
        are this rank's share of the global mean or sum: averaged by DDP over
        the ranks, they give the global batch's (ranks may hold different
        numbers of rows; see :func:`negbatch.distributed.global_batch_mean`
        and :func:`~negbatch.distributed.global_batch_sum`)."""
        if reduction == "mean" and self.gathered:
            return global_batch_mean(per_anchor, self.n_local, self.n_global)
        if reduction == "sum" and self.gathered:
            return global_batch_sum(per_anchor)
        return reduce_values(per_anchor, reduction)


def reduce_values(per_anchor: Tensor, reduction: Reduction) -> Tensor:
    """``reduction`` over the anchors of one process."""
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor


def in_batch_candidates(form: Form, rows: int) -> int:
    """Negatives of every anchor in a batch of ``rows`` samples or pairs
    without masks or hard negatives: both views of every other sample
    (two_view), every other document (query_document)."""
    return 2 * rows - 2 if form == "two_view" else rows - 1


def anchor_roles(form: Form, symmetric: bool) -> int:
    """Anchor roles per sample: both views, queries and documents (symmetric),
    or queries only."""
    return 2 if (form == "two_view" or symmetric) else 1


def input_names(form: Form, prefix: str = "") -> tuple[str, str]:
    """The names of a loss's two embedding inputs in errors."""
    first, second = ("view1", "view2") if form == "two_view" else ("queries", "documents")
    return prefix + first, prefix + second


def across_ranks(gather: bool) -> bool:
    """Whether a call with ``gather`` contrasts the rows of several processes."""
    return gather and world_size() > 1


def check_views(
    a: Tensor, b: Tensor, form: Form, check_finite: bool, parameters: Sequence[tuple[str, Tensor]] = (),
    prefix: str = "", deferred: bool = False,
) -> None:
    """The two embedding inputs of a loss: 2-d, finite, paired row by row;
    with ``check_finite`` the loss's own scalars too (``parameters``: name
    and value as the loss will use it), which an optimizer step that diverged
    or a loaded ``state_dict`` can make NaN after construction. Errors name
    the inputs with ``prefix`` (``"guide "``: the guide model's embeddings).

    ``deferred`` on several ranks: an empty batch and non-finite inputs are
    checked later, on every rank alike, since a rank that raised here, alone,
    would leave the others waiting in a collective. With gather,
    :func:`build_layout` finds them in the gathered rows of every rank; a
    loss whose queue holds every rank's batch, without gather, sends what it
    finds with its indices (see
    :meth:`negbatch.losses._softmax.SoftmaxLoss.forward`). (The scalars are
    the same on every rank.)"""
    names = input_names(form, prefix)
    check_embeddings(a, names[0], check_finite=False)
    check_embeddings(b, names[1], check_finite=False)
    check_same(a, b, names[0], names[1], dims=(0, 1))
    later = across_ranks(deferred)
    if not later:
        check_nonempty(a, names[0])
    if not check_finite:
        return
    # One sum of everything (NaN and inf make it non-finite, as may an
    # overflow): one number read back; only then each on its own, to name
    # the culprit.
    values = ([] if later else [_wide_sum(a), _wide_sum(b)]) + [value.detach() for _, value in parameters]
    if not values:
        return
    total = values[0]
    for value in values[1:]:
        total = total + value.to(total.dtype)
    if bool(torch.isfinite(total)):
        return
    if not later:
        check_embeddings(a, names[0])
        check_embeddings(b, names[1])
    for name, value in parameters:
        if not bool(torch.isfinite(value.detach())):
            raise ValueError(
                f"the loss's {name} is {value.item()}: an optimizer step that diverged (lower the learning rate, "
                "clip gradients) or a loaded state_dict put it there; load a checkpoint with a finite value"
            )


def _wide_sum(x: Tensor) -> Tensor:
    """The sum of ``x``, in float32 for half-precision inputs."""
    return x.detach().sum(dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None)


def _check_hard_negatives(hard: Tensor, queries: Tensor, check_finite: bool) -> None:
    """``check_finite`` False: their values are checked once gathered (see :func:`check_views`)."""
    n, d = queries.shape
    check_embeddings(hard, "hard_negatives", dim=3, check_finite=check_finite)
    if hard.shape[0] != n or hard.shape[2] != d:
        raise ValueError(f"hard_negatives must have shape (B, H, d) = ({n}, H, {d}), got {tuple(hard.shape)}")
    if hard.device != queries.device or hard.dtype != queries.dtype:
        raise ValueError("hard_negatives must be on the device and of the dtype of the queries")


def check_labels(labels: Tensor | None, n: int, device: torch.device, name: str = "labels") -> Tensor | None:
    """Class labels of a batch: a 1-d integer tensor, one per sample."""
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a 1-d integer tensor (one class label per sample), got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), one label per sample, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the embeddings are on {device}")
    return labels.long()


def build_layout(
    a: Tensor,
    b: Tensor,
    hard_negatives: Tensor | None = None,
    *,
    form: Form,
    symmetric: bool = False,
    gather: bool = False,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    mask_as_positives: bool = False,
    normalize: bool = True,
    check_finite: bool = True,
    bank: Bank = "both_views",
    prefix: str = "",
) -> Layout:
    """The directions of a batch (see the module docstring).

    ``a`` and ``b`` must have passed :func:`check_views` (with the same
    ``gather``); ``hard_negatives``, ``mask`` and ``labels`` are checked here
    (the mask once the global row count is known). ``labels`` (B,) add the
    same-label samples of every rank to the mask (hard negatives carry no
    label). With ``mask_as_positives`` the mask marks further positives
    (``Direction.positives``) instead of false negatives. With ``gather``,
    every rank must call this in the same step; on several ranks, an empty
    batch or a non-finite input of any rank makes every rank raise, naming
    it (``prefix`` as in :func:`check_views`).
    """
    n, d = a.shape
    device = a.device
    if form == "two_view" and hard_negatives is not None:
        raise ValueError("hard_negatives applies to form='query_document' only")
    if hard_negatives is not None:
        _check_hard_negatives(hard_negatives, a, check_finite and not across_ranks(gather))
    labels = check_labels(labels, n, device)
    with_hard = hard_negatives is not None and hard_negatives.shape[1] > 0  # H = 0: none
    z = [F.normalize(x, dim=-1) for x in (a, b)] if normalize else [a, b]
    if with_hard:
        hard = F.normalize(hard_negatives, dim=-1) if normalize else hard_negatives
        z.append(hard.flatten(1))
    # One gather for every input: a single collective, one offset.
    local = torch.cat(z, dim=1) if gather else None
    gathered, sizes = gather_with_sizes(local) if gather else (local, [n])
    if across_ranks(gather):
        _check_gathered(gathered, sizes, (*input_names(form, prefix), prefix + "hard_negatives"), d, check_finite)
    offset = sum(sizes[: rank()]) if gather else 0
    total = gathered.shape[0] if gather else n
    rows = torch.arange(n, device=device) + offset
    if gather:
        first, second = gathered[:, :d], gathered[:, d : 2 * d]
    else:
        first, second = z[0], z[1]
    all_labels = None
    if labels is not None:
        all_labels = gather_nograd(labels) if gather else labels
    known = dict(first=first, second=second, labels=all_labels, sizes=sizes)

    def merged(given: Tensor | None, columns: int) -> Tensor | None:
        """The user's mask with the same-label samples added (checked first)."""
        check_mask(given, (n, columns), device)
        if all_labels is None:
            return given
        same = labels[:, None] == all_labels[None, :]
        if columns > total:  # hard negatives: no label, never the same class
            same = torch.cat([same, same.new_zeros(n, columns - total)], dim=1)
        return same if given is None else (given | same)

    def split(m: Tensor | None) -> dict:
        return {"mask": None, "positives": m} if mask_as_positives else {"mask": m, "positives": None}

    # With gather, labels and no mask of the user's, every rank knows every
    # anchor's candidates: the bank less the columns of the anchor's label.
    by_label = gather and mask is None and all_labels is not None
    if form == "two_view":
        mask = merged(mask, total)
        if bank == "other_view":
            counts = _counts_by_label(all_labels, all_labels, total) if by_label else None
            directions = [
                Direction(z[0], second, rows, None, row_index=rows, n_rows_global=2 * total, **split(mask),
                          counts_everywhere=counts),
                Direction(z[1], first, rows, None, row_index=rows + total, n_rows_global=2 * total, **split(mask),
                          counts_everywhere=counts),
            ]
        else:
            row_index = torch.cat([rows, rows + total])
            both = torch.cat([first, second])
            directions = [
                Direction(
                    torch.cat([z[0], z[1]]) if gather else both,  # one copy: the anchors are the bank
                    both,
                    torch.cat([rows + total, rows]),
                    row_index,
                    row_index=row_index,
                    n_rows_global=2 * total,
                    **split(mask.repeat(2, 2) if mask is not None else None),
                    counts_everywhere=(_counts_by_label(all_labels, torch.cat([all_labels, all_labels]), 2 * total)
                                       if by_label else None),
                )
            ]
        return Layout(directions, n, total, offset, gather, **known)

    documents = second
    if with_hard:
        hard_all = gathered[:, 2 * d :] if gather else z[2]
        documents = torch.cat([second, hard_all.reshape(-1, d)])
    mask = merged(mask, documents.shape[0])
    all_rows = None
    if symmetric and mask is not None:
        # Row j of the document-to-query mask is column j of the query-to-document mask.
        all_rows = gather_nograd(mask.to(torch.uint8)).bool() if gather else mask
    counts = doc_counts = None
    if gather and all_rows is not None:  # every rank holds every mask row: every anchor's count
        counts, doc_counts = _counts_beside_positive(all_rows), _counts_beside_positive(all_rows[:, :total].t())
    elif by_label:
        counts = _counts_by_label(all_labels, all_labels, documents.shape[0])
    directions = [Direction(z[0], documents, rows, None, row_index=rows, n_rows_global=total, **split(mask),
                            counts_everywhere=counts)]
    if symmetric:
        doc_mask = None if all_rows is None else all_rows[:, :total].t()[offset : offset + n]
        directions.append(Direction(z[1], first, rows, None, row_index=rows, n_rows_global=total, **split(doc_mask),
                                    counts_everywhere=doc_counts))
    return Layout(directions, n, total, offset, gather, **known)


def _counts_by_label(all_labels: Tensor, bank_labels: Tensor, columns: int) -> Callable[[], Tensor]:
    """``Direction.counts_everywhere`` of a direction whose mask is the
    same-label columns: each sample's anchors have the bank's ``columns``
    less those of their label (their own column and their positive among
    them). ``bank_labels`` label the bank's first columns; the rest (hard
    negatives) have none."""
    def counts() -> Tensor:
        values, per_label = torch.unique(bank_labels, return_counts=True)
        # Every sample's label is among the bank's (its positive's column).
        return columns - per_label[torch.searchsorted(values, all_labels)]

    return counts


def _counts_beside_positive(rows: Tensor) -> Callable[[], Tensor]:
    """``Direction.counts_everywhere`` of a query-document direction from its
    mask ``rows`` (n_global, m) of every sample, sample j's positive at column
    j: the columns less the masked ones and the positive."""
    return lambda: rows.shape[1] - rows.sum(dim=1) - (~rows.diagonal()).long()


def _check_gathered(gathered: Tensor, sizes: list[int], names: tuple[str, ...], d: int, check_finite: bool) -> None:
    """What :func:`check_views` leaves to the gather, on every rank alike:
    a rank without rows, and (``check_finite``) the non-finite rows of any
    rank, named by input and rank. Normalised rows are NaN where an input was
    NaN or inf. One number is read back when all is well."""
    empty = [r for r, size in enumerate(sizes) if size == 0]
    if empty:
        raise empty_ranks_error(names[0], empty, "with gather=True every rank needs at least one row")
    if not check_finite or bool(torch.isfinite(_wide_sum(gathered))):
        return
    owner = rows_rank(sizes)
    columns = zip(names, (slice(0, d), slice(d, 2 * d), slice(2 * d, None)))
    for name, cols in columns:
        bad = ~torch.isfinite(gathered[:, cols].detach()).all(dim=1).cpu()
        if bool(bad.any()):
            raise non_finite_error(name, owner[bad].unique().tolist())


def empty_ranks_error(name: str, ranks: Sequence[int], why: str) -> ValueError:
    """An empty batch on ``ranks``, refused by every rank alike (``why``: why every rank needs rows)."""
    return ValueError(
        f"{name} is an empty batch (0 rows) on {name_ranks(ranks)}; {why} (a contrastive loss needs an anchor): "
        "split the global batch so that every rank gets rows, or drop a last batch smaller than the number of ranks"
    )


def non_finite_error(name: str, ranks: Sequence[int]) -> ValueError:
    """NaN or inf in input ``name`` of ``ranks``, refused by every rank alike."""
    return ValueError(
        f"{name} contains NaN or inf on {name_ranks(ranks)} (every rank raises this error); check the encoder's "
        "output (learning rate too high, fp16 overflow) before the loss"
    )


def _counts_by_rank(direction: Direction, layout: Layout, k: int | None) -> Tensor:
    """Per rank (one row each): its anchors with fewer than ``k`` candidates
    (0 without ``k``), its anchors without any, and its fewest candidates of
    an anchor. From ``direction.counts_everywhere`` when it is known, else
    from an all-gather (every rank must call it)."""
    if direction.counts_everywhere is None:
        return every_rank(rank_counts(direction, k))
    counts = direction.counts_everywhere()
    owner = rows_rank(layout.sizes, counts.device)
    per_sample = direction.anchors.shape[0] // layout.n_local  # both views of a sample are anchors of one direction
    by_rank = torch.zeros(len(layout.sizes), dtype=torch.long, device=counts.device)
    short = by_rank.index_add(0, owner, (counts < (k or 0)).long()) * per_sample
    empty = by_rank.index_add(0, owner, (counts == 0).long()) * per_sample
    fewest = torch.full_like(by_rank, torch.iinfo(torch.long).max).scatter_reduce(0, owner, counts.long(), "amin")
    return torch.stack([short, empty, fewest], dim=1)


def rank_counts(direction: Direction, k: int | None) -> Tensor:
    """This rank's anchors of ``direction`` with fewer than ``k`` candidates
    (0 without ``k``), its anchors without any, and its fewest candidates of
    an anchor: (3,) long, what the ranks exchange. The rank needs anchors."""
    counts = candidate_counts(direction.positive_index, direction.bank.shape[0], self_index=direction.self_index,
                              mask=direction.mask, positives=direction.positives)
    return torch.stack([(counts < (k or 0)).sum(), (counts == 0).sum(), counts.min()])


def _per_rank(anchors: Sequence[int]) -> str:
    """``2 anchor(s) on rank 1``, ``2 anchor(s) on rank 0 and 1 on rank 1``."""
    parts = [f"{count} on rank {r}" for r, count in enumerate(anchors) if count]
    parts[0] = parts[0].replace(" on", " anchor(s) on", 1)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


Positives = Literal["pair", "mask"]


class BankLoss(nn.Module):
    """What the losses share: their common options (validated and kept as
    attributes of the same names), the layout of a batch under them, the
    false-negative filter and the (learnable) temperature."""

    logit_scale: LearnableTemperature | None

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
        learnable_temperature: bool = False,
        positives: Positives = "pair",
        filter_margin: float | None = None,
        filter_top: float | None = None,
    ) -> None:
        self.temperature = check_temperature(temperature)
        self.negatives = validate_negatives(negatives)
        check_loss_options(form=form, symmetric=symmetric, on_shortage=on_shortage, reduction=reduction)
        for flag, name in ((gather, "gather"), (normalize, "normalize"), (check_finite, "check_finite")):
            check_flag(flag, name)
        self.form, self.symmetric, self.gather, self.normalize = form, symmetric, gather, normalize
        self.on_shortage, self.reduction, self.check_finite = on_shortage, reduction, check_finite
        self.positives = check_choice(positives, "positives", ("pair", "mask"))
        self.filter_margin, self.filter_top = check_filter(filter_margin, filter_top)
        if normalize:
            check_cosine_margin(self.filter_margin, "the loss (normalize=True)")
        check_flag(learnable_temperature, "learnable_temperature")
        self.logit_scale = LearnableTemperature(self.temperature) if learnable_temperature else None
        #: After each call with filtering: candidates masked as likely false
        #: negatives on this rank, and their share of the candidates.
        self.last_filtered: Tensor | None = None
        self.last_filtered_fraction: Tensor | None = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """:meth:`torch.nn.Module.load_state_dict`, refusing before anything
        loads a state that a part of the loss refuses (GlobalInfoNCE's state
        of another form or holding NaN, a queue of another size): torch loads
        every part that does not refuse, so the learnable temperature took
        the refused checkpoint's value. (Loaded as a part of a larger module,
        torch's semantics stand; each part still refuses its own.)"""
        refused = [why for name, module in self.named_modules()
                   if hasattr(module, "_refusal") and (why := module._refusal(state_dict, name + "." if name else ""))]
        if refused:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(refused))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def filtering(self) -> bool:
        return self.filter_margin is not None or self.filter_top is not None

    @property
    def current_temperature(self) -> float:
        """The temperature the next call uses (the learnable one's current value)."""
        return self.logit_scale.temperature if self.logit_scale is not None else self.temperature

    def log_values(self) -> dict[str, float]:
        """Values of the last call worth logging beside the loss: the
        learnable temperature, the share of filtered candidates."""
        out: dict[str, float] = {}
        if self.logit_scale is not None:
            out["temperature"] = self.logit_scale.temperature
        if self.last_filtered_fraction is not None:
            out["filtered_fraction"] = float(self.last_filtered_fraction)
        return out

    def _option_repr(self) -> str:
        parts = []
        if self.logit_scale is not None:
            parts.append("learnable_temperature=True")
        if self.positives != "pair":
            parts.append(f"positives={self.positives!r}")
        if self.filter_margin is not None:
            parts.append(f"filter_margin={self.filter_margin}")
        if self.filter_top is not None:
            parts.append(f"filter_top={self.filter_top}")
        return "".join(", " + p for p in parts)

    #: Whether :meth:`_plain_forward` also takes ``negatives=K``, drawn as
    #: the layout draws them (with fewer than K candidates, the layout's
    #: rules apply: the call takes the layout).
    plain_sampled = False

    #: The most logits (n x m) of a plain call with ``symmetric=True`` that the
    #: short path takes (see :data:`SMALL_DENSE_LOGITS` for the others).
    plain_symmetric_logits = SMALL_DENSE_LOGITS

    def _plain_forward(self, a: Tensor, b: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The loss of a plain call (see :meth:`_plain_call`), for the losses
        that have such a short path (InfoNCE, SigLIP)."""
        raise NotImplementedError

    def _plain_call(self, a: object, b: object, hard_negatives: Tensor | None, *extras: object) -> bool:
        """Whether this call is a small batch of one process contrasted with
        its in-batch candidates only, every one of them (``extras``, the
        forward's other inputs, all None), which :meth:`_plain_forward`
        computes in fewer steps; the other calls take the layout."""
        return (
            type(self)._plain_forward is not BankLoss._plain_forward
            and isinstance(a, Tensor) and isinstance(b, Tensor)
            and a.dim() == 2 and a.shape == b.shape and a.shape[0] > 0
            and a.dtype in (torch.float32, torch.float64) and b.dtype == a.dtype and a.device == b.device
            and (hard_negatives is None or (hard_negatives.dim() == 3 and hard_negatives.shape[1] == 0
                                            and self.form == "query_document"))
            and all(x is None for x in extras)
            and not self.gather and self.normalize and not self.filtering
            and self.positives == "pair"  # "mask" needs labels or a mask: the layout refuses the call
            and (self.negatives == "all"
                 or (self.plain_sampled and self.negatives <= in_batch_candidates(self.form, a.shape[0])))
            and (2 * a.shape[0] if self.form == "two_view" else a.shape[0]) ** 2 <= (
                self.plain_symmetric_logits if self.symmetric else SMALL_DENSE_LOGITS)
            and not autocast_active(a.device)
        )

    def _plain_result(self, a: Tensor, b: Tensor, values: Tensor, reduced: bool = False) -> Tensor:
        """A plain call's per-anchor values reduced (unless ``reduced``),
        after the finite check. Every input entry reaches some loss value (a
        sampled anchor's own row among them): a NaN or inf input makes the
        output non-finite. One look at the output's sum then stands for the
        look at both inputs, which runs (and names the culprit) only when the
        sum is not finite; one number read back costs a fraction of a
        test-and-reduce over the values."""
        if not reduced:
            values = reduce_values(values, self.reduction)
        if self.check_finite and not math.isfinite(values.detach().sum().item()):
            self._check_views(a, b)
        return values

    def _check_views(self, a: Tensor, b: Tensor, form: Form | None = None, *, later: bool = False) -> None:
        """:func:`check_views` of the loss's inputs and its own scalars;
        ``later``: an empty batch and non-finite inputs are checked on every
        rank alike after a collective, as with gather (a queue's exchange)."""
        check_views(a, b, self.form if form is None else form, self.check_finite, self._own_scalars(),
                    deferred=self.gather or later)

    def _own_scalars(self) -> list[tuple[str, Tensor]]:
        """The loss's learnable scalars as the kernels use them: the
        log-scale after its clamp (an inf is clamped to the bound; a NaN
        stays NaN) and SigLIP's bias."""
        scalars = []
        if self.logit_scale is not None:
            log_scale = self.logit_scale.log_scale.detach()
            scalars.append(("logit_scale.log_scale", log_scale.clamp(0.0, math.log(self.logit_scale.max_scale))))
        bias = getattr(self, "bias", None)
        if isinstance(bias, Tensor):
            scalars.append(("bias", bias))
        return scalars

    def _layout(
        self,
        a: Tensor,
        b: Tensor,
        hard_negatives: Tensor | None,
        mask: Tensor | None,
        bank: Bank = "both_views",
        labels: Tensor | None = None,
    ) -> Layout:
        if self.positives == "mask" and mask is None and labels is None:
            # Without either, every candidate would be a negative: plain InfoNCE, silently.
            raise ValueError(
                'positives="mask" takes its further positives from labels= or mask=, and the call '
                'passed neither: pass one of them, or use positives="pair"'
            )
        return build_layout(
            a, b, hard_negatives, form=self.form, symmetric=self.symmetric, gather=self.gather, mask=mask,
            labels=labels, mask_as_positives=self.positives == "mask", normalize=self.normalize,
            check_finite=self.check_finite, bank=bank,
        )

    def _filter(self, layout: Layout, guide: Sequence[Tensor] | None, bank: Bank = "both_views") -> None:
        """Mask the likely false negatives of every direction (see
        :mod:`negbatch.losses.filtering`): judged by the ``guide`` embeddings
        (a frozen model's, of the same rows as the loss's inputs) or, without
        them, by the loss's own embeddings (detached). Counts are kept in
        ``last_filtered`` and ``last_filtered_fraction``."""
        if not self.filtering:
            if guide is not None:
                raise ValueError("guide= embeddings are used by the false-negative filter: set filter_margin or filter_top")
            return
        judges = layout.directions
        if guide is not None:
            if getattr(self, "queue", None) is not None:
                # Checked on the first call too, when the queue is still empty
                # and the counts would agree, not only once it fills.
                raise ValueError(
                    "guide= cannot be combined with a queue (queue_size > 0): the queue's entries have no guide "
                    "embeddings; leave guide= out to filter with the model's own embeddings"
                )
            if not self.normalize:  # the guide's similarities are cosines, the loss's are not
                check_cosine_margin(self.filter_margin, "the guide")
            judges = self._guide_layout(guide, layout, bank).directions
        hits = total = None
        directions = []
        for direction, judge in zip(layout.directions, judges):
            if judge.bank.shape[0] != direction.bank.shape[0]:
                raise ValueError(
                    f"guide embeddings give {judge.bank.shape[0]} candidates per anchor but the loss has "
                    f"{direction.bank.shape[0]}: pass the guide model's embeddings of the loss's own inputs, "
                    "(a, b), or (a, b, hard_negatives) with as many hard negatives per query as the loss got"
                )
            hit, candidates = _false_negatives(
                judge.anchors.detach(), judge.bank.detach(), direction.positive_index, self_index=direction.self_index,
                excluded=direction.mask, positives=direction.positives, margin=self.filter_margin, top=self.filter_top,
            )
            # The filter judges this rank's anchors only: their counts are this rank's to tell.
            directions.append(replace(direction, mask=hit if direction.mask is None else (direction.mask | hit),
                                      counts_everywhere=None))
            found, count = hit.sum(), candidates
            hits, total = (found, count) if hits is None else (hits + found, total + count)
        layout.directions = directions
        self.last_filtered = hits
        # In the embeddings' precision (float64 inputs: an exact share, not float32's).
        share_dtype = directions[0].anchors.dtype if directions[0].anchors.dtype == torch.float64 else torch.float32
        self.last_filtered_fraction = hits.to(share_dtype) / total.clamp(min=1).to(share_dtype)

    def _guide_layout(self, guide: Sequence[Tensor], layout: Layout, bank: Bank) -> Layout:
        if isinstance(guide, Tensor) or not isinstance(guide, (tuple, list)) or len(guide) not in (2, 3):
            raise TypeError(
                "guide must be a tuple of the guide model's embeddings of the same rows: (view1, view2), "
                "(queries, documents) or (queries, documents, hard_negatives)"
            )
        first = layout.directions[0].anchors
        a, b = guide[0], guide[1]
        check_views(a, b, self.form, self.check_finite, prefix="guide ", deferred=self.gather)
        if a.shape[0] != layout.n_local or a.device != first.device:
            raise ValueError(
                f"guide embeddings must hold the batch's {layout.n_local} rows on {first.device}, "
                f"got {a.shape[0]} rows on {a.device}"
            )
        hard = guide[2] if len(guide) == 3 else None
        with torch.no_grad():
            return build_layout(a, b, hard, form=self.form, symmetric=self.symmetric, gather=self.gather,
                                normalize=True, check_finite=self.check_finite, bank=bank, prefix="guide ")

    #: Why an anchor without negatives is refused, for the losses whose
    #: denominator holds negatives only (DCL, GlobalInfoNCE); None: allowed.
    needs_a_negative: str | None = None

    def _no_negatives_error(self, anchors: str = "an anchor has") -> ValueError:
        """The refusal of anchors without negatives; ``anchors`` says which."""
        return ValueError(
            f"{anchors} no negatives (a batch of one sample, or every candidate masked or a positive); "
            f"{self.needs_a_negative}. {self._filter_note() or BATCH_OF_ONE_HINT}"
        )

    def _negatives_of(
        self, direction: Direction, generator: torch.Generator | None, layout: Layout
    ) -> NegativeSelection:
        """``direction.select`` under this loss's options, once the ranks
        agree (:meth:`_agree_on_candidates`). An anchor short of K candidates
        is blamed on the batch; when this loss masked candidates of its own
        (the filter) or holds a queue still filling, the error says so, since
        lowering K or enlarging the batch is then not the fix."""
        try:
            self._agree_on_candidates(direction, layout)
            return direction.select(self.negatives, generator, self.on_shortage)
        except ShortageError as error:
            notes = " ".join(note for note in (self._filter_note(), self._queue_note()) if note)
            if not notes:
                raise
            raise ShortageError(f"{error} {notes}") from None

    def _agree_on_candidates(self, direction: Direction, layout: Layout) -> None:
        """With gather on several ranks: every rank raises, alike, when an
        anchor of any rank has fewer than K candidates (``on_shortage=
        "raise"``) or, for a loss that needs one, no negative. A rank that
        raised alone would leave the others waiting in the next collective
        (the backward's all-reduce, the next gather).

        Without a mask every anchor of every rank has as many candidates:
        the ranks agree already. With one, every rank computes every anchor's
        count where it holds what decides it (``Direction.counts_everywhere``:
        gathered labels, a mask gathered whole); otherwise (a mask of each
        rank's own rows, the filter, a queue) the ranks exchange their counts
        in one all-gather of three integers each.

        Without gather, a loss whose queue holds every rank's batch sent its
        counts with its indices (``Direction.counts_by_rank``): each rank's
        bank is its own batch and the queue, of its own number of columns."""
        k = self.refused_k
        if k is None and self.needs_a_negative is None:
            return
        if direction.counts_by_rank is not None:
            short, empty, fewest, columns = direction.counts_by_rank.t().tolist()
        elif len(layout.sizes) < 2 or (direction.mask is None and direction.positives is None):
            return
        else:
            short, empty, fewest = _counts_by_rank(direction, layout, k).t().tolist()
            columns = [direction.bank.shape[0]] * len(short)
        if k is not None and any(short):
            worst = fewest.index(min(fewest))
            raise ShortageError(shortage_message(k, _per_rank(short), fewest[worst], columns[worst]))
        if self.needs_a_negative is not None and any(empty):
            raise self._no_negatives_error(f"{_per_rank(empty)} have")

    @property
    def refused_k(self) -> int | None:
        """K when an anchor short of K candidates is refused (``negatives=K``,
        ``on_shortage="raise"``); None when no anchor is refused for it."""
        return self.negatives if self.negatives != "all" and self.on_shortage == "raise" else None

    def _filter_note(self) -> str:
        """What the false-negative filter masked in this call, for errors
        about anchors left short of candidates; empty when it masked none."""
        if not self.filtering or self.last_filtered is None or not int(self.last_filtered):
            return ""
        options = ", ".join(f"{name}={value:g}" for name, value in
                            (("filter_margin", self.filter_margin), ("filter_top", self.filter_top)) if value is not None)
        return (f"The false-negative filter ({options}) masked {int(self.last_filtered)} candidates "
                f"({float(self.last_filtered_fraction):.0%} of this call's): filter less (a lower filter_margin, "
                "a smaller filter_top).")

    def _queue_note(self) -> str:
        """A queue still filling, for errors about anchors short of K (none here)."""
        return ""

    def _temperature(self, layout: Layout) -> float:
        """The temperature the kernels use: the fixed one, or 1 with the
        anchors multiplied by the learnable scale."""
        if self.logit_scale is None:
            return self.temperature
        layout.scale_anchors(self.logit_scale())
        return 1.0


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
