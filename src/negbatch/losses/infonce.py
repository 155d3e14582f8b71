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
from torch import Tensor

from .._checks import Form, Negatives, OnShortage, Reduction, keyword_only
from ..negatives import NegativeSelection, _select, select_negatives
from . import _layout
from ._layout import Direction, Layout, Positives, in_batch_candidates
from ._plain import plain_info_nce
from ._softmax import SoftmaxLoss, info_nce_values, takes_fused_terms

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
    positives: Tensor | None = None,
    generator: torch.Generator | None = None,
    on_shortage: OnShortage = "raise",
    row_index: Tensor | None = None,
    n_rows_global: int | None = None,
) -> Tensor:
    """Per-anchor InfoNCE: ``-log softmax`` of the positive among the positive
    and the anchor's negatives (see :func:`negbatch.negatives.select_negatives`);
    with ``positives`` (n, m) bool, the mean over the anchor's positives of
    ``-log softmax`` over positives and negatives (SupCon's L_out).

    ``anchors`` (n, d) and ``bank`` (m, d) are used as given (normalise them
    first for cosine similarities). Returns a tensor of shape (n,).

    Parameters
    ----------
    anchors, bank : Tensor (n, d), (m, d)
    positive_index : Tensor (n,) long
        Bank column of each anchor's positive.
    temperature : float
    negatives, self_index, mask, positives, generator, on_shortage, row_index, n_rows_global
        As for :func:`negbatch.negatives.select_negatives`.

    Examples
    --------
    The query-document loss, anchor by anchor (its mean is ``InfoNCE``'s):

    >>> import torch
    >>> from negbatch import InfoNCE, info_nce_per_anchor
    >>> q = torch.nn.functional.normalize(torch.randn(3, 5), dim=1)
    >>> d = torch.nn.functional.normalize(torch.randn(3, 5), dim=1)
    >>> per_anchor = info_nce_per_anchor(q, d, torch.arange(3), temperature=0.1)
    >>> per_anchor.shape, bool(torch.allclose(per_anchor.mean(), InfoNCE(temperature=0.1, form="query_document")(q, d)))
    (torch.Size([3]), True)
    """
    selection = select_negatives(
        positive_index, bank.shape[0], negatives, self_index=self_index, mask=mask, positives=positives,
        generator=generator, on_shortage=on_shortage, row_index=row_index, n_rows_global=n_rows_global,
    )
    return info_nce_values(anchors, bank, selection, temperature)


