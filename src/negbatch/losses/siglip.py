"""SigLIP: a sigmoid loss on every pair, with no softmax normaliser.

Zhai, Mustafa, Kolesnikov, Beyer, "Sigmoid Loss for Language Image
Pre-Training" (ICCV 2023) score each (anchor, candidate) pair on its own,
as a binary classification: positive pairs should have a large logit,
negative pairs a small one::

    ℓ_i = Σ_{c ∈ {p(i)} ∪ N_i} log(1 + exp(-z_ic (t · s_ic + b)))

with z = +1 for positives and -1 for negatives, the logit scale t = 1/τ and
the bias b both learnable (initialised at t = 10, b = -10: the bias keeps the
many negatives from dominating the first steps). The loss is the mean of ℓ_i
over the anchors, i.e. SigLIP's ``-1/|B| Σ_i Σ_j log σ(z_ij (t x_i·y_j + b))``.
No term couples the pairs of a row, which is why SigLIP claims to need no
large batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import Form, Negatives, OnShortage, Reduction, is_real, keyword_only, refuse_second_order
from ..negatives import NegativeSelection, selection_logits
from ._layout import BankLoss, Positives, check_labels, fused_dense, row_blocks
from ._plain import plain_sigmoid
from ._pair import scaled_logits, shared_directions
from .temperature import average_gradient

__all__ = ["SigLIP"]


def _negate(block: Tensor, where: Tensor) -> None:
    """Flip the sign of ``block`` (a view) in place where ``where`` is True."""
    block[where] = block[where].neg()


def _sigmoid_buffer_(buf: Tensor, selection: NegativeSelection, bias: Tensor):
    """Turn the logits ``buf`` (n, m) of one direction, in place, into
    ``u = -z * (l + b)`` (``-inf`` outside the candidates, where both
    ``softplus(u)`` and its derivative ``sigmoid(u)`` vanish); ``buf`` may be
    a transposed view (:class:`~._pair.PairOfDirections`). Returns the
    per-anchor loss and what :func:`_sigmoid_gradient_` needs."""
    buf.add_(bias.to(buf.dtype))
    n = buf.shape[0]
    col = selection.positive_index[:, None]
    pos_mask = selection.positive_mask
    # u = -z l: the negatives keep their logit, the positives change sign.
    if pos_mask is None:
        buf.scatter_(1, col, buf.gather(1, col).neg_())
    loss = buf.new_empty(n)
    if selection.only_self_excluded and pos_mask is None:
        if selection.self_index is not None:
            has_self = selection.self_index >= 0
            rows_with = torch.arange(n, device=buf.device)[has_self]
            buf[rows_with, selection.self_index[has_self]] = float("-inf")
        for rows in row_blocks(*buf.shape):
            loss[rows] = F.softplus(buf[rows]).sum(dim=1)
    else:
        for rows in row_blocks(*buf.shape):
            block = buf[rows]
            if pos_mask is not None:
                _negate(block, pos_mask[rows])
            block.masked_fill_(~selection.allowed[rows], float("-inf"))
            loss[rows] = F.softplus(block).sum(dim=1)
    return loss, (col, pos_mask)


def _sigmoid_gradient_(buf: Tensor, kept: tuple, grad: Tensor, inv_tau: float) -> Tensor:
    """Turn a buffer of :func:`_sigmoid_buffer_`, in place, into d loss / d
    scores; returns d loss / d bias (a 0-dim sum in the buffer's dtype)."""
    col, pos_mask = kept
    # d softplus(u) / d l = sigmoid(u) * du/dl, du/dl = -z: +1 on negatives, -1 on positives.
    buf.sigmoid_().mul_(grad[:, None])
    if pos_mask is None:
        buf.scatter_(1, col, buf.gather(1, col).neg_())
    else:
        for rows in row_blocks(*buf.shape):
            _negate(buf[rows], pos_mask[rows])
    grad_bias = buf.sum()
    buf.mul_(inv_tau)
    return grad_bias


class _SigmoidKernel:
    """:func:`_sigmoid_buffer_` as a kernel of :class:`~._pair.PairOfDirections` (``extra``: the bias)."""

    non_differentiable = ()

    @staticmethod
    def forward_(buf: Tensor, selection: NegativeSelection, lowest: float | None, bias: Tensor):
        loss, kept = _sigmoid_buffer_(buf, selection, bias)
        return (loss,), kept

    @staticmethod
    def backward_(buf: Tensor, kept, grads, inv_tau: float) -> Tensor:
        return _sigmoid_gradient_(buf, kept, grads[0], inv_tau)


class _DenseSigmoid(torch.autograd.Function):
    """Per-anchor SigLIP over all candidates, holding one (n, m) buffer
    (:func:`_sigmoid_buffer_`); the backward turns it, in place, into
    ``d loss / d logits = -z sigmoid(u)``. Runs once (a second backward raises).
    """

    @staticmethod
    def forward(ctx, anchors, bank, bias, selection, temperature):  # type: ignore[override]
        buf = scaled_logits(anchors, bank, temperature)
        loss, kept = _sigmoid_buffer_(buf, selection, bias)
        ctx.save_for_backward(anchors, bank, buf, *kept)
        ctx.temperature = temperature
        ctx.bias_dtype = bias.dtype
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        refuse_second_order(ctx)
        if ctx.consumed:
            raise RuntimeError("SigLIP's dense backward runs once; do not backward twice through it")
        ctx.consumed = True
        anchors, bank, buf, *kept = ctx.saved_tensors
        grad_bias = _sigmoid_gradient_(buf, kept, grad, 1.0 / ctx.temperature)
        grad_bias = grad_bias.to(ctx.bias_dtype).reshape(()) if ctx.needs_input_grad[2] else None
        grad_anchors = buf @ bank if ctx.needs_input_grad[0] else None
        grad_bank = buf.t() @ anchors if ctx.needs_input_grad[1] else None
        return grad_anchors, grad_bank, grad_bias, None, None


def sigmoid_values(
    anchors: Tensor, bank: Tensor, selection: NegativeSelection, temperature: float, bias: Tensor
) -> Tensor:
    """Per-anchor SigLIP ``Σ softplus(-z (l + b))`` over the anchor's candidates."""
    if fused_dense(selection, anchors):
        return _DenseSigmoid.apply(anchors, bank, bias, selection, temperature)
    logits = selection_logits(anchors, bank, selection, temperature)
    logits = logits + bias.to(logits.dtype)
    slots = selection.positive_slots()
    if slots is None:
        slots = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, selection.positive_column[:, None], True)
    inside = selection.allowed if selection.is_dense else selection.valid
    u = torch.where(slots, -logits, logits).masked_fill(~inside, float("-inf"))
    wide = u.float() if u.dtype in (torch.float16, torch.bfloat16) else u
    return F.softplus(wide).sum(dim=1).to(logits.dtype)


