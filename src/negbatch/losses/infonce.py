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

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import Form, Negatives, OnShortage, Reduction, keyword_only
from ..negatives import NegativeSelection, select_negatives, selection_logits
from ._layout import BankLoss, check_views, fused_dense, row_blocks

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
        positive_index, bank.shape[0], negatives, self_index=self_index, mask=mask, generator=generator,
        on_shortage=on_shortage, row_index=row_index, n_rows_global=n_rows_global,
    )
    return _selected_info_nce(anchors, bank, selection, temperature)


def _selected_info_nce(anchors: Tensor, bank: Tensor, selection: NegativeSelection, temperature: float) -> Tensor:
    if fused_dense(selection, anchors):
        return _DenseInfoNCE.apply(anchors, bank, selection.allowed, selection.positive_index, temperature)
    logits = selection_logits(anchors, bank, selection, temperature)
    return F.cross_entropy(logits, selection.positive_column, reduction="none")


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
        for rows in row_blocks(*logits.shape):
            block = logits[rows]
            block.masked_fill_(~allowed[rows], float("-inf"))
            lse[rows] = torch.logsumexp(block, dim=1)
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


class InfoNCE(BankLoss):
    """InfoNCE / NT-Xent whose number of negatives is a parameter.

    Every argument is keyword-only: ``InfoNCE(temperature=0.1, negatives=16)``
    (a bare ``InfoNCE(16)`` is refused: temperature or negatives?).

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
    check_finite : bool, default True
        Refuse inputs holding NaN or inf (one pass over them).

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

    @keyword_only("InfoNCE(temperature=0.1, negatives=16)")
    def __init__(
        self,
        *,
        temperature: float = 0.1,
        negatives: Negatives = "all",
        form: Form = "two_view",
        symmetric: bool = False,
        gather: bool = False,
        normalize: bool = True,
        on_shortage: OnShortage = "raise",
        reduction: Reduction = "mean",
        check_finite: bool = True,
    ) -> None:
        """Set up the loss. Every argument is keyword-only; see Parameters in
        ``help(InfoNCE)``."""
        super().__init__()
        self._set_options(
            temperature=temperature, negatives=negatives, form=form, symmetric=symmetric, gather=gather,
            normalize=normalize, on_shortage=on_shortage, reduction=reduction, check_finite=check_finite,
        )

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
        check_views(a, b, self.form, self.check_finite)
        layout = self._layout(a, b, hard_negatives, mask)
        per_anchor = [
            _selected_info_nce(
                direction.anchors,
                direction.bank,
                direction.select(self.negatives, generator, self.on_shortage),
                self.temperature,
            )
            for direction in layout.directions
        ]
        # Directions hold equal numbers of anchors: the mean of the concatenation
        # is the average of the directions.
        return layout.reduce(torch.cat(per_anchor) if len(per_anchor) > 1 else per_anchor[0], self.reduction)
