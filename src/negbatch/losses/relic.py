"""ReLIC: InfoNCE plus an invariance penalty between the two views' similarity
distributions (Mitrovic et al., "Less can be more in contrastive learning",
eq. 3).

For the two view orders (v, w) in {(1, 2), (2, 1)} and anchor i::

    -log [ exp(s(z_i^v, z_i^w)/tau) / sum_{m in M_i} exp(s(z_i^v, z_m^w)/tau) ]
      + alpha * KL( p_i^{vw} || p_i^{ww} )

where ``M_i`` is the positive ``i`` plus the anchor's negatives among view w
(all the other samples, or K of them sampled), and ``p_i^{xw}(m)`` is the
softmax of ``s(z_i^x, z_m^w)/tau`` over the *same* ``M_i``. The loss is the
mean over the 2B terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import Negatives, OnShortage, Reduction, check_flag, is_real, keyword_only
from ..negatives import selection_logits
from ._layout import BankLoss, Positives, check_labels

__all__ = ["ReLIC"]


class ReLIC(BankLoss):
    """ReLIC loss with negatives decoupled from the batch size.

    Every argument is keyword-only: ``ReLIC(temperature=0.1, alpha=1.0,
    negatives=16)``.

    Parameters
    ----------
    temperature : float, default 0.1
    alpha : float, default 1.0
        Weight of the KL invariance penalty (>= 0; 0 gives InfoNCE with view-w
        candidates only).
    negatives : "all" or int, default "all"
        Negatives per anchor among the other view's B - 1 other samples.
    detach_target : bool, default False
        Stop the gradient through ``p^{ww}``. By default nothing is detached:
        eq. 3 is one objective of the encoder, and its gradient flows through
        both distributions; the option reproduces implementations that treat
        ``p^{ww}`` as a fixed target (as with a target network in ReLICv2).
    gather, normalize, on_shortage, reduction, check_finite
        As in :class:`negbatch.InfoNCE`. ``reduction="none"`` returns 2B
        per-anchor terms, direction (1, 2) first.
    learnable_temperature, positives, filter_margin, filter_top
        As in :class:`negbatch.InfoNCE`. With ``positives="mask"`` the InfoNCE
        term is SupCon's L_out (the mean over the anchor's positives in view w
        of ``-log p_i^{vw}``), and the KL term runs over the same candidates.

    Forward
    -------
    ``loss(view1, view2, *, labels=None, mask=None, guide=None,
    generator=None)``; ``mask`` (B, B_global) marks known false negatives
    (or positives) at the sample level, ``labels`` (B,) add the same-label
    samples to it, ``guide`` are the filter's embeddings ``(view1, view2)``.

    Examples
    --------
    >>> import torch
    >>> from negbatch import ReLIC
    >>> z1, z2 = torch.randn(64, 32), torch.randn(64, 32)
    >>> loss = ReLIC(temperature=0.2, alpha=1.0, negatives=10)(z1, z2, generator=torch.Generator().manual_seed(0))
    >>> loss.shape
    torch.Size([])
    """

    @keyword_only("ReLIC(temperature=0.1, alpha=1.0, negatives=16)")
    def __init__(
        self,
        *,
        temperature: float = 0.1,
        alpha: float = 1.0,
        negatives: Negatives = "all",
        detach_target: bool = False,
        gather: bool = False,
        normalize: bool = True,
        on_shortage: OnShortage = "raise",
        reduction: Reduction = "mean",
        check_finite: bool = True,
        learnable_temperature: bool = False,
        positives: Positives = "pair",
        filter_margin: float | None = None,
        filter_top: float | None = None,
    ) -> None:
        """Set up the loss. Every argument is keyword-only; see Parameters in
        ``help(ReLIC)``."""
        super().__init__()
        self._set_options(
            temperature=temperature, negatives=negatives, form="two_view", symmetric=False, gather=gather,
            normalize=normalize, on_shortage=on_shortage, reduction=reduction, check_finite=check_finite,
            learnable_temperature=learnable_temperature, positives=positives, filter_margin=filter_margin,
            filter_top=filter_top,
        )
        if not is_real(alpha) or not 0 <= alpha < math.inf:
            raise ValueError(f"alpha must be a finite float >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.detach_target = check_flag(detach_target, "detach_target")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, negatives={self.negatives!r}{self._option_repr()}"

    def forward(
        self,
        view1: Tensor,
        view2: Tensor,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        guide: tuple[Tensor, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        self._check_views(view1, view2, "two_view")
        labels = check_labels(labels, view1.shape[0], view1.device)
        layout = self._layout(view1, view2, None, mask, bank="other_view", labels=labels)
        self._filter(layout, guide, bank="other_view")
        temperature = self._temperature(layout)
        terms = []
        # Direction (v, w) contrasts view v with view w's bank; view w's own
        # anchors (the anchors of the other direction) give p^{ww}.
        for v_side, w_side in zip(layout.directions, layout.directions[::-1]):
            selection = self._negatives_of(v_side, generator, layout)
            logits_vw = selection_logits(v_side.anchors, v_side.bank, selection, temperature)
            logits_ww = selection_logits(w_side.anchors, v_side.bank, selection, temperature)
            if self.detach_target:
                logits_ww = logits_ww.detach()
            log_p = F.log_softmax(logits_vw, dim=1)
            slots = selection.positive_slots()
            if slots is None:
                nce = F.cross_entropy(logits_vw, selection.positive_column, reduction="none")
            else:  # SupCon's L_out: the mean over the positives
                nce = -log_p.masked_fill(~slots, 0.0).sum(dim=1) / slots.sum(dim=1)
            log_q = F.log_softmax(logits_ww, dim=1)
            # Zero the non-candidates *before* the product: -inf - -inf is NaN, and
            # torch.where would still send NaN into the backward.
            outside = ~(selection.allowed if selection.is_dense else selection.valid)
            log_p, log_q = log_p.masked_fill(outside, 0.0), log_q.masked_fill(outside, 0.0)
            kl = (log_p.exp().masked_fill(outside, 0.0) * (log_p - log_q)).sum(dim=1)
            terms.append(nce + self.alpha * kl)
        return layout.reduce(torch.cat(terms), self.reduction)
