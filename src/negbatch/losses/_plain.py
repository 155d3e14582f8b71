"""InfoNCE and SigLIP of a small plain batch, each in one autograd node.

A plain call (one process, in-batch candidates only, every one of them or K
sampled, normalised embeddings, a small batch: see
``BankLoss._plain_call``) is what most users run, and at its sizes the cost
is not the arithmetic but the steps: autograd's version of
``cross_entropy(normalize(q) @ normalize(d).T / tau)`` records a dozen nodes
whose backward passes (the normalisation's division and norm above all) take
about a fifth of the call (bench/bench_peers.py, 2B = 512). Here the forward
keeps the normalised embeddings and the log-softmax, and the backward is
written out: ``softmax - one-hot`` on the logits, the two products with the
embeddings, the normalisation's projection ``(g - y (y . g)) / |x|``.

The backward is first-order; under ``create_graph=True`` (a gradient
penalty) it recomputes the call with autograd's ops and differentiates that,
so second-order gradients stay exact (at autograd's speed). Under a
``torch.func`` transform the call runs on autograd's ops throughout.

SigLIP's node is the same with ``sum_j softplus(l_ij) - l_i,p(i)`` per
anchor (the bias the product's input), whose gradient on the logits is
``sigmoid(l) - one-hot``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import Reduction
from ._exp import exp_floored, lowest_log_softmax

__all__ = ["plain_info_nce", "plain_info_nce_autograd", "plain_sigmoid", "plain_sigmoid_autograd"]

#: F.normalize's default: norms below it are clamped (and get no gradient).
_EPS = 1e-12

#: Whether a torch.func transform is running (torch's own Function.apply asks the same).
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _normalized(x: Tensor) -> tuple[Tensor, Tensor]:
    """``F.normalize(x, dim=1)`` (the same ops) and the norms (n, 1)."""
    norm = x.norm(2, dim=1, keepdim=True)
    return x / norm.clamp_min(_EPS).expand_as(x), norm


def _normalize_backward(grad: Tensor, y: Tensor, norm: Tensor) -> Tensor:
    """d/dx of ``x / max(|x|, eps)`` applied to ``grad``: the component along
    ``y`` removed, then divided by the norm (only divided where the norm is
    below eps: autograd's clamp passes the norm's gradient where norm >= eps)."""
    along = (grad * y).sum(dim=1, keepdim=True)
    along.mul_(norm >= _EPS)
    return (grad - y * along).div_(norm.clamp_min(_EPS))


class _PlainInfoNCE(torch.autograd.Function):
    """``-log softmax`` of every anchor's positive, both embeddings
    normalised inside: the per-anchor values, or their mean or sum (see
    :func:`plain_info_nce`)."""

    @staticmethod
    def forward(ctx, a, b, scale, options):  # type: ignore[override]
        alpha, two_view, symmetric, rows, columns, reduction = options
        anchors, bank, norms, logits, positive = _logits(a, b, scale, alpha, two_view)
        log_p, target = _log_softmax(logits, positive, rows)
        log_q = None
        if symmetric:
            if columns is None:
                # Each document against every query: the logits' columns,
                # normalised along dim 0 in place (no transposed copy); its
                # positive is on the diagonal.
                log_q = torch.log_softmax(logits, dim=0)
                column_values = -log_q.diagonal()
            else:
                log_q, target_q = _log_softmax(logits.t(), positive, columns)
                column_values = F.nll_loss(log_q, target_q, reduction="none")
            values = torch.cat([F.nll_loss(log_p, target, reduction="none"), column_values])
            if reduction != "none":
                values = values.mean() if reduction == "mean" else values.sum()
        else:
            values = F.nll_loss(log_p, target, reduction=reduction)
        ctx.save_for_backward(a, b, scale, anchors, bank, *norms, log_p, log_q, positive)
        ctx.options = options
        return values

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        alpha, two_view, symmetric, rows, columns, reduction = ctx.options
        if two_view:
            a, b, scale, anchors, bank, norm, log_p, log_q, positive = ctx.saved_tensors
        else:
            a, b, scale, anchors, bank, norm_a, norm_b, log_p, log_q, positive = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate autograd's version of the call
            return _second_order(ctx, a, b, scale, grad)
        n_rows, m = log_p.shape[0], bank.shape[0]
        total = n_rows + (m if symmetric else 0)
        # d loss / d logits, the logits being alpha * scale * anchors @ bank.T:
        # softmax - one-hot of each anchor, times its weight in the loss (one
        # number for a mean or sum, folded into the products' factor).
        weights, factor = grad, alpha
        if reduction != "none":
            weights, factor = None, alpha * (grad / total if reduction == "mean" else grad)
        # The rows are unit vectors: every logit lies within +-alpha * scale (see _exp.py).
        bound = alpha * (1.0 if scale is None else float(scale)) if log_p.device.type == "cpu" else None
        # Sampled two views: the anchors are the bank, so the gradient's transpose is scattered in too
        # and one product serves both uses of each row (see _through_the_product).
        symmetrized = two_view and rows is not None
        g_logits = _softmax_minus_one_hot(log_p, None if weights is None else weights[:n_rows], positive, rows, m,
                                          logit_bound=bound, symmetrize=symmetrized)
        if symmetric:
            column_weights = None if weights is None else weights[n_rows:]
            if columns is None:  # log_q is in the logits' layout, normalised by column
                g_columns = exp_floored(log_q, None if bound is None else lowest_log_softmax(bound, n_rows))
                if column_weights is None:
                    g_columns.diagonal().sub_(1.0)
                else:
                    g_columns.mul_(column_weights[None, :]).diagonal().sub_(column_weights)
                g_logits += g_columns
            else:
                g_logits += _softmax_minus_one_hot(log_q, column_weights, positive, columns, n_rows,
                                                   logit_bound=bound).t()
        norms = (norm,) if two_view else (norm_a, norm_b)
        return (*_through_the_product(ctx, g_logits, factor, scale, anchors, bank, norms, a.shape[0],
                                      symmetrized=symmetrized), None)


def _through_the_product(ctx, g_logits: Tensor, factor, scale: Tensor | None, anchors: Tensor, bank: Tensor,
                         norms: tuple[Tensor, ...], half: int, symmetrized: bool = False,
                         ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``a``, ``b`` and the scale from the gradient of the
    logits ``factor * scale * anchors @ bank.T`` (``norms``: one, the anchors'
    own, in the two-view form; else the anchors' and the bank's).
    ``symmetrized`` (two views): ``g_logits`` already holds the gradient plus
    its transpose."""
    g_anchors = g_logits @ bank
    grad_scale = None
    if scale is not None:
        if ctx.needs_input_grad[2]:
            # With the transpose added in, <g + g^T, y y^T> counts <g, y y^T> twice.
            halved = 0.5 if symmetrized else 1.0
            grad_scale = (halved * factor * (g_anchors * anchors).sum()).to(scale.dtype)
        factor = factor * scale
    if len(norms) == 1:
        # The anchors are the bank: both uses of each normalised row add up.
        g_y = (g_anchors if symmetrized else g_anchors.add_(g_logits.t() @ anchors)).mul_(factor)
        g_x = _normalize_backward(g_y, anchors, norms[0])
        return g_x[:half], g_x[half:], grad_scale
    norm_a, norm_b = norms
    g_a = _normalize_backward(g_anchors.mul_(factor), anchors, norm_a) if ctx.needs_input_grad[0] else None
    g_b = None
    if ctx.needs_input_grad[1]:
        g_b = _normalize_backward((g_logits.t() @ anchors).mul_(factor), bank, norm_b)
    return g_a, g_b, grad_scale


