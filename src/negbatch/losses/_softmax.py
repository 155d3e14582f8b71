"""The softmax family's per-direction math, and the base of InfoNCE and DCL.

For one direction of the candidate bank (anchors, bank, the selection of
each anchor's candidates), every softmax loss of negbatch needs two numbers
per anchor:

* ``lse``: the log-sum-exp of the logits over the denominator's columns
  (the positives and the negatives; the negatives only when the loss is
  *decoupled*, as DCL and the global loss's normaliser are);
* ``positive``: the mean logit of the anchor's positives (the paired one, or
  all of them with ``positives="mask"``: SupCon's L_out).

InfoNCE is ``lse - positive``; DCL is ``lse_negatives - w * positive``.
:func:`softmax_terms` computes both, either in one fused pass holding a
single (n, m) buffer (:class:`_DenseSoftmax`, every candidate, float32/64)
or from :func:`negbatch.negatives.selection_logits` with autograd.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import all_finite, check_flag, is_int, refuse_second_order
from ._exp import exp_floored_
from ._pair import exp_lower_bound, scaled_logits, shared_directions
from ..distributed import any_rank, gather_nograd, gather_with_sizes, is_distributed, name_ranks, world_size
from ..negatives import NegativeSelection, selection_logits
from . import _layout
from ._layout import (
    BankLoss, Direction, Layout, check_labels, empty_ranks_error, fused_dense, input_names, non_finite_error,
    rank_counts, row_blocks,
)
from .queue import NegativeQueue

__all__ = ["softmax_terms", "SoftmaxLoss", "check_sample_indices"]


def exclude_self(logits: Tensor, self_index: Tensor | None) -> None:
    """Each row's own column (``self_index``; -1: none) set to -inf, in place."""
    if self_index is None:
        return
    has_self = self_index >= 0
    rows = torch.arange(logits.shape[0], device=logits.device)[has_self]
    logits[rows, self_index[has_self]] = float("-inf")


def _softmax_buffer_(buf: Tensor, selection: NegativeSelection, decoupled: bool, lowest: float | None):
    """Turn the logits ``buf`` (n, m) of one direction, in place, into
    ``exp(l - shift)`` (zero on the columns outside the denominator).
    ``buf`` may be a transposed view (the column direction of
    :class:`~._pair.PairOfDirections`). Returns ``(lse, positive)`` and what
    :func:`_logit_gradient_` needs: ``(total, col, pos_mask, count)``."""
    n = buf.shape[0]
    col = selection.positive_index[:, None]
    pos_mask = selection.positive_mask
    if pos_mask is None:
        positive = buf.gather(1, col).squeeze(1)
        count = None
    else:
        count = pos_mask.sum(dim=1).to(buf.dtype)
        positive = buf.new_empty(n)
        for rows in row_blocks(*buf.shape):
            positive[rows] = torch.where(pos_mask[rows], buf[rows], 0.0).sum(dim=1)
        positive /= count
    if selection.only_self_excluded:
        # Only the anchor's own column leaves the denominator (and the
        # positive, decoupled): fill those entries instead of scanning an
        # (n, m) mask.
        exclude_self(buf, selection.self_index)
        if decoupled:
            buf.scatter_(1, col, float("-inf"))
    shifts, totals = [], []
    for rows in row_blocks(*buf.shape):
        block = buf[rows]
        if not selection.only_self_excluded:
            outside = ~selection.allowed[rows]
            if decoupled:
                outside |= pos_mask[rows] if pos_mask is not None else outside.scatter(1, col[rows], True)
            block.masked_fill_(outside, float("-inf"))
        shift = block.amax(dim=1)
        exp_floored_(block.sub_(shift[:, None]), lowest)  # the excluded entries (-inf) become 0
        shifts.append(shift)
        totals.append(block.sum(dim=1))
    if len(shifts) == 1:
        shift, total = shifts[0], totals[0]
    else:  # several row blocks, or none (no anchors)
        shift, total = (torch.cat(shifts), torch.cat(totals)) if shifts else (buf.new_empty(0), buf.new_empty(0))
    lse = total.log().add_(shift)
    return lse, positive, (total, col, pos_mask, count)


