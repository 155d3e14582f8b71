"""A global contrastive loss whose minibatch gradient is not biased by the batch.

The global loss contrasts every anchor with *all* negatives of the data set
(notation of DESIGN.md; ``a`` is an anchor, ``p(a)`` its positive)::

    L(theta) = mean_a [ -s_{a,p(a)}/tau + log Z_a ],   Z_a = mean_{n in D_a^-} exp(s_{a,n}/tau)

A minibatch replaces ``Z_a`` by its batch estimate ``Zhat_a``; the estimate is
unbiased but its logarithm is not, so the plain minibatch gradient
``grad Zhat_a / Zhat_a`` is biased. With ``log Z = min_nu (Z/nu + log nu - 1)``
the augmented loss ``-s/tau + Z_a/nu_a + log nu_a - 1`` is linear in ``Z_a``:
for a fixed ``nu`` its minibatch gradient is unbiased. :class:`GlobalInfoNCE`
keeps ``nu`` per sample and alternates (Chen et al. 2022; SogCLR, Yuan et al.
2022):

* :meth:`GlobalInfoNCE.e_step`: ``nu_a <- (1 - gamma) nu_a + gamma Zhat_a``
  for the anchors of the batch (``nu_a <- Zhat_a`` on a sample's first visit);
* the M-step surrogate returned by ``forward``: ``-s/tau + Zhat_a/nu_a +
  log nu_a - 1`` with ``nu`` fixed, whose gradient is ``grad Zhat_a / nu_a``.

The state is held in log space (``log_nu``), one row per data-set sample and
one column per anchor role of that sample (see :class:`GlobalInfoNCE`).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Union

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
from ..distributed import gather_nograd, gather_with_grad, is_distributed
from ..negatives import (
    Negatives,
    OnShortage,
    autocast_active,
    select_negatives,
    selection_logits,
    validate_negatives,
)
from .infonce import _reduce

Form = Literal["two_view", "query_document"]
Reduction = Literal["mean", "sum", "none"]
OnDuplicate = Literal["raise", "mean"]
Gamma = Union[float, Callable[[int], float]]

__all__ = ["GlobalInfoNCE"]


def _check_gamma_value(gamma: object, name: str = "gamma") -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1] (or a callable step -> float), got {type(gamma).__name__}")
    if not (0.0 < float(gamma) <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {gamma}")
    return float(gamma)


class _Direction:
    """One family of anchors contrasted with one candidate bank (the inputs of
    :func:`select_negatives`), plus the state column its anchors use."""

    __slots__ = ("anchors", "bank", "positive_index", "num_excluded", "kwargs")

    def __init__(
        self, anchors: Tensor, bank: Tensor, positive_index: Tensor, num_excluded: int | None, **kwargs
    ) -> None:
        self.anchors, self.bank, self.positive_index, self.kwargs = anchors, bank, positive_index, kwargs
        # Columns that are never negatives when there is no mask (the positive,
        # the anchor itself), so that the dense count needs no pass over the mask.
        self.num_excluded = num_excluded if kwargs.get("mask") is None else None


class _PositiveAndNegativeSum(torch.autograd.Function):
    """Per row of ``logits`` (non-candidates at -inf): the positive's logit,
    ``S = sum_negatives exp(l - shift)`` and ``shift`` = the largest negative
    logit, so that ``log Zhat = log S + shift - log count`` never overflows.

    One fused pass instead of autograd's chain of masked copies: the backward
    is ``dL/dl = g_S * exp(l - shift)`` on the negatives plus ``g_pos`` on the
    positive (``shift`` is a constant: it cancels in every quantity used).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, positive_column: Tensor):  # type: ignore[override]
        col = positive_column[:, None]
        positive = logits.gather(1, col).squeeze(1)
        work = logits.detach().scatter(1, col, float("-inf"))
        shift = work.amax(dim=1)
        work.sub_(shift[:, None]).exp_()
        # Summed in at least float32: in half precision a row of more than 65504
        # negatives (each term <= 1) would overflow to inf.
        summed = work.sum(dim=1, dtype=torch.promote_types(work.dtype, torch.float32))
        ctx.save_for_backward(work, col)
        ctx.mark_non_differentiable(shift)
        return positive, summed, shift

    @staticmethod
    def backward(ctx, grad_positive: Tensor, grad_summed: Tensor, _grad_shift: Tensor):  # type: ignore[override]
        work, col = ctx.saved_tensors
        grad = (work * grad_summed[:, None]).to(work.dtype)
        grad.scatter_add_(1, col, grad_positive[:, None].to(work.dtype))
        return grad, None


