"""How far the minibatch gradient of a contrastive loss is from the gradient of
the global loss it stands for.

For a fixed model and data set of N samples (two views, or queries and
documents), :func:`exact_global_gradient` computes the gradient ``g`` of the
global loss ``L = mean_a [-s_{a,p(a)}/tau + log Z_a]`` (every anchor against
every negative of the data set) exactly, chunk by chunk, so that N in the
thousands fits in CPU memory. :func:`gradient_bias` draws many random batches
(uniform, without replacement), averages their gradients and reports

* the relative bias ``||mean_B g_B - g|| / ||g||``,
* the Monte-Carlo noise floor of that number, ``sqrt(tr Cov(g_B) / M) / ||g||``
  (the expected value of the relative bias when the true bias is zero),
* a bias corrected for that noise, ``sqrt(max(0, ||mean - g||^2 - tr Cov / M)) / ||g||``,
* the relative variance ``tr Cov(g_B) / ||g||^2``,

for four estimators:

* ``"plain"``: the minibatch loss ``-s/tau + log Zhat``;
* ``"corrected"``: the gradient a :class:`~negbatch.GlobalInfoNCE` training
  step uses: the E-step on the batch from the loss's current running state,
  then the surrogate (the state is restored after each batch, so that every
  batch starts from the same state);
* ``"corrected_fixed"``: the surrogate with the running state as it is, no
  E-step (samples never visited use ``nu = Zhat``);
* ``"corrected_exact"``: the surrogate with ``nu`` at the exact ``Z``.

The model is used as it is: put it in ``eval()`` mode when it has batch
normalisation or dropout, or the minibatch gradient also depends on the batch
through those layers (a warning says so).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int, is_int
from ..losses.global_nce import GlobalInfoNCE

Encoders = Union[nn.Module, Sequence[nn.Module]]
Estimator = Literal["plain", "corrected", "corrected_fixed", "corrected_exact"]
_ESTIMATORS = ("plain", "corrected", "corrected_fixed", "corrected_exact")

__all__ = ["ExactGlobalGradient", "BiasEstimate", "exact_global_gradient", "minibatch_gradient", "gradient_bias",
           "bias_curve"]


@dataclass
class ExactGlobalGradient:
    """The global loss of a data set, its exact gradient and the exact normalisers.

    Attributes
    ----------
    loss : float
        ``mean_a [-s_{a,p(a)}/tau + log Z_a]`` over all anchors of the data set.
    gradient : Tensor (P,)
        Its gradient, flattened over the encoders' parameters (in
        ``parameters()`` order, shared parameters once).
    log_normalizers : Tensor (N, R)
        Exact ``log Z`` per sample and anchor role, in the layout of
        ``GlobalInfoNCE.log_nu`` (give it to ``set_log_normalizers``).
    """

    loss: float
    gradient: Tensor
    log_normalizers: Tensor


@dataclass
class BiasEstimate:
    """Bias and variance of one minibatch gradient estimator (see the module docstring)."""

    estimator: str
    batch_size: int
    num_batches: int
    relative_bias: float
    noise_floor: float
    relative_bias_debiased: float
    relative_variance: float
    gradient_norm: float
    mean_gradient: Tensor = field(repr=False)

    def as_dict(self) -> dict:
        """Plain numbers for a report (without the mean gradient)."""
        out = asdict(self)
        out.pop("mean_gradient")
        return out


def _encoders(model: Encoders, loss: GlobalInfoNCE) -> tuple[nn.Module, nn.Module]:
    if isinstance(model, nn.Module):
        return model, model
    if isinstance(model, (tuple, list)) and len(model) == 2 and all(isinstance(m, nn.Module) for m in model):
        if loss.form == "two_view" and model[0] is not model[1]:
            raise ValueError("form='two_view' encodes both views with one model; pass a single nn.Module")
        return model[0], model[1]
    raise TypeError("model must be an nn.Module or a pair (query_encoder, document_encoder) of nn.Modules")


def _parameters(encoders: tuple[nn.Module, nn.Module]) -> list[nn.Parameter]:
    seen, params = set(), []
    for enc in encoders:
        for p in enc.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError("the model has no parameters that require a gradient")
    return params


def _check(
    model: Encoders, loss: GlobalInfoNCE, inputs: Sequence[Tensor]
) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    if not isinstance(loss, GlobalInfoNCE):
        raise TypeError(f"loss must be a negbatch.GlobalInfoNCE, got {type(loss).__name__}")
    if loss.reduction != "mean":
        raise ValueError("loss.reduction must be 'mean' for gradient diagnostics")
    if not isinstance(inputs, (tuple, list)) or len(inputs) != 2 or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError("inputs must be a pair of tensors: (view1, view2) or (queries, documents), N rows each")
    xa, xb = inputs
    if xa.shape[0] != xb.shape[0]:
        raise ValueError(f"the two inputs must have the same number of rows, got {xa.shape[0]} and {xb.shape[0]}")
    if xa.shape[0] != loss.num_samples:
        raise ValueError(
            f"the data set has {xa.shape[0]} samples but loss.num_samples is {loss.num_samples}; "
            f"build the loss with num_samples={xa.shape[0]}"
        )
    enc_a, enc_b = _encoders(model, loss)
    for enc in {id(enc_a): enc_a, id(enc_b): enc_b}.values():
        if enc.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in enc.modules()):
            warnings.warn(
                "the model has batch normalisation in training mode: its embeddings depend on the batch, so "
                "neither the exact gradient nor the bias is well defined; call model.eval() first",
                stacklevel=3,
            )
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in enc.modules()):
            warnings.warn(
                "the model has dropout in training mode: every pass draws other masks, so the exact gradient's "
                "passes and the minibatch gradients see different models; call model.eval() first",
                stacklevel=3,
            )
    return enc_a, enc_b, xa, xb


def _embed(enc: nn.Module, x: Tensor, normalize: bool) -> Tensor:
    out = enc(x)
    return F.normalize(out, dim=-1) if normalize else out


def _global_directions(
    loss: GlobalInfoNCE, ua: Tensor, ub: Tensor
) -> list[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
    """(anchors, bank, positive column, self column or None) for the whole data set."""
    n = ua.shape[0]
    rows = torch.arange(n, device=ua.device)
    if loss.form == "two_view":
        both = torch.cat([ua, ub])
        r = torch.arange(2 * n, device=ua.device)
        return [(both, both, (r + n) % (2 * n), r)]
    out = [(ua, ub, rows, None)]
    if loss.symmetric:
        out.append((ub, ua, rows, None))
    return out


def exact_global_gradient(
    model: Encoders,
    loss: GlobalInfoNCE,
    inputs: Sequence[Tensor],
    *,
    chunk_size: int = 256,
) -> ExactGlobalGradient:
    """Exact gradient of the global loss over all N samples, in chunks.

    Three passes, as in gradient caching: embed every sample without a graph;
    for each chunk of anchors, the loss against the whole data set and its
    gradient with respect to the embeddings; re-embed each chunk with a graph
    and back-propagate the cached embedding gradients. Memory: one chunk of
    anchors against all ``N`` (or ``2N``) candidates at a time. The loss's
    temperature, form, ``symmetric`` and ``normalize`` define the objective;
    its negatives setting does not (the global loss uses all negatives).
    Parameter ``.grad`` fields are left untouched.

    Parameters
    ----------
    model : nn.Module or (query_encoder, document_encoder)
    loss : GlobalInfoNCE
    inputs : (view1, view2) or (queries, documents)
        N rows each, already on the model's device; row i is sample i.
    chunk_size : int, default 256

    Examples
    --------
    >>> import torch
    >>> from negbatch import GlobalInfoNCE
    >>> from negbatch.diagnostics.bias import exact_global_gradient
    >>> x = torch.randn(50, 6)
    >>> model = torch.nn.Linear(6, 4)
    >>> exact = exact_global_gradient(model, GlobalInfoNCE(50, temperature=0.2), (x, x + 0.1 * torch.randn(50, 6)), chunk_size=16)
    >>> exact.gradient.shape, exact.log_normalizers.shape
    (torch.Size([28]), torch.Size([50, 2]))
    """
    enc_a, enc_b, xa, xb = _check(model, loss, inputs)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    params = _parameters((enc_a, enc_b))
    n = xa.shape[0]
    with torch.no_grad():
        ea = torch.cat([_embed(enc_a, xa[s : s + chunk_size], loss.normalize) for s in range(0, n, chunk_size)])
        eb = torch.cat([_embed(enc_b, xb[s : s + chunk_size], loss.normalize) for s in range(0, n, chunk_size)])
    for i, e in enumerate((ea, eb)):
        # A NaN would make the loss and every gradient NaN, silently (the loss is not called here).
        if not bool(torch.isfinite(e).all()):
            bad = int((~torch.isfinite(e)).any(dim=1).nonzero()[0])
            raise ValueError(f"the model's embedding of inputs[{i}] row {bad} holds NaN or inf: check that input "
                             f"and the model")
    ua, ub = ea.requires_grad_(True), eb.requires_grad_(True)
    grad_a, grad_b = torch.zeros_like(ua), torch.zeros_like(ub)
    total_anchors = n * loss.num_roles
    value = 0.0
    log_z = []
    num_directions = len(_global_directions(loss, ua.detach(), ub.detach()))
    for k in range(num_directions):
        for s in range(0, n * (2 if loss.form == "two_view" else 1), chunk_size):
            # Rebuilt per chunk, so that each chunk's graph reaches the leaves and is freed after it.
            anchors_all, bank, positive_all, self_all = _global_directions(loss, ua, ub)[k]
            rows = torch.arange(s, min(s + chunk_size, anchors_all.shape[0]), device=ua.device)
            count = bank.shape[0] - (2 if self_all is not None else 1)
            if count < 1:
                raise ValueError("the data set needs at least two samples")
            logits = anchors_all[rows] @ bank.t() / loss.current_temperature  # a learned one: its value now
            r = torch.arange(rows.shape[0], device=ua.device)
            positive = logits[r, positive_all[rows]]
            excluded = torch.zeros(logits.shape, dtype=torch.bool, device=ua.device)
            excluded[r, positive_all[rows]] = True
            if self_all is not None:
                excluded[r, self_all[rows]] = True
            log_mean = torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1) - math.log(count)
            term = (-positive + log_mean).sum() / total_anchors
            ga, gb = torch.autograd.grad(term, (ua, ub), allow_unused=True)
            if ga is not None:
                grad_a += ga
            if gb is not None:
                grad_b += gb
            value += float(term.detach())
            log_z.append(log_mean.detach())
    log_z = torch.cat(log_z).view(loss.num_roles, n).t().contiguous()
    flat = [torch.zeros_like(p).reshape(-1) for p in params]
    for enc, x, g in ((enc_a, xa, grad_a), (enc_b, xb, grad_b)):
        for s in range(0, n, chunk_size):
            out = _embed(enc, x[s : s + chunk_size], loss.normalize)
            grads = torch.autograd.grad(out, params, grad_outputs=g[s : s + chunk_size], allow_unused=True)
            for acc, gp in zip(flat, grads):
                if gp is not None:
                    acc += gp.reshape(-1)
    return ExactGlobalGradient(loss=value, gradient=torch.cat(flat), log_normalizers=log_z)


def minibatch_gradient(
    model: Encoders,
    loss: GlobalInfoNCE,
    inputs: Sequence[Tensor],
    batch: Tensor,
    *,
    estimator: Literal["plain", "corrected", "corrected_fixed"] = "plain",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Flat parameter gradient of one minibatch estimator on the samples ``batch``.

    ``"plain"``: ``GlobalInfoNCE.minibatch_loss``; ``"corrected"``: a training
    step's gradient (E-step on the batch, then the surrogate), after which
    the loss's state is restored; ``"corrected_fixed"``: the surrogate with
    the state as it is (``update=False``). ``generator`` drives sampled
    negatives. Parameter ``.grad`` fields are left untouched.

    Examples
    --------
    >>> import torch
    >>> from negbatch import GlobalInfoNCE
    >>> from negbatch.diagnostics.bias import minibatch_gradient
    >>> x = torch.randn(20, 6)
    >>> g = minibatch_gradient(torch.nn.Linear(6, 4), GlobalInfoNCE(20), (x, x), torch.arange(8))
    >>> g.shape
    torch.Size([28])
    """
    enc_a, enc_b, xa, xb = _check(model, loss, inputs)
    if estimator not in ("plain", "corrected", "corrected_fixed"):
        raise ValueError(f"estimator must be 'plain', 'corrected' or 'corrected_fixed', got {estimator!r}")
    batch = loss.check_indices(batch, name="batch").to(xa.device)
    params = _parameters((enc_a, enc_b))
    a, b = enc_a(xa[batch]), enc_b(xb[batch])
    if estimator == "plain":
        value = loss.minibatch_loss(a, b, batch, generator=generator)
    elif estimator == "corrected_fixed":
        value = loss(a, b, batch, generator=generator, update=False)
    else:
        saved = [t.clone() for t in (loss.log_nu, loss.visited, loss.num_updates)]
        try:
            value = loss(a, b, batch, generator=generator, update=True)
        finally:
            with torch.no_grad():
                for buffer, old in zip((loss.log_nu, loss.visited, loss.num_updates), saved):
                    buffer.copy_(old)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def gradient_bias(
    model: Encoders,
    loss: GlobalInfoNCE,
    inputs: Sequence[Tensor],
    batch_size: int,
    num_batches: int,
    *,
    estimator: Estimator = "plain",
    seed: int = 0,
    exact: ExactGlobalGradient | None = None,
    chunk_size: int = 256,
) -> BiasEstimate:
    """Bias and variance of a minibatch gradient estimator of the global loss.

    Draws ``num_batches`` batches of ``batch_size`` samples uniformly without
    replacement (seeded by ``seed``; sampled negatives use a generator seeded
    by ``seed + 1``) and compares the mean of their gradients with the exact
    global gradient (``exact``, computed when not given: pass it when
    comparing several batch sizes or estimators).

    Parameters
    ----------
    model, loss, inputs
        As in :func:`exact_global_gradient`.
    batch_size : int
        In ``[2, N]``.
    num_batches : int
        At least 2; the noise floor shrinks as ``1/sqrt(num_batches)``.
    estimator : {"plain", "corrected", "corrected_fixed", "corrected_exact"}
        See the module docstring. ``"corrected"`` and ``"corrected_fixed"``
        use the loss's running state (train first); ``"corrected_exact"`` a
        copy of the loss with ``nu = Z`` exactly. The loss's state is never
        changed.

    Examples
    --------
    >>> import torch
    >>> from negbatch import GlobalInfoNCE
    >>> from negbatch.diagnostics.bias import exact_global_gradient, gradient_bias
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x = torch.randn(40, 6)
    >>> views = (x + 0.1 * torch.randn(40, 6), x + 0.1 * torch.randn(40, 6))
    >>> model, loss = torch.nn.Linear(6, 4), GlobalInfoNCE(40, temperature=0.2)
    >>> exact = exact_global_gradient(model, loss, views)
    >>> plain = gradient_bias(model, loss, views, 4, 200, estimator="plain", exact=exact)
    >>> fixed = gradient_bias(model, loss, views, 4, 200, estimator="corrected_exact", exact=exact)
    >>> plain.relative_bias_debiased > fixed.relative_bias_debiased
    True
    """
    enc_a, _, xa, _ = _check(model, loss, inputs)
    n = xa.shape[0]
    if not is_int(batch_size) or not 2 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int in [2, N={n}], got {batch_size!r}")
    if not is_int(num_batches) or num_batches < 2:
        raise ValueError(f"num_batches must be an int >= 2, got {num_batches!r}")
    batch_size, num_batches = int(batch_size), int(num_batches)
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
    if exact is None:
        exact = exact_global_gradient(model, loss, inputs, chunk_size=chunk_size)
    used = loss
    if estimator == "corrected_exact":
        used = copy.deepcopy(loss)
        used.set_log_normalizers(exact.log_normalizers.to(used.log_nu))
    kind = "corrected_fixed" if estimator == "corrected_exact" else estimator
    batches = torch.Generator().manual_seed(seed)
    negatives = torch.Generator(device=xa.device).manual_seed(seed + 1)
    target = exact.gradient.double()
    mean = torch.zeros_like(target)
    m2 = 0.0
    for t in range(num_batches):
        batch = torch.randperm(n, generator=batches)[:batch_size]
        g = minibatch_gradient(model, used, inputs, batch, estimator=kind, generator=negatives).double()
        delta = g - mean
        mean += delta / (t + 1)
        m2 += float(delta @ (g - mean))  # Welford: sum of squared deviations from the running mean
    trace_cov = m2 / (num_batches - 1)
    norm = float(target.norm())
    if norm == 0.0:
        raise ValueError("the exact global gradient is zero; the relative bias is undefined")
    bias_sq = float((mean - target).pow(2).sum())
    return BiasEstimate(
        estimator=estimator,
        batch_size=batch_size,
        num_batches=num_batches,
        relative_bias=math.sqrt(bias_sq) / norm,
        noise_floor=math.sqrt(trace_cov / num_batches) / norm,
        relative_bias_debiased=math.sqrt(max(0.0, bias_sq - trace_cov / num_batches)) / norm,
        relative_variance=trace_cov / norm**2,
        gradient_norm=norm,
        mean_gradient=mean,
    )


