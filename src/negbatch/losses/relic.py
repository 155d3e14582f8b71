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
from ..distributed import gather_with_grad
from ..negatives import Negatives, OnShortage, select_negatives, selection_logits, validate_negatives
from .infonce import _reduce

__all__ = ["ReLIC"]


class ReLIC(nn.Module):
    """ReLIC loss with negatives decoupled from the batch size.

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

    Forward
    -------
    ``loss(view1, view2, *, mask=None, generator=None)``; ``mask`` (B,
    B_global) marks known false negatives at the sample level.

    Examples
    --------
    >>> import torch
    >>> from negbatch import ReLIC
    >>> z1, z2 = torch.randn(64, 32), torch.randn(64, 32)
    >>> loss = ReLIC(temperature=0.2, alpha=1.0, negatives=10)(z1, z2, generator=torch.Generator().manual_seed(0))
    >>> loss.shape
    torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 0.1,
        alpha: float = 1.0,
        negatives: Negatives = "all",
        *,
        detach_target: bool = False,
        gather: bool = False,
        normalize: bool = True,
        on_shortage: OnShortage = "raise",
        reduction: str = "mean",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha must be a float >= 0, got {alpha!r}")
        check_choice(on_shortage, "on_shortage", ("raise", "use_all"))
        check_choice(reduction, "reduction", ("mean", "sum", "none"))
        self.alpha = float(alpha)
        self.negatives = validate_negatives(negatives)
        self.detach_target = detach_target
        self.gather = gather
        self.normalize = normalize
        self.on_shortage = on_shortage
        self.reduction = reduction
        self.check_finite = check_finite

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, negatives={self.negatives!r}"

    def forward(
        self,
        view1: Tensor,
        view2: Tensor,
        *,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        check_embeddings(view1, "view1", check_finite=self.check_finite)
        check_embeddings(view2, "view2", check_finite=self.check_finite)
        check_same(view1, view2, "view1", "view2", dims=(0, 1))
        check_nonempty(view1, "view1")
        z1, z2 = (F.normalize(view1, dim=-1), F.normalize(view2, dim=-1)) if self.normalize else (view1, view2)
        n, d = z1.shape
        both, offset = gather_with_grad(torch.cat([z1, z2], 1)) if self.gather else (torch.cat([z1, z2], 1), 0)
        total = both.shape[0]
        check_mask(mask, (n, total), z1.device)
        rows = torch.arange(n, device=z1.device) + offset
        terms = []
        for direction, (zv, zw, bank_w) in enumerate(((z1, z2, both[:, d:]), (z2, z1, both[:, :d]))):
            selection = select_negatives(
                rows,
                total,
                self.negatives,
                mask=mask,
                generator=generator,
                on_shortage=self.on_shortage,
                row_index=rows + direction * total,
                n_rows_global=2 * total,
            )
            logits_vw = selection_logits(zv, bank_w, selection, self.temperature)
            logits_ww = selection_logits(zw, bank_w, selection, self.temperature)
            if self.detach_target:
                logits_ww = logits_ww.detach()
            nce = F.cross_entropy(logits_vw, selection.positive_column, reduction="none")
            log_p = F.log_softmax(logits_vw, dim=1)
            log_q = F.log_softmax(logits_ww, dim=1)
            # Zero the non-candidates *before* the product: -inf - -inf is NaN, and
            # torch.where would still send NaN into the backward.
            outside = ~(selection.allowed if selection.is_dense else selection.valid)
            log_p, log_q = log_p.masked_fill(outside, 0.0), log_q.masked_fill(outside, 0.0)
            kl = (log_p.exp().masked_fill(outside, 0.0) * (log_p - log_q)).sum(dim=1)
            terms.append(nce + self.alpha * kl)
        return _reduce(torch.cat(terms), self.reduction, n, total if self.gather else None)