_BLOCK_ELEMENTS = 1 << 22


class _DenseTerms(torch.autograd.Function):
    """:class:`_PositiveAndNegativeSum` over *all* candidates, straight from the
    embeddings, holding one (n, m) buffer.

    The logits are computed once; the buffer then holds ``exp(l - shift)`` on
    the negatives (zero elsewhere) and the backward turns it, in place, into
    ``dL/dscores`` before the two products with the embeddings. It runs once
    (a second backward raises).
    """

    @staticmethod
    def forward(ctx, anchors, bank, allowed, positive_index, temperature):  # type: ignore[override]
        work = anchors @ bank.t()
        work.mul_(1.0 / temperature)
        col = positive_index[:, None]
        positive = work.gather(1, col).squeeze(1)
        shift = work.new_empty(work.shape[0])
        summed = work.new_empty(work.shape[0])
        step = max(1, _BLOCK_ELEMENTS // max(1, work.shape[1]))
        for start in range(0, work.shape[0], step):
            stop = start + step
            block = work[start:stop]
            block.masked_fill_(~allowed[start:stop], float("-inf"))
            block.scatter_(1, col[start:stop], float("-inf"))  # the positive is not a negative
            shift[start:stop] = block.amax(dim=1)
            block.sub_(shift[start:stop, None]).exp_()
            summed[start:stop] = block.sum(dim=1)
        ctx.save_for_backward(anchors, bank, col, work)
        ctx.temperature = temperature
        ctx.consumed = False
        ctx.mark_non_differentiable(shift)
        return positive, summed, shift

    @staticmethod
    def backward(ctx, grad_positive, grad_summed, _grad_shift):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("GlobalInfoNCE's dense backward runs once; do not backward twice through it")
        ctx.consumed = True
        anchors, bank, col, work = ctx.saved_tensors
        work.mul_(grad_summed[:, None])
        work.scatter_(1, col, grad_positive[:, None])  # the positive's entry was zero
        work.mul_(1.0 / ctx.temperature)
        grad_anchors = work @ bank if ctx.needs_input_grad[0] else None
        grad_bank = work.t() @ anchors if ctx.needs_input_grad[1] else None
        return grad_anchors, grad_bank, None, None, None


class GlobalInfoNCE(nn.Module):
    """Global contrastive loss with one running normaliser per sample (stochastic EM).

    Parameters
    ----------
    num_samples : int
        Size N of the data set; ``indices`` passed to ``forward`` must lie in
        ``[0, N)``.
    temperature : float, default 0.1
    gamma : float in (0, 1] or callable, default 0.9
        E-step rate. A callable receives the number of E-steps done so far
        (``num_updates``, 0 at the first call; saved with the state) and
        returns the rate, e.g. ``lambda step: max(0.1, 0.99 ** step)``. The
        attribute may also be reassigned during training. Whatever its value, a
        sample's first visit sets ``nu`` to the batch estimate (gamma = 1).
    negatives : "all" or int, default "all"
        As in :class:`negbatch.InfoNCE`; ``Zhat_a`` is the mean of
        ``exp(s/tau)`` over the anchor's selected negatives, so K sampled
        negatives still give an unbiased estimate of ``Z_a``.
    form : {"two_view", "query_document"}, default "two_view"
    symmetric : bool, default False
        ``query_document`` only: add the document-to-query direction.
    gather : bool, default False
        Contrast with the embeddings of every rank (as in InfoNCE).
    sync_state : bool, default True
        Under ``torch.distributed``, gather the indices and the batch estimates
        of every rank and apply the same E-step on every rank, so that all
        ranks hold identical state. Every rank must then call ``forward``
        (with ``update=True``) in the same step.
    on_duplicate : {"raise", "mean"}, default "raise"
        A sample index occurring twice in one (global) batch: raise a
        ValueError, or apply one E-step with the mean (in linear space) of the
        duplicates' estimates; the copies then share the updated ``nu`` and are
        each other's negatives unless masked.
    normalize, on_shortage, reduction, check_finite
        As in :class:`negbatch.InfoNCE`.

    State
    -----
    ``log_nu`` (N, R) buffer: ``log nu`` for each sample and anchor role;
    R = 2 for ``two_view`` (the view-1 anchor and the view-2 anchor of a sample
    have different normalisers, since their similarities to the negatives
    differ, so each keeps its own; both are updated on every visit) and for
    symmetric ``query_document`` (query and document directions); R = 1
    otherwise. ``visited`` (N,) bool: whether the sample has had an E-step.
    ``num_updates``: number of E-steps. All three are saved by
    ``state_dict`` and follow ``.to(device)``; ``.double()`` makes ``log_nu``
    float64.

    Forward
    -------
    ``loss(a, b, indices, hard_negatives=None, *, mask=None, generator=None,
    update=True)`` returns the M-step surrogate (reduced as ``reduction``)
    ``-s/tau + Zhat/nu + log nu - 1``, whose value equals the plain minibatch
    loss ``-s/tau + log Zhat`` when ``nu = Zhat`` and whose gradient is the
    augmented loss's gradient with ``nu`` fixed. ``a``, ``b``, ``mask`` and
    ``hard_negatives`` are as in :class:`negbatch.InfoNCE`; ``indices`` (B,)
    int64 are the data-set indices of the batch's samples (row i of ``a``
    and ``b`` is sample ``indices[i]``).

    With ``update=True`` the E-step runs first (once per call: call the loss
    once per optimizer step, as gradient caching does, or pass
    ``update=False`` to the extra calls); the surrogate then uses the updated
    ``nu``. With ``update=False`` the state is left untouched; samples never
    visited use their batch estimate as ``nu``.

    After each call, for logging: ``last_infonce`` (the standard batch
    InfoNCE, positive in the denominator, mean over this rank's anchors) and
    ``last_minibatch_loss`` (the plain estimate ``mean(-s/tau + log Zhat)``),
    both detached scalars.

    Examples
    --------
    >>> import torch
    >>> from negbatch import GlobalInfoNCE
    >>> loss_fn = GlobalInfoNCE(num_samples=100, temperature=0.2, gamma=0.9)
    >>> idx = torch.randperm(100)[:16]
    >>> z1 = torch.randn(16, 8, requires_grad=True)
    >>> z2 = torch.randn(16, 8, requires_grad=True)
    >>> loss = loss_fn(z1, z2, idx)
    >>> loss.backward()
    >>> bool(loss_fn.visited[idx].all()), loss_fn.log_nu.shape
    (True, torch.Size([100, 2]))
    >>> float(loss_fn.last_infonce) > 0
    True
    """

    log_nu: Tensor
    visited: Tensor
    num_updates: Tensor

    def __init__(
        self,
        num_samples: int,
        temperature: float = 0.1,
        gamma: Gamma = 0.9,
        negatives: Negatives = "all",
        *,
        form: Form = "two_view",
        symmetric: bool = False,
        gather: bool = False,
        sync_state: bool = True,
        on_duplicate: OnDuplicate = "raise",
        normalize: bool = True,
        on_shortage: OnShortage = "raise",
        reduction: Reduction = "mean",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int (the data set's size), got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (the data set's size), got {num_samples}")
        self.temperature = check_temperature(temperature)
        if not callable(gamma):
            _check_gamma_value(gamma)
        self.gamma = gamma
        self.negatives = validate_negatives(negatives)
        check_choice(form, "form", ("two_view", "query_document"))
        if symmetric and form != "query_document":
            raise ValueError("symmetric=True applies to form='query_document' only (two_view is already symmetric)")
        check_choice(on_duplicate, "on_duplicate", ("raise", "mean"))
        check_choice(on_shortage, "on_shortage", ("raise", "use_all"))
        check_choice(reduction, "reduction", ("mean", "sum", "none"))
        self.num_samples = num_samples
        self.form = form
        self.symmetric = symmetric
        self.gather = gather
        self.sync_state = sync_state
        self.on_duplicate = on_duplicate
        self.normalize = normalize
        self.on_shortage = on_shortage
        self.reduction = reduction
        self.check_finite = check_finite
        roles = 2 if (form == "two_view" or symmetric) else 1
        self.register_buffer("log_nu", torch.zeros(num_samples, roles))
        self.register_buffer("visited", torch.zeros(num_samples, dtype=torch.bool))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.last_infonce: Tensor | None = None
        self.last_minibatch_loss: Tensor | None = None

    @property
    def num_roles(self) -> int:
        """Columns of ``log_nu``: anchor roles per sample (2 or 1)."""
        return self.log_nu.shape[1]

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, temperature={self.temperature}, gamma={self.gamma!r}, "
            f"negatives={self.negatives!r}, form={self.form!r}, symmetric={self.symmetric}, gather={self.gather}"
        )

    # ------------------------------------------------------------------ state

    def current_gamma(self) -> float:
        """The rate the next E-step will use."""
        if callable(self.gamma):
            return _check_gamma_value(self.gamma(int(self.num_updates)), "gamma(step)")
        return _check_gamma_value(self.gamma)

    def check_indices(
        self, indices: object, batch_size: int | None = None, name: str = "indices", *, check_range: bool = True
    ) -> Tensor:
        """Validate data-set indices (1-d integer tensor, values in [0, N)) and
        return them as int64 on the state's device."""
        if not isinstance(indices, Tensor):
            raise TypeError(f"{name} must be a 1-d torch.long tensor of data-set indices, got {type(indices).__name__}")
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(
                f"{name} must be an integer tensor (torch.long) of data-set indices, got dtype {indices.dtype}"
            )
        if indices.dim() != 1:
            raise ValueError(f"{name} must be 1-d (one data-set index per sample), got shape {tuple(indices.shape)}")
        if batch_size is not None and indices.shape[0] != batch_size:
            raise ValueError(f"{name} has {indices.shape[0]} entries but the batch has {batch_size} samples")
        indices = indices.to(device=self.log_nu.device, dtype=torch.long)
        if check_range and indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.num_samples:
                raise ValueError(
                    f"{name} must lie in [0, num_samples={self.num_samples}), got values in [{low}, {high}]; "
                    f"num_samples must be the size of the data set the indices refer to"
                )
        return indices

    def _check_duplicates(self, indices: Tensor) -> None:
        unique, counts = torch.unique(indices, return_counts=True)
        if unique.shape[0] != indices.shape[0]:
            dup = unique[counts > 1][:5].tolist()
            raise ValueError(
                f"indices contain duplicates within one batch (e.g. {dup}; under DDP: across all ranks); each "
                f"sample may occur once per step. Pass on_duplicate='mean' to average their estimates into one "
                f"E-step."
            )

    @torch.no_grad()
    def e_step(self, indices: Tensor, log_zhat: Tensor) -> None:
        """E-step ``nu <- (1 - gamma) nu + gamma Zhat`` in log space.

        Parameters
        ----------
        indices : Tensor (n,) long
            Data-set indices of the batch (all ranks' batches under DDP).
        log_zhat : Tensor (n, R)
            ``log Zhat`` per sample and anchor role. Samples never visited take
            ``log Zhat`` as is. Duplicated indices follow ``on_duplicate``.
        """
        indices = self.check_indices(indices)
        if log_zhat.shape != (indices.shape[0], self.num_roles):
            raise ValueError(
                f"log_zhat must have shape ({indices.shape[0]}, {self.num_roles}), got {tuple(log_zhat.shape)}"
            )
        log_zhat = log_zhat.to(device=self.log_nu.device, dtype=self.log_nu.dtype)
        if not bool(torch.isfinite(log_zhat).all()):
            raise ValueError("log_zhat contains NaN or inf; the state is left unchanged")
        gamma = self.current_gamma()
        unique, inverse, counts = torch.unique(indices, return_inverse=True, return_counts=True)
        if unique.shape[0] != indices.shape[0]:
            if self.on_duplicate == "raise":
                self._check_duplicates(indices)
            # log of the mean of Zhat over the copies of each sample.
            top = log_zhat.new_full((unique.shape[0], self.num_roles), float("-inf"))
            top = top.scatter_reduce(0, inverse[:, None].expand_as(log_zhat), log_zhat, reduce="amax")
            summed = torch.zeros_like(top).index_add_(0, inverse, torch.exp(log_zhat - top[inverse]))
            log_zhat = summed.log() + top - counts.to(log_zhat.dtype).log()[:, None]
            indices = unique
        old = self.log_nu[indices]
        seen = self.visited[indices][:, None]
        if gamma < 1.0:
            mixed = torch.logaddexp(old + math.log1p(-gamma), log_zhat + math.log(gamma))
            new = torch.where(seen, mixed, log_zhat)
        else:
            new = log_zhat
        self.log_nu[indices] = new
        self.visited[indices] = True
        self.num_updates += 1

    @torch.no_grad()
    def set_log_normalizers(self, log_nu: Tensor) -> None:
        """Set every sample's state to the given ``log nu`` (N, R) and mark all
        samples visited, e.g. with the exact ``log Z`` from
        :func:`negbatch.diagnostics.bias.exact_global_gradient`."""
        if not isinstance(log_nu, Tensor) or tuple(log_nu.shape) != tuple(self.log_nu.shape):
            raise ValueError(f"log_nu must be a tensor of shape {tuple(self.log_nu.shape)}")
        if not bool(torch.isfinite(log_nu).all()):
            raise ValueError("log_nu contains NaN or inf")
        self.log_nu.copy_(log_nu)
        self.visited.fill_(True)

    def reset_state(self) -> None:
        """Forget every sample's estimate (all samples unvisited)."""
        with torch.no_grad():
            self.log_nu.zero_()
            self.visited.fill_(False)
            self.num_updates.zero_()

    # --------------------------------------------------------------- forward

    def _prepare(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(F.normalize(x, dim=-1) for x in xs) if self.normalize else xs

    def _global_rows(self, directions: list[_Direction]) -> int | None:
        """Rows of all ranks (None without gather), for the reduction."""
        if not self.gather:
            return None
        # n_rows_global counts both views' rows in the two-view form.
        return directions[0].kwargs["n_rows_global"] // (2 if self.form == "two_view" else 1)

    def _directions(
        self, a: Tensor, b: Tensor, hard: Tensor | None, mask: Tensor | None, generator
    ) -> list[_Direction]:
        """The anchors and banks of this rank, in the order of the state's columns."""
        common = dict(negatives=self.negatives, generator=generator, on_shortage=self.on_shortage)
        n, d = a.shape
        if self.form == "two_view":
            if hard is not None:
                raise ValueError("hard_negatives applies to form='query_document' only")
            z1, z2 = self._prepare(a, b)
            both, offset = gather_with_grad(torch.cat([z1, z2], 1)) if self.gather else (torch.cat([z1, z2], 1), 0)
            total = both.shape[0]
            check_mask(mask, (n, total), a.device)
            local = torch.arange(n, device=a.device) + offset
            row_index = torch.cat([local, local + total])
            return [
                _Direction(
                    torch.cat([z1, z2]),
                    torch.cat([both[:, :d], both[:, d:]]),
                    torch.cat([local + total, local]),
                    2,
                    self_index=row_index,
                    mask=mask.repeat(2, 2) if mask is not None else None,
                    row_index=row_index,
                    n_rows_global=2 * total,
                    **common,
                )
            ]
        n_hard = 0
        if hard is not None:
            check_embeddings(hard, "hard_negatives", dim=3, check_finite=self.check_finite)
            if hard.shape[0] != n or hard.shape[2] != d:
                raise ValueError(f"hard_negatives must have shape (B, H, d) = ({n}, H, {d}), got {tuple(hard.shape)}")
            if hard.device != a.device or hard.dtype != a.dtype:
                raise ValueError("hard_negatives must be on the device and of the dtype of the queries")
            n_hard = hard.shape[1]
        q, docs = self._prepare(a, b)
        parts = [q, docs]
        if n_hard:
            parts.append(self._prepare(hard)[0].reshape(n, n_hard * d))
        gathered, offset = gather_with_grad(torch.cat(parts, 1)) if self.gather else (torch.cat(parts, 1), 0)
        total = gathered.shape[0]
        bank = gathered[:, d : 2 * d]
        if n_hard:
            bank = torch.cat([bank, gathered[:, 2 * d :].reshape(total * n_hard, d)])
        rows = torch.arange(n, device=a.device) + offset
        check_mask(mask, (n, bank.shape[0]), a.device)
        common.update(row_index=rows, n_rows_global=total)
        out = [_Direction(q, bank, rows, 1, mask=mask, **common)]
        if self.symmetric:
            doc_mask = None
            if mask is not None:
                all_rows = mask if not self.gather else gather_nograd(mask.to(torch.uint8)).bool()
                doc_mask = all_rows[:, :total].t()[offset : offset + n]
            out.append(_Direction(docs, gathered[:, :d], rows, 1, mask=doc_mask, **common))
        return out

    def _terms(self, direction: _Direction) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Positive logit, sum of shifted negative exponentials (with grad), the
        shift and the log of the number of negatives, per anchor."""
        selection = select_negatives(direction.positive_index, direction.bank.shape[0], **direction.kwargs)
        anchors, bank = direction.anchors, direction.bank
        n = anchors.shape[0]
        if not selection.is_dense:
            count = selection.valid.sum(dim=1) - 1
        elif direction.num_excluded is not None:
            count = torch.full((n,), bank.shape[0] - direction.num_excluded, device=anchors.device)
        else:  # the positive and the negatives are the allowed columns
            count = selection.allowed.sum(dim=1, dtype=torch.int32) - 1
        if bool((count == 0).any()):
            raise ValueError(
                "an anchor has no negatives (batch of one sample, or everything masked); the normaliser "
                "Z is a mean over negatives and needs at least one"
            )
        fused = selection.is_dense and anchors.dtype in (torch.float32, torch.float64) and not autocast_active(anchors.device)
        if fused:
            positive, summed, shift = _DenseTerms.apply(
                anchors, bank, selection.allowed, selection.positive_index, self.temperature
            )
        else:
            logits = selection_logits(anchors, bank, selection, self.temperature)
            positive, summed, shift = _PositiveAndNegativeSum.apply(logits, selection.positive_column)
        return positive, summed, shift, count.to(torch.promote_types(summed.dtype, torch.float32)).log()

    def _check_inputs(self, a: Tensor, b: Tensor, indices: Tensor) -> Tensor:
        names = ("view1", "view2") if self.form == "two_view" else ("queries", "documents")
        check_embeddings(a, names[0], check_finite=self.check_finite)
        check_embeddings(b, names[1], check_finite=self.check_finite)
        check_same(a, b, names[0], names[1], dims=(0, 1))
        check_nonempty(a, names[0])
        if a.device != self.log_nu.device:
            raise ValueError(
                f"the embeddings are on {a.device} but the loss's state is on {self.log_nu.device}; "
                f"move the loss with loss.to(device)"
            )
        # The range is checked after gathering (see forward), so that under DDP
        # every rank raises together instead of leaving the others in a collective.
        return self.check_indices(indices, a.shape[0], check_range=False)

    def _global_indices(self, indices: Tensor) -> Tensor:
        """All ranks' indices (when the state is synchronised), checked once for
        every rank so that all ranks raise together."""
        if self.sync_state and is_distributed():
            return gather_nograd(indices)
        return indices

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        indices: Tensor,
        hard_negatives: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        update: bool = True,
    ) -> Tensor:
        indices = self._check_inputs(a, b, indices)
        all_indices = self._global_indices(indices) if update else indices
        self.check_indices(all_indices)
        if update and self.on_duplicate == "raise":
            self._check_duplicates(all_indices)
        directions = self._directions(a, b, hard_negatives, mask, generator)
        terms = [self._terms(direction) for direction in directions]
        n = a.shape[0]
        positive = torch.cat([t[0] for t in terms])
        summed = torch.cat([t[1] for t in terms])
        shift = torch.cat([t[2] for t in terms])
        log_count = torch.cat([t[3] for t in terms])
        # Per-anchor scalars in at least the state's precision (fp16 logits:
        # log nu ~ 1/tau would lose its digits in half precision).
        acc = torch.promote_types(summed.dtype, self.log_nu.dtype)
        shift, log_count = shift.to(acc), log_count.to(acc)
        log_zhat = summed.detach().to(acc).log() + shift - log_count  # (R*n,), role-major
        if update:
            local = log_zhat.view(self.num_roles, n).t()
            all_log_zhat = gather_nograd(local) if (self.sync_state and is_distributed()) else local
            self.e_step(all_indices, all_log_zhat)
            log_nu = self.log_nu[indices].t().reshape(-1).to(acc)
        else:
            state = self.log_nu[indices].t().reshape(-1).to(acc)
            seen = self.visited[indices].repeat(self.num_roles)
            log_nu = torch.where(seen, state, log_zhat)
        # Zhat/nu = summed * exp(shift - log_count - log_nu): the surrogate's
        # gradient is grad(Zhat)/nu, and no exp(s/tau) is ever formed unshifted.
        weight = torch.exp(shift - log_count - log_nu).to(summed.dtype)
        # In the embeddings' dtype, as the other losses (summed may be wider).
        per_anchor = (-positive + summed * weight + (log_nu - 1.0).to(summed.dtype)).to(positive.dtype)
        with torch.no_grad():
            pos = positive.detach().to(acc)
            self.last_minibatch_loss = (-pos + log_zhat).mean()
            self.last_infonce = (-pos + torch.logaddexp(pos, summed.detach().to(acc).log() + shift)).mean()
        return _reduce(per_anchor, self.reduction, a.shape[0], self._global_rows(directions))

    def minibatch_loss(
        self,
        a: Tensor,
        b: Tensor,
        indices: Tensor | None = None,
        hard_negatives: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The plain (biased-gradient) minibatch estimate of the global loss,
        ``-s/tau + log Zhat``, reduced as ``reduction``; the state is neither
        read nor changed. ``indices`` are validated when given.

        Examples
        --------
        >>> import torch
        >>> from negbatch import GlobalInfoNCE
        >>> loss_fn = GlobalInfoNCE(num_samples=10, temperature=0.5)
        >>> z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
        >>> plain = loss_fn.minibatch_loss(z1, z2)
        >>> first = loss_fn(z1, z2, torch.arange(4))  # first visit: nu = Zhat
        >>> bool(torch.allclose(plain, first))
        True
        """
        names = ("view1", "view2") if self.form == "two_view" else ("queries", "documents")
        check_embeddings(a, names[0], check_finite=self.check_finite)
        check_embeddings(b, names[1], check_finite=self.check_finite)
        check_same(a, b, names[0], names[1], dims=(0, 1))
        check_nonempty(a, names[0])
        if indices is not None:
            self.check_indices(indices, a.shape[0])
        parts = []
        directions = self._directions(a, b, hard_negatives, mask, generator)
        for direction in directions:
            positive, summed, shift, log_count = self._terms(direction)
            parts.append((-positive + summed.log() + shift - log_count).to(positive.dtype))
        return _reduce(torch.cat(parts), self.reduction, a.shape[0], self._global_rows(directions))