def _logit_gradient_(buf: Tensor, kept: tuple, grad_lse: Tensor | None, grad_positive: Tensor | None,
                     inv_tau: float) -> None:
    """Turn a buffer of :func:`_softmax_buffer_`, in place, into d loss / d scores."""
    total, col, pos_mask, count = kept
    # d lse / d logit = softmax over the denominator = buf / total;
    # d positive / d logit = 1/count on the positives; times 1/tau for the scores.
    if grad_lse is None:
        buf.zero_()
    else:
        buf.mul_((grad_lse * inv_tau / total)[:, None])
    if grad_positive is not None:
        if pos_mask is None:
            buf.scatter_add_(1, col, (grad_positive * inv_tau)[:, None])
        else:
            weight = (grad_positive * inv_tau / count)[:, None]
            for rows in row_blocks(*buf.shape):
                buf[rows] += torch.where(pos_mask[rows], weight[rows], 0.0)


class _DenseSoftmax(torch.autograd.Function):
    """``(lse, positive)`` of every anchor over all its candidates, holding
    one (n, m) buffer.

    The forward turns the logits into ``exp(l - shift)`` in place (zero on
    the columns outside the denominator) and keeps the buffer; the backward
    turns it, in place, into ``d loss / d logits`` before the two products
    with the embeddings. Autograd's version keeps the logits, their masked
    copy and the log-softmax (about 3.4 copies of n x m at peak). The price:
    the backward runs once (``retain_graph=True`` and a second backward
    raise).
    """

    @staticmethod
    def forward(ctx, anchors, bank, selection, temperature, decoupled):  # type: ignore[override]
        buf = scaled_logits(anchors, bank, temperature)
        lse, positive, kept = _softmax_buffer_(buf, selection, decoupled,
                                               exp_lower_bound(anchors, bank, temperature))
        ctx.save_for_backward(anchors, bank, buf, *kept)
        ctx.temperature = temperature
        ctx.consumed = False
        return lse, positive

    @staticmethod
    def backward(ctx, grad_lse, grad_positive):  # type: ignore[override]
        refuse_second_order(ctx)
        if ctx.consumed:
            raise RuntimeError("the dense softmax backward runs once; do not backward twice through the loss")
        ctx.consumed = True
        anchors, bank, buf, *kept = ctx.saved_tensors
        _logit_gradient_(buf, kept, grad_lse, grad_positive, 1.0 / ctx.temperature)
        grad_anchors = buf @ bank if ctx.needs_input_grad[0] else None
        grad_bank = buf.t() @ anchors if ctx.needs_input_grad[1] else None
        return grad_anchors, grad_bank, None, None, None


class SoftmaxKernel:
    """:func:`_softmax_buffer_` and :func:`_logit_gradient_` as a kernel of
    :class:`~._pair.PairOfDirections`: per direction ``(lse, positive)``."""

    non_differentiable = ()

    def __init__(self, decoupled: bool) -> None:
        self.decoupled = decoupled

    def forward_(self, buf: Tensor, selection: NegativeSelection, lowest: float | None, extra: None):
        lse, positive, kept = _softmax_buffer_(buf, selection, self.decoupled, lowest)
        return (lse, positive), kept

    def backward_(self, buf: Tensor, kept, grads, inv_tau: float) -> None:
        _logit_gradient_(buf, kept, grads[0], grads[1], inv_tau)