class SigLIP(BankLoss):
    """SigLIP's sigmoid pairwise loss, with learnable temperature and bias.

    Every argument is keyword-only: ``SigLIP(temperature=0.1, bias=-10.0)``.

    Parameters
    ----------
    temperature : float, default 0.1
        Initial temperature: the logit scale starts at ``1/temperature``
        (SigLIP: 10).
    bias : float, default -10.0
        Initial bias b (SigLIP: -10).
    learnable_temperature : bool, default True
        Learn the logit scale as SigLIP does (log space, clamped to [1, 100]
        as CLIP; :class:`negbatch.losses.LearnableTemperature`).
    learnable_bias : bool, default True
        Learn the bias (a parameter ``bias`` of this module).
    negatives : "all" or int, default "all"
        ``K``: each anchor's sum runs over its positive(s) and K sampled
        negatives, without reweighting (K sets the balance of positive and
        negative pairs, as a batch of K + 1 would).
    form : {"two_view", "query_document"}, default "query_document"
        ``query_document`` is SigLIP's image-text form (each query against
        every document). ``two_view``: each of the 2B views against the other
        2B - 1 (itself excluded), the other view positive.
    symmetric : bool, default False
        ``query_document``: add the document-to-query direction. Without hard
        negatives, masks or sampling it sums the same pairs again (the mean of
        the two directions equals one): SigLIP needs no second direction.
    gather : bool, default False
        All-gather form under ``torch.distributed``: each rank's anchors
        against the candidates of every rank (one all-gather of the
        embeddings in the forward, one all-reduce of their gradient in the
        backward); the gradients of the scale and bias are averaged over the
        ranks. See docs/losses.md for its cost against open_clip's ring.
    positives : {"pair", "mask"}, default "pair"
        What ``mask``/``labels`` mark: false negatives (left out), or further
        positives (z = +1); with ``"mask"`` every call must pass one of them.
    normalize, on_shortage, reduction, check_finite, filter_margin, filter_top
        As in :class:`negbatch.InfoNCE`.

    Forward
    -------
    ``loss(a, b, hard_negatives=None, *, labels=None, mask=None, guide=None,
    generator=None)`` with the inputs of :class:`negbatch.InfoNCE`.

    Examples
    --------
    >>> import torch
    >>> from negbatch import SigLIP
    >>> images, texts = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
    >>> loss_fn = SigLIP()
    >>> loss = loss_fn(images, texts)
    >>> loss.backward()
    >>> sorted(name for name, _ in loss_fn.named_parameters())
    ['bias', 'logit_scale.log_scale']
    >>> bool(loss_fn.bias.grad < 0)   # one positive among 16 pairs: descent raises the bias from -10
    True
    """

    bias: Tensor

    @keyword_only("SigLIP(temperature=0.1, bias=-10.0)")
    def __init__(
        self,
        *,
        temperature: float = 0.1,
        bias: float = -10.0,
        learnable_temperature: bool = True,
        learnable_bias: bool = True,
        negatives: Negatives = "all",
        form: Form = "query_document",
        symmetric: bool = False,
        gather: bool = False,
        normalize: bool = True,
        on_shortage: OnShortage = "raise",
        reduction: Reduction = "mean",
        check_finite: bool = True,
        positives: Positives = "pair",
        filter_margin: float | None = None,
        filter_top: float | None = None,
    ) -> None:
        """Set up the loss. Every argument is keyword-only; see Parameters in
        ``help(SigLIP)``."""
        super().__init__()
        self._set_options(
            temperature=temperature, negatives=negatives, form=form, symmetric=symmetric, gather=gather,
            normalize=normalize, on_shortage=on_shortage, reduction=reduction, check_finite=check_finite,
            learnable_temperature=learnable_temperature, positives=positives, filter_margin=filter_margin,
            filter_top=filter_top,
        )
        if not is_real(bias):
            raise TypeError(f"bias must be a finite float (SigLIP starts at -10), got {type(bias).__name__}")
        if not math.isfinite(bias):
            raise ValueError(f"bias must be a finite float (SigLIP starts at -10), got {bias!r}")
        if not isinstance(learnable_bias, bool):
            raise TypeError(f"learnable_bias must be True or False, got {learnable_bias!r}")
        value = torch.tensor(float(bias))
        if learnable_bias:
            self.bias = nn.Parameter(value)
        else:
            self.register_buffer("bias", value)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.current_temperature:.4g}, bias={self.bias.item():.4g}, negatives={self.negatives!r}, "
            f"form={self.form!r}, symmetric={self.symmetric}, gather={self.gather}{self._option_repr()}"
        )

    def log_values(self) -> dict[str, float]:
        return {**super().log_values(), "bias": self.bias.item()}

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        hard_negatives: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        guide: tuple[Tensor, ...] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if self._plain_call(a, b, hard_negatives, labels, mask, guide):
            return self._plain_forward(a, b)
        self._check_views(a, b)
        labels = check_labels(labels, a.shape[0], a.device)
        layout = self._layout(a, b, hard_negatives, mask, labels=labels)
        self._filter(layout, guide)
        temperature = self._temperature(layout)
        bias = average_gradient(self.bias) if self.bias.requires_grad else self.bias
        selections = [self._negatives_of(d, generator, layout) for d in layout.directions]
        shared = shared_directions(layout, self.form, self.symmetric, selections, temperature, _SigmoidKernel,
                                   extra=bias)
        values = list(shared) if shared is not None else [
            sigmoid_values(d.anchors, d.bank, s, temperature, bias) for d, s in zip(layout.directions, selections)]
        return layout.reduce(torch.cat(values) if len(values) > 1 else values[0], self.reduction)

    def _plain_forward(self, a: Tensor, b: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # A small plain batch in one autograd node (see _plain.py): the bias
        # is the product's input, and with softplus(-l) = softplus(l) - l the
        # positives need no sign flip: l_i = sum_j softplus(l_ij) - l_i,p(i).
        bias = (average_gradient(self.bias) if self.bias.requires_grad else self.bias).to(a.dtype)
        scale = self.logit_scale() if self.logit_scale is not None else None
        alpha = 1.0 / self.temperature if scale is None else 1.0
        values = plain_sigmoid(a, b, scale, bias, alpha, self.form == "two_view", self.symmetric, self.reduction)
        return self._plain_result(a, b, values, reduced=self.reduction != "none")
