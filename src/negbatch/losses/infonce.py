"""InfoNCE with negatives decoupled from the batch size.

Two forms share one module:

* ``form="two_view"`` (SimCLR's NT-Xent): ``forward(view1, view2)``; each of
  the 2B views is an anchor, its other view the positive, the other 2B-2 views
  its candidates.
* ``form="query_document"`` (dual encoder): ``forward(queries, documents,
  hard_negatives)``; query i's positive is document i, the other documents and
  every extra hard negative are its candidates; ``symmetric=True`` adds the
  document-to-query term.

``negatives="all"`` is the standard loss; ``negatives=K`` contrasts every
anchor with K of its own candidates drawn uniformly without replacement
(Mitrovic et al., "Less can be more in contrastive learning").
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    check_choice,
    check_embeddings,
    check_mask,
    check_nonempty,
    check_same,
    check_temperature,
)
from ..distributed import gather_nograd, gather_with_grad, global_batch_mean
from ..negatives import (
    Negatives,
    OnShortage,
    autocast_active,
    select_negatives,
    selection_logits,
    validate_negatives,
)

Form = Literal["two_view", "query_document"]
Reduction = Literal["mean", "sum", "none"]

__all__ = ["InfoNCE", "info_nce_per_anchor"]


def info_nce_per_anchor(
    anchors: Tensor,
    bank: Tensor,
    positive_index: Tensor,
    *,
    temperature: float,
    negatives: Negatives = "all",
    self_index: Tensor | None = None,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    on_shortage: OnShortage = "raise",
    row_index: Tensor | None = None,
    n_rows_global: int | None = None,
) -> Tensor:
    """Per-anchor InfoNCE: ``-log softmax`` of the positive among the positive
    and the anchor's negatives (see :func:`negbatch.negatives.select_negatives`).

    ``anchors`` (n, d) and ``bank`` (m, d) are used as given (normalise them
    first for cosine similarities). Returns a tensor of shape (n,).
    """
    selection = select_negatives(
        positive_index,
        bank.shape[0],
        negatives,
        self_index=self_index,
        mask=mask,
        generator=generator,
        on_shortage=on_shortage,
        row_index=row_index,
        n_rows_global=n_rows_global,
    )
    if selection.is_dense and anchors.dtype in (torch.float32, torch.float64) and not autocast_active(anchors.device):
        return _DenseInfoNCE.apply(anchors, bank, selection.allowed, selection.positive_index, temperature)
    logits = selection_logits(anchors, bank, selection, temperature)
    return F.cross_entropy(logits, selection.positive_column, reduction="none")


_BLOCK_ELEMENTS = 1 << 22


class _DenseInfoNCE(torch.autograd.Function):
    """Per-anchor InfoNCE over all candidates holding one (n, m) buffer.

    Autograd's version keeps the logits, their masked copy and the
    log-softmax (about 3.4 copies of n x m at peak); here the backward turns
    the saved logits into the softmax in place. The price: the backward can
    run only once (``retain_graph=True`` and a second backward raise).
    """

    @staticmethod
    def forward(ctx, anchors, bank, allowed, positive_index, temperature):  # type: ignore[override]
        logits = anchors @ bank.t()
        logits.mul_(1.0 / temperature)
        lse = logits.new_empty(logits.shape[0])
        # Row blocks keep logsumexp's temporaries (and ~allowed) small.
        step = max(1, _BLOCK_ELEMENTS // max(1, logits.shape[1]))
        for start in range(0, logits.shape[0], step):
            block = logits[start : start + step]
            block.masked_fill_(~allowed[start : start + step], float("-inf"))
            lse[start : start + step] = torch.logsumexp(block, dim=1)
        loss = lse - logits.gather(1, positive_index[:, None]).squeeze(1)
        ctx.save_for_backward(anchors, bank, positive_index, logits, lse)
        ctx.temperature = temperature
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("InfoNCE's dense backward runs once; do not backward twice through it")
        ctx.consumed = True
        anchors, bank, positive_index, logits, lse = ctx.saved_tensors
        # d loss_i / d logit_ij = softmax_ij - [j = positive_i], times 1/tau for the scores.
        prob = logits.sub_(lse[:, None]).exp_()
        prob.mul_((grad / ctx.temperature)[:, None])
        rows = torch.arange(prob.shape[0], device=prob.device)
        prob[rows, positive_index] -= grad / ctx.temperature
        grad_anchors = prob @ bank if ctx.needs_input_grad[0] else None
        grad_bank = prob.t() @ anchors if ctx.needs_input_grad[1] else None
        return grad_anchors, grad_bank, None, None, None


def _reduce(per_anchor: Tensor, reduction: Reduction, local_rows: int, global_rows: int | None) -> Tensor:
    """``reduction`` over this rank's anchors; with ``global_rows`` (the loss
    gathered across ranks), "mean" is this rank's share of the global mean."""
    if reduction == "mean":
        return per_anchor.mean() if global_rows is None else global_batch_mean(per_anchor, local_rows, global_rows)
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor


class InfoNCE(nn.Module):
    """InfoNCE / NT-Xent whose number of negatives is a parameter.

    Parameters
    ----------
    temperature : float, default 0.1
        Softmax temperature tau > 0.
    negatives : "all" or int, default "all"
        ``"all"``: every candidate (the standard loss). ``K``: K candidates per
        anchor, drawn uniformly without replacement from the anchor's own
        candidate set, never the anchor itself, its positive or a masked
        candidate. K equal to the number of candidates is the standard loss.
    form : {"two_view", "query_document"}, default "two_view"
        See the module docstring.
    symmetric : bool, default False
        ``query_document`` only: average the query-to-document and the
        document-to-query losses.
    gather : bool, default False
        Contrast this rank's anchors with the candidates of all ranks
        (``torch.distributed`` all-gather with gradients). With DDP, the
        averaged parameter gradient equals the single-process gradient of the
        same loss on the concatenated global batch, and sampled negatives are
        the ones a single process would draw with the same generator. Ranks
        may hold different numbers of rows: with ``reduction="mean"`` each
        rank then returns its share of the global mean (its mean times
        world_size * B / B_global), whose average over the ranks is the mean.
    normalize : bool, default True
        L2-normalise the embeddings (cosine similarity).
    on_shortage : {"raise", "use_all"}, default "raise"
        Anchors with fewer than K valid candidates: raise a ValueError, or
        contrast them with all their valid candidates.
    reduction : {"mean", "sum", "none"}, default "mean"
        Over this rank's anchors.

    Forward
    -------
    ``loss(a, b, hard_negatives=None, *, mask=None, generator=None)``

    * two_view: ``a``, ``b`` are the two views, shape (B, d). ``mask`` (B,
      B_global) is sample-level: True where sample i and sample j are known
      false negatives (both views of j are then excluded for both views of i).
    * query_document: ``a`` queries (B, d), ``b`` documents (B, d),
      ``hard_negatives`` (B, H, d) extra documents. ``mask`` (B, D) with
      D = B_global * (1 + H): columns are the gathered documents followed by
      the gathered hard negatives (rank-major, then query-major).

    With ``gather=False``, B_global is B. ``generator`` makes sampled negatives
    reproducible. ``reduction="none"`` returns per-anchor losses: 2B of them
    (view-1 anchors first) for two_view; B (or 2B with ``symmetric``, queries
    first) for query_document.

    Examples
    --------
    >>> import torch
    >>> from negbatch import InfoNCE
    >>> z1, z2 = torch.randn(32, 16), torch.randn(32, 16)
    >>> full = InfoNCE(temperature=0.5)(z1, z2)
    >>> few = InfoNCE(temperature=0.5, negatives=5)(z1, z2, generator=torch.Generator().manual_seed(0))
    >>> all_by_count = InfoNCE(temperature=0.5, negatives=62)(z1, z2)  # 2B - 2 = 62
    >>> bool(torch.allclose(full, all_by_count))
    True
    >>> q, d, hard = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 3, 16)
    >>> loss = InfoNCE(form="query_document", symmetric=True)(q, d, hard)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        negatives: Negatives = "all",
        *,
        form: Form = "two_view",
        symmetric: bool = False,
        gather: bool = False,
        normalize: bool = True,
        on_shortage: OnShortage = "raise",
        reduction: Reduction = "mean",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.negatives = validate_negatives(negatives)
        check_choice(form, "form", ("two_view", "query_document"))
        if symmetric and form != "query_document":
            raise ValueError("symmetric=True applies to form='query_document' only (two_view is already symmetric)")
        check_choice(on_shortage, "on_shortage", ("raise", "use_all"))
        check_choice(reduction, "reduction", ("mean", "sum", "none"))
        self.form = form
        self.symmetric = symmetric
        self.gather = gather
        self.normalize = normalize
        self.on_shortage = on_shortage
        self.reduction = reduction
        self.check_finite = check_finite

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, negatives={self.negatives!r}, form={self.form!r}, "
            f"symmetric={self.symmetric}, gather={self.gather}"
        )

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        hard_negatives: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        names = ("view1", "view2") if self.form == "two_view" else ("queries", "documents")
        check_embeddings(a, names[0], check_finite=self.check_finite)
        check_embeddings(b, names[1], check_finite=self.check_finite)
        check_same(a, b, names[0], names[1], dims=(0, 1))
        check_nonempty(a, names[0])
        if self.form == "two_view":
            if hard_negatives is not None:
                raise ValueError("hard_negatives applies to form='query_document' only")
            per_anchor, global_rows = self._two_view(a, b, mask, generator)
        else:
            per_anchor, global_rows = self._query_document(a, b, hard_negatives, mask, generator)
        return _reduce(per_anchor, self.reduction, a.shape[0], global_rows if self.gather else None)

    def _prepare(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(F.normalize(x, dim=-1) for x in xs) if self.normalize else xs

    def _two_view(self, z1: Tensor, z2: Tensor, mask: Tensor | None, generator) -> tuple[Tensor, int]:
        z1, z2 = self._prepare(z1, z2)
        n, d = z1.shape
        both, offset = gather_with_grad(torch.cat([z1, z2], dim=1)) if self.gather else (torch.cat([z1, z2], 1), 0)
        total = both.shape[0]
        bank = torch.cat([both[:, :d], both[:, d:]])  # [view 1 of all; view 2 of all]
        anchors = torch.cat([z1, z2])
        local = torch.arange(n, device=z1.device) + offset
        row_index = torch.cat([local, local + total])
        self_index = row_index
        positive_index = torch.cat([local + total, local])
        check_mask(mask, (n, total), z1.device)
        full_mask = mask.repeat(2, 2) if mask is not None else None
        per_anchor = info_nce_per_anchor(
            anchors,
            bank,
            positive_index,
            temperature=self.temperature,
            negatives=self.negatives,
            self_index=self_index,
            mask=full_mask,
            generator=generator,
            on_shortage=self.on_shortage,
            row_index=row_index,
            n_rows_global=2 * total,
        )
        return per_anchor, total

    def _query_document(
        self, q: Tensor, docs: Tensor, hard: Tensor | None, mask: Tensor | None, generator
    ) -> tuple[Tensor, int]:
        n, d = q.shape
        n_hard = 0
        if hard is not None:
            check_embeddings(hard, "hard_negatives", dim=3, check_finite=self.check_finite)
            if hard.shape[0] != n or hard.shape[2] != d:
                raise ValueError(
                    f"hard_negatives must have shape (B, H, d) = ({n}, H, {d}), got {tuple(hard.shape)}"
                )
            if hard.device != q.device or hard.dtype != q.dtype:
                raise ValueError("hard_negatives must be on the device and of the dtype of the queries")
            n_hard = hard.shape[1]
        q, docs = self._prepare(q, docs)
        parts = [q, docs]
        if n_hard:
            (hard,) = self._prepare(hard)
            parts.append(hard.reshape(n, n_hard * d))
        local_all = torch.cat(parts, dim=1)
        gathered, offset = gather_with_grad(local_all) if self.gather else (local_all, 0)
        total = gathered.shape[0]
        all_q, all_docs = gathered[:, :d], gathered[:, d : 2 * d]
        bank = all_docs
        if n_hard:
            bank = torch.cat([all_docs, gathered[:, 2 * d :].reshape(total * n_hard, d)])
        rows = torch.arange(n, device=q.device) + offset
        check_mask(mask, (n, bank.shape[0]), q.device)
        common = dict(
            temperature=self.temperature,
            negatives=self.negatives,
            generator=generator,
            on_shortage=self.on_shortage,
            row_index=rows,
            n_rows_global=total,
        )
        loss_q = info_nce_per_anchor(q, bank, rows, mask=mask, **common)
        if not self.symmetric:
            return loss_q, total
        doc_mask = None
        if mask is not None:
            # Row j of the doc-to-query mask is column j of the query-to-doc mask.
            all_rows = mask if not self.gather else gather_nograd(mask.to(torch.uint8)).bool()
            doc_mask = all_rows[:, :total].t()[offset : offset + n]
        loss_d = info_nce_per_anchor(docs, all_q, rows, mask=doc_mask, **common)
        # Equal counts, so the mean of the concatenation is the average of the two directions.
        return torch.cat([loss_q, loss_d]), total
