"""DCL: the decoupled contrastive loss, the positive out of the denominator.

Yeh et al., "Decoupled Contrastive Learning" (ECCV 2022), show that the
InfoNCE gradient carries a factor ``1 - softmax(positive)`` (their
"negative-positive coupling") that shrinks it when the batch holds few hard
negatives, and remove the positive from the softmax's denominator::

    ℓ_i = -s_{i,p(i)}/τ + log Σ_{n ∈ N_i} exp(s_{i,n}/τ)

The weighted variant DCL-W multiplies the positive term by a von Mises-Fisher
weight that emphasises hard positive pairs::

    w_i = 2 - exp(s_{i,p(i)}/σ) / mean_j exp(s_{j,p(j)}/σ)

(the mean over the batch's positive pairs, all ranks' under ``gather``; the
weight carries no gradient; σ = 0.5 in the paper).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import Form, Negatives, OnShortage, Reduction, is_real, keyword_only
from ..negatives import NegativeSelection
from ._layout import Direction, Layout, Positives
from ._softmax import SoftmaxLoss, count_negatives, softmax_terms

__all__ = ["DCL"]


class DCL(SoftmaxLoss):
    """Decoupled contrastive loss (DCL, and DCL-W with ``sigma``).

    Every argument is keyword-only. The options, the forms and the forward
    call are those of :class:`negbatch.InfoNCE` (``negatives=K``, masks,
    ``labels``, ``positives="mask"``, a queue, ``gather``, filtering, a
    learnable temperature); only the per-anchor value differs: the
    denominator holds the negatives only. With ``positives="mask"`` the
    numerator is the mean logit over the anchor's positives, and all of them
    leave the denominator.

    Parameters
    ----------
    sigma : float, optional
        DCL-W: weight the positive term by the von Mises-Fisher weight with
        this concentration (the paper's 0.5; single positives only). None:
        plain DCL.
    temperature, negatives, form, symmetric, gather, normalize, on_shortage, reduction, check_finite,
    learnable_temperature, positives, queue_size, filter_margin, filter_top
        As in :class:`negbatch.InfoNCE`.

    Every anchor needs at least one negative (a ValueError otherwise; under
    DDP, with ``gather`` or a queue, raised on every rank, naming the rank
    whose anchor has none). The value can be negative (no positive in the
    denominator bounds it below).

    Examples
    --------
    >>> import torch
    >>> from negbatch import DCL, InfoNCE
    >>> z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    >>> dcl = DCL(temperature=0.5)(z1, z2)
    >>> bool(dcl < InfoNCE(temperature=0.5)(z1, z2))   # log(sum of negatives) < log(positive + negatives)
    True
    >>> weighted = DCL(temperature=0.5, sigma=0.5, negatives=8)(z1, z2, generator=torch.Generator().manual_seed(0))
    """

    needs_a_negative = "DCL's denominator holds the negatives only and needs at least one"

    @keyword_only("DCL(temperature=0.1, negatives=16)")
    def __init__(
        self,
        *,
        temperature: float = 0.1,
        sigma: float | None = None,
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
        ``help(DCL)``."""
        super().__init__()
        self._set_options(
            temperature=temperature, negatives=negatives, form=form, symmetric=symmetric, gather=gather,
            normalize=normalize, on_shortage=on_shortage, reduction=reduction, check_finite=check_finite,
            learnable_temperature=learnable_temperature, positives=positives, filter_margin=filter_margin,
            filter_top=filter_top,
        )
        if sigma is not None:
            if not is_real(sigma) or not (math.isfinite(sigma) and sigma > 0):
                raise ValueError(f"sigma must be a float > 0 (DCL-W's concentration, the paper's 0.5) or None, got {sigma!r}")
            if positives == "mask":
                raise ValueError("sigma (DCL-W) weights one positive pair per anchor; it does not apply to positives='mask'")
            sigma = float(sigma)
        self.sigma = sigma
        self._set_queue(queue_size)

    def extra_repr(self) -> str:
        weighted = f", sigma={self.sigma}" if self.sigma is not None else ""
        return (
            f"temperature={self.temperature}{weighted}, negatives={self.negatives!r}, form={self.form!r}, "
            f"symmetric={self.symmetric}, gather={self.gather}{self._option_repr()}{self._queue_repr()}"
        )

    decoupled = True

    def _check_selection(self, direction: Direction, selection: NegativeSelection) -> None:
        if bool((count_negatives(selection, direction.bank.shape[0]) == 0).any()):
            raise self._no_negatives_error()

    def _direction_values(self, direction: Direction, selection: NegativeSelection, temperature: float,
                          layout: Layout, index: int, terms: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if terms is None:
            terms = softmax_terms(direction.anchors, direction.bank, selection, temperature, decoupled=True)
        lse, positive = terms
        if self.sigma is None:
            return lse - positive
        return lse - self._weights(layout, index).to(positive.dtype) * positive

    @torch.no_grad()
    def _weights(self, layout: Layout, index: int) -> Tensor:
        """DCL-W's weight of this rank's anchors of direction ``index``, from
        the positive pairs of the whole (gathered) batch."""
        pairs = (layout.first * layout.second).sum(dim=1) / self.sigma  # (B_global,)
        weight = 2.0 - torch.softmax(pairs.double(), dim=0) * pairs.shape[0]
        local = weight[layout.offset : layout.offset + layout.n_local]
        # two_view: view-1 anchors then view-2 anchors, one pair each.
        return torch.cat([local, local]) if self.form == "two_view" else local