def softmax_terms(
    anchors: Tensor, bank: Tensor, selection: NegativeSelection, temperature: float, *, decoupled: bool = False
) -> tuple[Tensor, Tensor]:
    """Per anchor: the log-sum-exp over the denominator (without the
    positives when ``decoupled``) and the mean logit of the positives.

    Examples
    --------
    >>> import torch
    >>> from negbatch import select_negatives
    >>> from negbatch.losses._softmax import softmax_terms
    >>> a, bank = torch.randn(3, 4), torch.randn(5, 4)
    >>> sel = select_negatives(torch.tensor([0, 1, 2]), 5, "all")
    >>> lse, pos = softmax_terms(a, bank, sel, 0.5)
    >>> logits = a @ bank.t() / 0.5
    >>> bool(torch.allclose(lse, logits.logsumexp(1))), bool(torch.allclose(pos, logits.diagonal()))
    (True, True)
    """
    if fused_dense(selection, anchors):
        return _DenseSoftmax.apply(anchors, bank, selection, temperature, decoupled)
    logits = selection_logits(anchors, bank, selection, temperature)
    slots = selection.positive_slots()
    if slots is None:
        col = selection.positive_column[:, None]
        positive = logits.gather(1, col).squeeze(1)
        denominator = logits.scatter(1, col, float("-inf")) if decoupled else logits
    else:
        positive = logits.masked_fill(~slots, 0.0).sum(dim=1) / slots.sum(dim=1)
        denominator = logits.masked_fill(slots, float("-inf")) if decoupled else logits
    # Half-precision logits: the sum of the exponentials in float32.
    wide = denominator.float() if denominator.dtype in (torch.float16, torch.bfloat16) else denominator
    return torch.logsumexp(wide, dim=1).to(logits.dtype), positive


def info_nce_values(anchors: Tensor, bank: Tensor, selection: NegativeSelection, temperature: float) -> Tensor:
    """Per-anchor InfoNCE ``lse - positive`` (SupCon's L_out with several positives)."""
    if selection.single_positive and not (fused_dense(selection, anchors) and takes_fused_terms(selection)):
        logits = selection_logits(anchors, bank, selection, temperature)
        return F.cross_entropy(logits, selection.positive_column, reduction="none")
    lse, positive = softmax_terms(anchors, bank, selection, temperature)
    return lse - positive


def takes_fused_terms(selection: NegativeSelection, small: int | None = None) -> bool:
    """Whether InfoNCE computes a fused dense selection by :func:`softmax_terms`:
    one positive per anchor over at most ``small`` logits (default
    :data:`~._layout.SMALL_DENSE_LOGITS`) takes autograd's cross-entropy
    instead (one kernel pass)."""
    small = _layout.SMALL_DENSE_LOGITS if small is None else small
    return not (selection.single_positive and selection.allowed.numel() <= small)


def count_negatives(selection: NegativeSelection, bank_size: int) -> Tensor:
    """Negatives of every anchor (the denominator of a decoupled loss without the positives)."""
    if not selection.is_dense:
        return (selection.valid[:, selection.num_positive_slots :]).sum(dim=1)
    if selection.only_self_excluded and selection.positive_mask is None:
        has_self = selection.self_index >= 0 if selection.self_index is not None else None
        base = torch.full_like(selection.positive_index, bank_size - 1)
        return base - has_self.long() if has_self is not None else base
    return selection.negative_mask().sum(dim=1)


def check_sample_indices(indices: object, n: int, device: torch.device, name: str = "indices") -> Tensor:
    """Data-set indices of a batch: a 1-d integer tensor, one per sample."""
    if not isinstance(indices, Tensor):
        raise TypeError(
            f"{name} must be a 1-d torch.long tensor of data-set indices (a queue never contrasts an anchor with "
            f"its own entries), got {type(indices).__name__}"
        )
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long) of data-set indices, got dtype {indices.dtype}")
    if indices.dim() != 1 or indices.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), one data-set index per sample, got {tuple(indices.shape)}")
    return indices.to(device=device, dtype=torch.long)