class InfoNCE(SoftmaxLoss):
    """InfoNCE / NT-Xent whose number of negatives is a parameter.

    Every argument is keyword-only: ``InfoNCE(temperature=0.1, negatives=16)``
    (a bare ``InfoNCE(16)`` is refused: temperature or negatives?).

    Parameters
    ----------
    temperature : float, default 0.1
        Softmax temperature tau > 0 (the initial value with
        ``learnable_temperature``).
    negatives : "all" or int, default "all"
        ``"all"``: every candidate (the standard loss). ``K``: K candidates per
        anchor, drawn uniformly without replacement from the anchor's own
        candidate set (with a queue: from the batch and the queue alike),
        never the anchor itself, its positive(s) or a masked candidate. K
        equal to the number of candidates is the standard loss.
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
        world_size * B / B_global), whose average over the ranks is the mean;
        with ``"sum"`` its sum times world_size, whose average is the global
        sum; ``"none"`` returns this rank's per-anchor values as they are
        (reduce them as above before DDP averages). An error caused by one
        rank's batch (an anchor short of K candidates, NaN, no rows) is
        raised on every rank, naming that rank; with a mask of each rank's
        own rows, the filter or a queue, and ``negatives=K`` under
        ``on_shortage="raise"``, that costs one all-gather of three integers
        per direction (see docs/losses.md).
    normalize : bool, default True
        L2-normalise the embeddings (cosine similarity).
    on_shortage : {"raise", "use_all"}, default "raise"
        Anchors with fewer than K valid candidates: raise a ValueError, or
        contrast them with all their valid candidates.
    reduction : {"mean", "sum", "none"}, default "mean"
        Over this rank's anchors.
    check_finite : bool, default True
        Refuse inputs holding NaN or inf (one pass over them), and a learned
        log-scale (or SigLIP's bias) that an optimizer step or a loaded
        ``state_dict`` made NaN; the error names the culprit. Off, a NaN
        input gives a NaN loss; a queue still leaves its rows out (with a
        warning), so that later calls are not poisoned by it.
    learnable_temperature : bool, default False
        Learn the temperature as CLIP does (:class:`negbatch.losses.LearnableTemperature`:
        ``log(1/tau)`` a parameter of this module, the scale clamped to
        [1, 100]); give the loss's parameters to the optimizer.
    positives : {"pair", "mask"}, default "pair"
        What ``mask`` (and ``labels``) mark: ``"pair"``, known false
        negatives, left out of the anchor's softmax; ``"mask"``, further
        positives: the loss is SupCon's L_out, the mean over the anchor's
        positives P of ``-log softmax`` over P and the negatives. With
        ``"mask"`` every call must pass ``labels`` or ``mask``.
    queue_size : int, default 0
        Keep the last ``queue_size`` embeddings of each anchor direction in a
        FIFO queue (:class:`negbatch.losses.NegativeQueue`, MoCo) and use them
        as extra candidates; ``forward`` then needs ``indices``. Under DDP
        every rank's queue holds every rank's batch, with or without
        ``gather``; without it, an error caused by one rank's batch (NaN, no
        rows, an anchor short of K) is raised on every rank, naming that
        rank, before anything is enqueued, and costs no collective: what each
        rank found travels with its indices (see docs/losses.md).
    filter_margin, filter_top : float, optional
        False-negative filtering (GISTEmbed): mask candidates whose similarity
        to the anchor exceeds the positive's minus ``filter_margin``, and/or
        the ``filter_top`` most similar fraction of each anchor's candidates;
        similarities from ``guide`` embeddings, or the model's own (see
        :mod:`negbatch.losses.filtering`). The count is kept in
        ``last_filtered`` / ``last_filtered_fraction``.

    Forward
    -------
    ``loss(a, b, hard_negatives=None, *, indices=None, labels=None, mask=None,
    guide=None, generator=None, update=True)``

    * two_view: ``a``, ``b`` are the two views, shape (B, d). ``mask`` (B,
      B_global) is sample-level: True where sample i and sample j are known
      false negatives (both views of j are then excluded for both views of i).
    * query_document: ``a`` queries (B, d), ``b`` documents (B, d),
      ``hard_negatives`` (B, H, d) extra documents. ``mask`` (B, D) with
      D = B_global * (1 + H): columns are the gathered documents followed by
      the gathered hard negatives (rank-major, then query-major).
    * ``labels`` (B,) int: samples of one label are added to ``mask`` (on
      every rank, and in the queue); hard negatives carry no label.
    * ``indices`` (B,) int: data-set indices, required with a queue.
    * ``guide``: the guide model's embeddings of the same rows, ``(a, b)`` or
      ``(a, b, hard_negatives)``, for the filter.
    * ``update=False``: leave the queue as it is (extra calls in a step).

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

    Several positives (SupCon) and a queue of past embeddings:

    >>> labels = torch.randint(0, 4, (32,))
    >>> supcon = InfoNCE(temperature=0.1, positives="mask")(z1, z2, labels=labels)
    >>> moco = InfoNCE(temperature=0.2, queue_size=256)
    >>> loss = moco(z1, z2, indices=torch.arange(32))      # the 64 views wait in the queue
    >>> len(moco.queue)
    64
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
        learnable_temperature: bool = False,
        positives: Positives = "pair",
        queue_size: int = 0,
        filter_margin: float | None = None,
        filter_top: float | None = None,
    ) -> None:
        """Set up the loss. Every argument is keyword-only; see Parameters in
        ``help(InfoNCE)``."""
        super().__init__()
        self._set_options(
            temperature=temperature, negatives=negatives, form=form, symmetric=symmetric, gather=gather,
            normalize=normalize, on_shortage=on_shortage, reduction=reduction, check_finite=check_finite,
            learnable_temperature=learnable_temperature, positives=positives, filter_margin=filter_margin,
            filter_top=filter_top,
        )
        self._set_queue(queue_size)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, negatives={self.negatives!r}, form={self.form!r}, "
            f"symmetric={self.symmetric}, gather={self.gather}{self._option_repr()}{self._queue_repr()}"
        )

    def _direction_values(self, direction: Direction, selection: NegativeSelection, temperature: float,
                          layout: Layout, index: int, terms: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if terms is not None:
            return terms[0] - terms[1]
        return info_nce_values(direction.anchors, direction.bank, selection, temperature)

    def _takes_fused_terms(self, selection: NegativeSelection) -> bool:
        # The pair of a symmetric call saves three of six products: it beat two cross-entropies from
        # about 2^14 logits a direction (one thread, B = 128-256: 0.84-0.97x; at B = 64, 1.07-1.11x).
        return takes_fused_terms(selection, small=_layout.SMALL_DENSE_LOGITS >> 2)

    plain_sampled = True

    # Both paths compute a symmetric call's product once (the layout by _pair.PairOfDirections since
    # 2026-12-04; before, once per direction, when the short path took symmetric calls up to B = 2048
    # at 0.62-0.73x the layout's time). One thread, freed memory kept, interleaved: the layout / the
    # short path 1.20, 1.07, 1.03, 0.94 and 0.90 at B = 384, 512, 724, 1024 and 2048, and the short
    # path holds about twice the layout's memory (82 against 42 MiB at B = 2048). So the short path
    # takes symmetric calls up to B = 724 (2^19 logits); the other forms keep the 2^16 bound (the
    # same time on either path at these sizes).
    plain_symmetric_logits = 1 << 19

    def _plain_forward(self, a: Tensor, b: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # The layout's result for a small plain batch in one autograd node
        # (see _plain.py); K sampled negatives are drawn as the layout draws
        # them, the rows' before the columns'.
        scale = self.logit_scale() if self.logit_scale is not None else None
        alpha = 1.0 / self.temperature if scale is None else 1.0
        two_view = self.form == "two_view"
        rows = self._plain_draw(a, two_view, generator)
        columns = self._plain_draw(a, two_view, generator) if self.symmetric else None
        values = plain_info_nce(a, b, scale, alpha, two_view, self.symmetric, rows, columns, self.reduction)
        return self._plain_result(a, b, values, reduced=self.reduction != "none")

    def _plain_draw(self, a: Tensor, two_view: bool, generator: torch.Generator | None) -> Tensor | None:
        """Bank columns (n or 2n rows, 1 + K) of each anchor's positive and K
        sampled negatives, or None for every candidate."""
        n = a.shape[0]
        if self.negatives == "all" or self.negatives == in_batch_candidates(self.form, n):
            return None  # K = all of them: the standard loss, no draw
        if two_view:
            itself = torch.arange(2 * n, device=a.device)
            return _select(itself.roll(n), 2 * n, self.negatives, self_index=itself, generator=generator).index
        return _select(torch.arange(n, device=a.device), n, self.negatives, generator=generator).index