def bias_curve(
    model: Encoders,
    loss: GlobalInfoNCE,
    inputs: Sequence[Tensor],
    batch_sizes: Sequence[int],
    num_batches: int,
    *,
    estimators: Sequence[Estimator] = ("plain", "corrected_exact"),
    seed: int = 0,
    chunk_size: int = 256,
) -> list[BiasEstimate]:
    """:func:`gradient_bias` for every batch size and estimator, sharing one
    exact gradient; rows ordered by batch size, then estimator.

    Examples
    --------
    >>> import torch
    >>> from negbatch import GlobalInfoNCE
    >>> from negbatch.diagnostics.bias import bias_curve
    >>> x = torch.randn(30, 5)
    >>> rows = bias_curve(torch.nn.Linear(5, 3), GlobalInfoNCE(30, temperature=0.3), (x, x + 0.1), [4, 8], 20)
    >>> [(r.batch_size, r.estimator) for r in rows]
    [(4, 'plain'), (4, 'corrected_exact'), (8, 'plain'), (8, 'corrected_exact')]
    """
    exact = exact_global_gradient(model, loss, inputs, chunk_size=chunk_size)
    return [
        gradient_bias(model, loss, inputs, b, num_batches, estimator=e, seed=seed, exact=exact)
        for b in batch_sizes
        for e in estimators
    ]