class SoftmaxLoss(BankLoss):
    """InfoNCE and DCL: the layout, an optional queue of past embeddings,
    the false-negative filter, the temperature and one reduction around a
    per-direction value (:meth:`_direction_values`)."""

    queue: NegativeQueue | None

    def _set_queue(self, queue_size: int) -> None:
        if not is_int(queue_size) or queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0 (0: no queue), got {queue_size!r}")
        roles = 1 if self.form == "two_view" else 1 + self.symmetric
        self.queue = NegativeQueue(int(queue_size), roles) if queue_size else None

    #: Whether the denominator leaves the positives out (DCL).
    decoupled = False

    def _direction_values(self, direction: Direction, selection: NegativeSelection, temperature: float,
                          layout: Layout, index: int, terms: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """This direction's per-anchor values; ``terms``: its ``(lse, positive)``
        when :meth:`_shared_terms` computed them."""
        raise NotImplementedError

    def _check_selection(self, direction: Direction, selection: NegativeSelection) -> None:
        """Refuse a selection the loss cannot use (DCL: an anchor without a negative)."""

    def _takes_fused_terms(self, selection: NegativeSelection) -> bool:
        """Whether this loss computes a direction of ``selection`` by :func:`softmax_terms`'s fused path."""
        return True

    def _shared_terms(self, layout: Layout, selections: list[NegativeSelection],
                      temperature: float) -> list[tuple[Tensor, Tensor]] | None:
        """Both directions' ``(lse, positive)`` from one product
        (:class:`~._pair.PairOfDirections`) when the second's logits are the first's
        transposed: a symmetric query-document call of one process, its
        document-to-query bank the queries (no queued entries), both
        directions on the fused all-candidates path. None otherwise."""
        out = shared_directions(layout, self.form, self.symmetric, selections, temperature,
                                SoftmaxKernel(self.decoupled), takes=self._takes_fused_terms)
        return None if out is None else [out[:2], out[2:]]

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        hard_negatives: Tensor | None = None,
        *,
        indices: Tensor | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        guide: tuple[Tensor, ...] | None = None,
        generator: torch.Generator | None = None,
        update: bool = True,
    ) -> Tensor:
        check_flag(update, "update")  # update="no" would count as True and fill the queue
        if self._plain_call(a, b, hard_negatives, indices, labels, mask, guide):
            return self._plain_forward(a, b, generator)
        spread = self._spread()
        self._check_views(a, b, later=spread)
        n = a.shape[0]
        if self.queue is not None:
            if indices is None:
                raise ValueError(
                    "a loss with a queue (queue_size > 0) needs indices=, the data-set index of each sample, so that "
                    "an anchor never meets its own queued entries"
                )
            indices = check_sample_indices(indices, n, a.device)
        elif indices is not None:
            raise ValueError("indices= is used by the queue only; set queue_size > 0 or leave indices out")
        labels = check_labels(labels, n, a.device)
        if spread:
            found = self._inputs_found(a, b, hard_negatives)
            if any(found[:4]) or not self.queue.fits(a.shape[1]):
                # Refused: this rank sends now, the others after their layout (the same gather), and all raise.
                self._exchange(indices, found)
        layout = self._layout(a, b, hard_negatives, mask, labels=labels)
        all_indices = None
        if self.queue is not None:
            # Gathered, every rank's indices, once: the duplicates' check and the enqueue read them.
            all_indices = gather_nograd(indices) if layout.gathered else indices
            self._exclude_same_index(layout, indices, all_indices)
            self._extend_with_queue(layout, indices, labels)
        self._filter(layout, guide)
        if spread:
            all_indices = self._exchange(indices, found, layout)
        temperature = self._temperature(layout)
        selections = []
        for direction in layout.directions:
            selections.append(self._negatives_of(direction, generator, layout))
            self._check_selection(direction, selections[-1])
        terms = self._shared_terms(layout, selections, temperature)
        values = [self._direction_values(direction, selection, temperature, layout, i,
                                         None if terms is None else terms[i])
                  for i, (direction, selection) in enumerate(zip(layout.directions, selections))]
        if self.queue is not None and update:
            self._enqueue(layout, all_indices, labels)
        # Directions hold equal numbers of anchors: the mean of the concatenation
        # is the average of the directions.
        return layout.reduce(torch.cat(values) if len(values) > 1 else values[0], self.reduction)

    def _plain_call(self, a: object, b: object, hard_negatives: Tensor | None, *extras: object) -> bool:
        return self.queue is None and super()._plain_call(a, b, hard_negatives, *extras)

    # ------------------------------------------------------------------ queue

    def _spread(self) -> bool:
        """Whether every rank's queue holds every rank's batch without gather:
        the enqueue gathers the batches of every rank, so a batch refused by
        one rank must be refused by all before it (:meth:`_exchange`)."""
        return self.queue is not None and not self.gather and world_size() > 1

    def _inputs_found(self, a: Tensor, b: Tensor, hard_negatives: Tensor | None) -> list[int]:
        """What this rank tells the others of its inputs (:meth:`_exchange`):
        whether its batch is empty, whether each input holds NaN or inf (with
        ``check_finite``; a hard_negatives that is not a tensor is refused by
        the layout) and its width."""
        inputs = (a, b, hard_negatives)
        bad = [0, 0, 0]
        # One sum of everything, one number read back, as check_views does; each input
        # on its own only when it is not finite.
        if self.check_finite and not bool(torch.isfinite(sum(_layout._wide_sum(x).float() for x in inputs
                                                              if isinstance(x, Tensor)))):
            bad = [int(isinstance(x, Tensor) and not all_finite(x)) for x in inputs]
        return [int(a.shape[0] == 0), *bad, a.shape[1]]

    def _exchange(self, indices: Tensor, found: list[int], layout: Layout | None = None) -> Tensor:
        """Every rank's indices (for the enqueue), gathered with what every
        rank found in its batch; without gather, under a queue that holds
        every rank's batch. Every rank then raises alike, naming the ranks
        at fault, for an empty batch, NaN or inf, or a width the queue does
        not hold; when the loss may refuse an anchor (K under
        ``on_shortage="raise"``, DCL) each direction's counts come along and
        :meth:`_agree_on_candidates` reads them. No collective of its own:
        these integers ride on the gather of the indices, which ran anyway.

        ``layout`` None: this rank's inputs are refused and it sends before
        building one (the others send after theirs: the same gather)."""
        k = self.refused_k
        roles = self.queue.roles if (k is not None or self.needs_a_negative is not None) else 0
        counts = indices.new_zeros(roles, 4)  # a refused rank's are never read: the inputs' error comes first
        if layout is not None:
            for role, direction in enumerate(layout.directions[:roles]):
                counts[role, :3] = rank_counts(direction, k)
                counts[role, 3] = direction.bank.shape[0]
        head = len(found) + counts.numel()
        sent = torch.cat([indices.new_tensor(found), counts.flatten(), indices])
        gathered, sizes = gather_with_sizes(sent)  # an integer tensor: no gradient
        parts = gathered.split(sizes)
        told = torch.stack([part[:head] for part in parts]).cpu()
        self._refuse_inputs(told[:, : len(found)])
        if layout is None:
            raise AssertionError("a rank whose inputs are refused raised above")
        by_rank = told[:, len(found) :].view(len(sizes), roles, 4)
        layout.directions = [replace(d, counts_by_rank=by_rank[:, i]) if i < roles else d
                             for i, d in enumerate(layout.directions)]
        return torch.cat([part[head:] for part in parts])

    def _refuse_inputs(self, found: Tensor) -> None:
        """Raise, on every rank alike, what the ranks found in their inputs
        (one row of :meth:`_inputs_found` per rank), naming the ranks: the
        checks a single process makes before its layout, in its order."""
        names = (*input_names(self.form), "hard_negatives")
        empty = found[:, 0].nonzero().flatten().tolist()
        if empty:
            raise empty_ranks_error(names[0], empty, "every rank raises this error, as every rank's queue holds "
                                    "every rank's batch, and each rank needs at least one row")
        for column, name in enumerate(names, start=1):
            ranks = found[:, column].nonzero().flatten().tolist()
            if ranks:
                raise non_finite_error(name, ranks)
        widths = found[:, 4].tolist()
        for width in widths:
            if not self.queue.fits(width):
                ranks = [r for r, w in enumerate(widths) if w == width]
                self.queue.check_width(width, f" on {name_ranks(ranks)} (every rank raises this error)")

    def _anchor_rows(self, x: Tensor, index: int) -> Tensor:
        """Per-sample values (B,) laid out as direction ``index``'s anchors."""
        return torch.cat([x, x]) if self.form == "two_view" else x

    def _extend_with_queue(self, layout: Layout, indices: Tensor, labels: Tensor | None) -> None:
        directions = []
        for role, direction in enumerate(layout.directions):
            entries, entry_indices = self.queue.entries(role)
            if entries.shape[0] == 0:
                directions.append(direction)
                continue
            self.queue.check_width(direction.bank.shape[1])
            anchor_indices = self._anchor_rows(indices, role)
            own = None
            matches = bool(torch.isin(anchor_indices, entry_indices).any())
            # Gathered, the ranks decide together, as one process on the global batch does: a rank
            # without a match took another selection path (for K = the bank's candidates it drew no
            # random numbers), and its generator fell a draw behind the others'.
            if any_rank(matches, anchor_indices.device) if layout.gathered else matches:
                own = anchor_indices[:, None] == entry_indices[None, :]
            same = None
            entry_labels = self.queue.entry_labels(role) if labels is not None else None
            if entry_labels is not None:
                values, labelled = entry_labels
                same = (self._anchor_rows(labels, role)[:, None] == values[None, :]) & labelled[None, :]
                if own is not None:
                    same &= ~own
            if self.positives == "mask":
                extra_mask, extra_positives = own, same
            else:
                extra_mask, extra_positives = (own if same is None else (same if own is None else own | same)), None
            directions.append(direction.extended(entries.to(device=direction.bank.device), extra_mask, extra_positives))
        layout.directions = directions

    def _exclude_same_index(self, layout: Layout, indices: Tensor, all_indices: Tensor) -> None:
        """Rows of one data-set index in the batch (a sampler with replacement,
        a distributed sampler's padding) are left out of each other's
        candidates, as an anchor's own queued entries are: neither negatives
        nor, with ``positives="mask"``, positives. The paired positive stays."""
        bank_indices = all_indices if layout.gathered else indices
        if int(torch.unique(bank_indices).numel()) == bank_indices.numel():
            return  # the common case: one look, the same on every rank when gathered
        directions = []
        for role, direction in enumerate(layout.directions):
            columns = torch.cat([bank_indices, bank_indices]) if self.form == "two_view" else bank_indices
            same = self._anchor_rows(indices, role)[:, None] == columns[None, :]
            # Hard negatives (the columns after the documents) carry no index.
            same = torch.cat([same, same.new_zeros(same.shape[0], direction.bank.shape[0] - same.shape[1])], dim=1)
            mask = same if direction.mask is None else direction.mask | same
            positives = None if direction.positives is None else direction.positives & ~same
            directions.append(replace(direction, mask=mask, positives=positives, counts_everywhere=None))
        layout.directions = directions

    def _enqueue(self, layout: Layout, all_indices: Tensor, labels: Tensor | None) -> None:
        spread = is_distributed() and not layout.gathered  # every rank's queue holds every rank's batch
        gather = gather_nograd if is_distributed() else (lambda x: x)
        all_labels = None
        if labels is not None:
            all_labels = layout.labels if layout.gathered else gather(labels)
        first, second = layout.first.detach(), layout.second.detach()
        if spread:
            first, second = gather_nograd(first), gather_nograd(second)
        if self.form == "two_view":
            both = None if all_labels is None else torch.cat([all_labels, all_labels])
            self.queue.enqueue(0, torch.cat([first, second]), torch.cat([all_indices, all_indices]), both)
            return
        self.queue.enqueue(0, second, all_indices, all_labels)
        if self.symmetric:
            self.queue.enqueue(1, first, all_indices, all_labels)

    def _queue_note(self) -> str:
        # Checked before this call's enqueue: the entries its anchors met.
        if self.queue is None or len(self.queue) >= self.queue.size:
            return ""
        return (f"The queue holds {len(self.queue)} of its {self.queue.size} entries (it fills over the first steps): "
                "pass on_shortage='use_all' so that those steps contrast their anchors with the candidates there are.")

    def _queue_repr(self) -> str:
        return f", queue_size={self.queue.size}" if self.queue is not None else ""