def _logits(a: Tensor, b: Tensor, scale: Tensor | None, alpha: float, two_view: bool, bias: Tensor | None = None):
    """Normalised anchors and bank, their norms, the logits (plus ``bias``;
    each anchor's own column at -inf) and each row's positive column."""
    n = a.shape[0]
    if two_view:
        y, norm = _normalized(torch.cat([a, b]))
        anchors, bank, norms = y, y, (norm,)
        positive = torch.arange(2 * n, device=a.device).roll(n)
    else:
        (anchors, norm_a), (bank, norm_b) = _normalized(a), _normalized(b)
        norms = (norm_a, norm_b)
        positive = torch.arange(n, device=a.device)
    scaled = anchors if scale is None else anchors * scale
    if bias is None:
        logits = torch.addmm(scaled.new_zeros(()), scaled, bank.t(), beta=0.0, alpha=alpha)
    else:
        logits = torch.addmm(bias, scaled, bank.t(), alpha=alpha)
    if two_view:
        logits.fill_diagonal_(float("-inf"))
    return anchors, bank, norms, logits, positive


def _log_softmax(logits: Tensor, positive: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
    """Log-softmax over every column (the positive at its column) or over the
    sampled ``index`` (the positive in slot 0)."""
    if index is None:
        return torch.log_softmax(logits, dim=1), positive
    return torch.log_softmax(logits.gather(1, index), dim=1), torch.zeros_like(positive)


def _softmax_minus_one_hot(log_p: Tensor, weights: Tensor | None, positive: Tensor, index: Tensor | None,
                           m: int, logit_bound: float | None = None, symmetrize: bool = False) -> Tensor:
    """``softmax - one-hot of the positive`` as an (n, m) matrix, each row
    times its weight (None: 1); ``logit_bound``: a bound on the logits' size,
    if known (see _exp.py); ``symmetrize`` (sampled, n = m): plus its
    transpose, whose n*K entries cost a scatter where the dense transpose
    would cost a product."""
    g = exp_floored(log_p, None if logit_bound is None else lowest_log_softmax(logit_bound, log_p.shape[1]))
    one = 1.0
    if weights is not None:
        g.mul_(weights[:, None])
        one = weights
    if index is None:
        g[torch.arange(g.shape[0], device=g.device), positive] -= one
        return g
    g[:, 0] -= one
    full = g.new_zeros(g.shape[0], m).scatter_(1, index, g)
    if symmetrize:
        full.t().scatter_add_(1, index, g)  # full[index[i, k], i] += g[i, k]
    return full


def _second_order(ctx, a: Tensor, b: Tensor, scale: Tensor | None, grad: Tensor) -> tuple:
    """The backward under ``create_graph=True``: the gradient of
    :func:`plain_info_nce_autograd`, itself differentiable."""
    wanted = [(i, t) for i, t in enumerate((a, b, scale)) if ctx.needs_input_grad[i]]
    values = plain_info_nce_autograd(a, b, scale, *ctx.options)
    grads = torch.autograd.grad(values, [t for _, t in wanted], grad, create_graph=True, allow_unused=True)
    out: list = [None] * 4
    for (i, _), g in zip(wanted, grads):
        out[i] = g
    return tuple(out)


def _autograd_pair(a: Tensor, b: Tensor, two_view: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The autograd versions' normalised anchors and bank and each row's
    positive column (two-view: both views are anchors and bank)."""
    n = a.shape[0]
    if two_view:
        z = F.normalize(torch.cat([a, b]), dim=1)
        return z, z, torch.arange(2 * n, device=a.device).roll(n)
    return F.normalize(a, dim=1), F.normalize(b, dim=1), torch.arange(n, device=a.device)


def plain_info_nce_autograd(a: Tensor, b: Tensor, scale: Tensor | None, alpha: float, two_view: bool,
                            symmetric: bool, rows: Tensor | None, columns: Tensor | None,
                            reduction: Reduction) -> Tensor:
    """:func:`plain_info_nce` in autograd's ops (its second order, and the
    tests' first reference)."""
    anchors, bank, positive = _autograd_pair(a, b, two_view)
    logits = torch.addmm(anchors.new_zeros(()), anchors if scale is None else anchors * scale, bank.t(),
                         beta=0.0, alpha=alpha)
    if two_view:
        logits = logits.fill_diagonal_(float("-inf"))
    directions = [(logits, rows)] + ([(logits.t(), columns)] if symmetric else [])
    values = []
    for direction, index in directions:
        if index is None:
            values.append(F.cross_entropy(direction, positive, reduction="none"))
        else:
            values.append(F.cross_entropy(direction.gather(1, index), torch.zeros_like(positive), reduction="none"))
    values = torch.cat(values) if len(values) > 1 else values[0]
    if reduction == "none":
        return values
    return values.mean() if reduction == "mean" else values.sum()


def plain_info_nce(a: Tensor, b: Tensor, scale: Tensor | None, alpha: float, two_view: bool, symmetric: bool,
                   rows: Tensor | None, columns: Tensor | None, reduction: Reduction) -> Tensor:
    """InfoNCE of a plain call, both inputs normalised here.

    Parameters
    ----------
    a, b : Tensor (n, d)
        The two views (``two_view``: stacked into one bank that is also the
        anchors, each anchor's own column never a candidate) or the queries
        and their documents.
    scale : Tensor (0-d) or None
        A learnable logit scale multiplying the logits (None: fixed).
    alpha : float
        A fixed factor of the logits (``1/temperature``; 1 with ``scale``).
    two_view, symmetric : bool
        The form; ``symmetric`` (query-document) adds the documents' direction
        (the logits' columns) after the queries'.
    rows, columns : Tensor (n, 1 + K) long or None
        Sampled candidates of each direction's anchors (the positive's column
        in slot 0), or None for every candidate.
    reduction : {"mean", "sum", "none"}
        Over all anchors of all directions (the mean of the two directions'
        means when symmetric).
    """
    options = (alpha, two_view, symmetric, rows, columns, reduction)
    if _needs_autograd_ops(a, b, scale):
        return plain_info_nce_autograd(a, b, scale, *options)
    return _PlainInfoNCE.apply(a, b, scale, options)


def _needs_autograd_ops(*inputs: Tensor | None) -> bool:
    """torch.func's transforms (grad, vmap, jacrev) need autograd functions in
    their own style, and the nodes save their inputs (for a second order),
    which an inference tensor refuses: autograd's ops then, which compute
    what the nodes compute."""
    return _functorch_active() or any(t is not None and t.is_inference() for t in inputs)


class _PlainSigmoid(torch.autograd.Function):
    """SigLIP's ``sum_j softplus(l_ij) - l_i,p(i)`` of every anchor, both
    embeddings normalised inside, the logits ``alpha * scale * y_a @ y_b.T
    + bias``: the per-anchor values, or their mean or sum (see
    :func:`plain_sigmoid`)."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, options):  # type: ignore[override]
        alpha, two_view, symmetric, reduction = options
        anchors, bank, norms, logits, positive = _logits(a, b, scale, alpha, two_view, bias)
        pairs = F.softplus(logits)
        rows = torch.arange(logits.shape[0], device=a.device)
        values = pairs.sum(dim=1) - logits[rows, positive]
        if symmetric:  # documents against the queries: the columns
            values = torch.cat([values, pairs.sum(dim=0) - logits[rows, positive]])
        ctx.save_for_backward(a, b, scale, bias, anchors, bank, *norms, logits, positive)
        ctx.options = options
        if reduction == "none":
            return values
        return values.mean() if reduction == "mean" else values.sum()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        alpha, two_view, symmetric, reduction = ctx.options
        if two_view:
            a, b, scale, bias, anchors, bank, norm, logits, positive = ctx.saved_tensors
        else:
            a, b, scale, bias, anchors, bank, norm_a, norm_b, logits, positive = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate autograd's version of the call
            wanted = [(i, t) for i, t in enumerate((a, b, scale, bias)) if ctx.needs_input_grad[i]]
            values = plain_sigmoid_autograd(a, b, scale, bias, *ctx.options)
            grads = torch.autograd.grad(values, [t for _, t in wanted], grad, create_graph=True, allow_unused=True)
            out: list = [None] * 5
            for (i, _), g in zip(wanted, grads):
                out[i] = g
            return tuple(out)
        n = logits.shape[0]
        rows = torch.arange(n, device=logits.device)
        # d loss / d logits: sigmoid(l) - one-hot of the positive, each row (and,
        # symmetric, each column) times its weight; one number for a mean or sum.
        g_logits = torch.sigmoid(logits)
        if reduction == "none":
            row_w = grad[:n]
            one = row_w.clone()
            if symmetric:
                col_w = grad[n:]
                g_logits = g_logits * row_w[:, None] + g_logits * col_w[None, :]
                one += col_w
            else:
                g_logits.mul_(row_w[:, None])
        else:
            total = n * (2 if symmetric else 1)
            one = 2.0 if symmetric else 1.0
            if symmetric:
                g_logits.mul_(2.0)
            g_logits.mul_(grad / total if reduction == "mean" else grad)
            one = one * (grad / total if reduction == "mean" else grad)
        g_logits[rows, positive] -= one
        grad_bias = g_logits.sum().to(bias.dtype) if ctx.needs_input_grad[3] else None
        norms = (norm,) if two_view else (norm_a, norm_b)
        g_a, g_b, grad_scale = _through_the_product(ctx, g_logits, alpha, scale, anchors, bank, norms, a.shape[0])
        return g_a, g_b, grad_scale, grad_bias, None


def plain_sigmoid_autograd(a: Tensor, b: Tensor, scale: Tensor | None, bias: Tensor, alpha: float, two_view: bool,
                           symmetric: bool, reduction: Reduction) -> Tensor:
    """:func:`plain_sigmoid` in autograd's ops (its second order)."""
    anchors, bank, positive = _autograd_pair(a, b, two_view)
    logits = torch.addmm(bias, anchors if scale is None else anchors * scale, bank.t(), alpha=alpha)
    if two_view:
        logits = logits.fill_diagonal_(float("-inf"))
    pairs = F.softplus(logits)
    rows = torch.arange(logits.shape[0], device=a.device)
    values = pairs.sum(dim=1) - logits[rows, positive]
    if symmetric:
        values = torch.cat([values, pairs.sum(dim=0) - logits[rows, positive]])
    if reduction == "none":
        return values
    return values.mean() if reduction == "mean" else values.sum()


def plain_sigmoid(a: Tensor, b: Tensor, scale: Tensor | None, bias: Tensor, alpha: float, two_view: bool,
                  symmetric: bool, reduction: Reduction) -> Tensor:
    """SigLIP of a plain call, both inputs normalised here: per anchor
    ``sum_j softplus(l_ij) - l_i,p(i)`` over the logits ``alpha * scale *
    y_a @ y_b.T + bias`` (``two_view``: each anchor's own column out; the
    positive the other view, or the paired document; ``symmetric`` adds the
    documents' direction), reduced over all anchors as
    :func:`plain_info_nce` is. ``bias`` is a 0-d tensor of the inputs' dtype."""
    options = (alpha, two_view, symmetric, reduction)
    if _needs_autograd_ops(a, b, scale, bias):
        return plain_sigmoid_autograd(a, b, scale, bias, *options)
    return _PlainSigmoid.apply(a, b, scale, bias, options)
