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
from torch import Tensor

from .._checks import (
    Form, Negatives, OnShortage, Reduction, check_choice, check_flag, is_int, is_real, keyword_only,
    refuse_second_order,
)
from ..distributed import gather_nograd, gather_with_sizes, is_distributed, name_ranks, rows_rank
from ..negatives import NegativeSelection, selection_logits
from ._exp import exp_floored_
from ._pair import exp_lower_bound, scaled_logits, shared_directions
from ._softmax import exclude_self
from ._layout import (
    BankLoss,
    Direction,
    Layout,
    Positives,
    anchor_roles,
    check_labels,
    check_views,
    fused_dense,
    row_blocks,
)

OnDuplicate = Literal["raise", "mean"]
Gamma = Union[float, Callable[[int], float]]

__all__ = ["GlobalInfoNCE"]


#: The forms a state may belong to, by the code ``state_form`` saves: the
#: columns of ``log_nu`` are that form's anchor roles.
STATE_FORMS = (("two_view", False), ("query_document", False), ("query_document", True))


def _describe_form(form: tuple[str, bool]) -> str:
    return "form='two_view'" if form[0] == "two_view" else f"form='query_document', symmetric={form[1]}"


def _check_gamma_value(gamma: object, name: str = "gamma") -> float:
    if not is_real(gamma):
        raise TypeError(f"{name} must be a float in (0, 1] (or a callable step -> float), got {type(gamma).__name__}")
    if not (0.0 < float(gamma) <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {gamma}")
    return float(gamma)


def _refuse_failed_ranks(all_log_zhat: Tensor, sizes: list[int]) -> None:
    """Refuse, on every rank alike, the estimates of the ranks that sent NaN
    or inf (a rank whose batch was refused sends NaN), naming them."""
    if len(sizes) < 2 or bool(torch.isfinite(all_log_zhat).all()):
        return
    bad = ~torch.isfinite(all_log_zhat).all(dim=1).cpu()
    ranks = rows_rank(sizes)[bad].unique().tolist()
    raise ValueError(
        f"the batch estimates (log Zhat) of {name_ranks(ranks)} hold NaN or inf; the state is left unchanged on "
        "every rank (a rank whose batch failed sends NaN: see that rank's error; with check_finite=False, NaN "
        "embeddings give NaN estimates)"
    )


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
        exp_floored_(work.sub_(shift[:, None]))  # the positive and the non-candidates (-inf) become 0
        # Summed in at least float32: in half precision a row of more than 65504
        # negatives (each term <= 1) would overflow to inf.
        summed = work.sum(dim=1, dtype=torch.promote_types(work.dtype, torch.float32))
        ctx.save_for_backward(work, col)
        ctx.mark_non_differentiable(shift)
        return positive, summed, shift

    @staticmethod
    def backward(ctx, grad_positive: Tensor, grad_summed: Tensor, _grad_shift: Tensor):  # type: ignore[override]
        refuse_second_order(ctx)
        work, col = ctx.saved_tensors
        grad = (work * grad_summed[:, None]).to(work.dtype)
        grad.scatter_add_(1, col, grad_positive[:, None].to(work.dtype))
        return grad, None


def _negative_sums_(work: Tensor, selection: NegativeSelection, lowest: float | None):
    """Turn the logits ``work`` (n, m) of one direction, in place, into
    ``exp(l - shift)`` on the negatives (zero elsewhere); ``work`` may be a
    transposed view (:class:`~._pair.PairOfDirections`). Returns
    ``(positive, summed, shift)`` and the positives' columns."""
    col = selection.positive_index[:, None]
    positive = work.gather(1, col).squeeze(1)
    shift = work.new_empty(work.shape[0])
    summed = work.new_empty(work.shape[0])
    if selection.only_self_excluded:
        # Only the anchor's own column (two views) leaves the candidates: fill those entries
        # and the positive's instead of scanning an (n, m) mask (about a sixth of the call
        # at B = 1024, bench/bench_global_nce.py).
        exclude_self(work, selection.self_index)
        work.scatter_(1, col, float("-inf"))  # the positive is not a negative
    for rows in row_blocks(*work.shape):
        block = work[rows]
        if not selection.only_self_excluded:
            block.masked_fill_(~selection.allowed[rows], float("-inf"))
            block.scatter_(1, col[rows], float("-inf"))  # the positive is not a negative
        shift[rows] = block.amax(dim=1)
        exp_floored_(block.sub_(shift[rows, None]), lowest)  # the -inf entries become 0
        summed[rows] = block.sum(dim=1)
    return (positive, summed, shift), col


def _scores_gradient_(work: Tensor, col: Tensor, grad_positive: Tensor, grad_summed: Tensor, inv_tau: float) -> None:
    """Turn a buffer of :func:`_negative_sums_`, in place, into ``dL/dscores``."""
    work.mul_((grad_summed * inv_tau)[:, None])  # d score / d logit, folded into the per-row factors
    work.scatter_(1, col, (grad_positive * inv_tau)[:, None])  # the positive's entry was zero


class _TermsKernel:
    """:func:`_negative_sums_` as a kernel of :class:`~._pair.PairOfDirections`."""

    non_differentiable = (2,)  # the shift

    @staticmethod
    def forward_(work: Tensor, selection: NegativeSelection, lowest: float | None, extra: None):
        outputs, col = _negative_sums_(work, selection, lowest)
        return outputs, (col,)

    @staticmethod
    def backward_(work: Tensor, kept, grads, inv_tau: float) -> None:
        _scores_gradient_(work, kept[0], grads[0], grads[1], inv_tau)


class _DenseTerms(torch.autograd.Function):
    """:class:`_PositiveAndNegativeSum` over *all* candidates, straight from the
    embeddings, holding one (n, m) buffer.

    The logits are computed once; the buffer then holds ``exp(l - shift)`` on
    the negatives (zero elsewhere) and the backward turns it, in place, into
    ``dL/dscores`` before the two products with the embeddings. It runs once
    (a second backward raises).
    """

    @staticmethod
    def forward(ctx, anchors, bank, selection, temperature):  # type: ignore[override]
        work = scaled_logits(anchors, bank, temperature)
        (positive, summed, shift), col = _negative_sums_(work, selection,
                                                         exp_lower_bound(anchors, bank, temperature))
        ctx.save_for_backward(anchors, bank, col, work)
        ctx.temperature = temperature
        ctx.consumed = False
        ctx.mark_non_differentiable(shift)
        return positive, summed, shift

    @staticmethod
    def backward(ctx, grad_positive, grad_summed, _grad_shift):  # type: ignore[override]
        refuse_second_order(ctx)
        if ctx.consumed:
            raise RuntimeError("GlobalInfoNCE's dense backward runs once; do not backward twice through it")
        ctx.consumed = True
        anchors, bank, col, work = ctx.saved_tensors
        _scores_gradient_(work, col, grad_positive, grad_summed, 1.0 / ctx.temperature)
        grad_anchors = work @ bank if ctx.needs_input_grad[0] else None
        grad_bank = work.t() @ anchors if ctx.needs_input_grad[1] else None
        return grad_anchors, grad_bank, None, None


class GlobalInfoNCE(BankLoss):
    """Global contrastive loss with one running normaliser per sample (stochastic EM).

    **A call returns the M-step surrogate, not the loss.** Train with it (its
    gradient is the unbiased one), but do not report it as the loss: its value
    depends on the state ``nu`` and is often negative (-3 or -6 are ordinary).
    The values to report are kept beside it after every call (see Attributes):
    ``last_infonce``, the standard InfoNCE of the batch (>= 0, comparable with
    :class:`negbatch.InfoNCE`), and ``last_minibatch_loss``, the batch estimate
    of the global loss this class minimises (negative too once positives are
    closer than negatives: its normaliser leaves the positive out).

    ``num_samples`` may be given by position; every other argument is
    keyword-only (``GlobalInfoNCE(N, temperature=0.1, negatives=16)``).

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
        A sample index occurring twice in one (global) batch of an update:
        raise a ValueError, or apply one E-step with the mean (in linear space) of the
        duplicates' estimates; the copies then share the updated ``nu`` and are
        each other's negatives unless masked.
    normalize, on_shortage, reduction, check_finite
        As in :class:`negbatch.InfoNCE`.
    learnable_temperature, positives, filter_margin, filter_top
        As in :class:`negbatch.InfoNCE`. With ``positives="mask"`` the positive
        term is the mean logit over the anchor's positives and ``Z`` the mean
        over its negatives (the positives leave it). A learnable temperature
        changes ``Z``; the state follows it through the E-steps.

    State
    -----
    ``log_nu`` (N, R) buffer: ``log nu`` for each sample and anchor role;
    R = 2 for ``two_view`` (the view-1 anchor and the view-2 anchor of a sample
    have different normalisers, since their similarities to the negatives
    differ, so each keeps its own; both are updated on every visit) and for
    symmetric ``query_document`` (query and document directions); R = 1
    otherwise. ``visited`` (N,) bool: whether the sample has had an E-step.
    ``num_updates``: number of E-steps. ``state_form``: the form the state
    belongs to (0 ``two_view``, 1 ``query_document``, 2 symmetric
    ``query_document``), so that ``load_state_dict`` refuses a state of
    another form, whose columns would otherwise load silently into as many
    columns of other roles (two-view and symmetric query-document both have
    R = 2). All are saved by ``state_dict`` and follow ``.to(device)``;
    ``.double()`` makes ``log_nu`` float64.

    Forward
    -------
    ``loss(a, b, indices, hard_negatives=None, *, mask=None, generator=None,
    update=True)`` returns the M-step surrogate (reduced as ``reduction``)
    ``-s/tau + Zhat/nu + log nu - 1``, whose value equals the plain minibatch
    loss ``-s/tau + log Zhat`` when ``nu = Zhat`` and whose gradient is the
    augmented loss's gradient with ``nu`` fixed. ``a``, ``b``, ``mask`` and
    ``hard_negatives`` are as in :class:`negbatch.InfoNCE` (so are the
    keywords ``labels`` and ``guide``); ``indices`` (B,) int64 are the
    data-set indices of the batch's samples (row i of ``a`` and ``b`` is
    sample ``indices[i]``).

    With ``update=True`` the E-step runs first (once per call: call the loss
    once per optimizer step, as gradient caching does, or pass
    ``update=False`` to the extra calls); the surrogate then uses the updated
    ``nu``. With ``update=False`` the state is left untouched; samples never
    visited use their batch estimate as ``nu``.

    Attributes
    ----------
    last_infonce : Tensor or None
        After each call: the standard InfoNCE of the batch (positive in the
        denominator, mean over this rank's anchors), >= 0. The value to log
        and to compare with :class:`negbatch.InfoNCE`.
    last_minibatch_loss : Tensor or None
        After each call: the plain batch estimate of the global loss,
        ``mean(-s/tau + log Zhat)``, equal to the surrogate on a first visit
        (``nu = Zhat``) and below it otherwise.
    log_nu, visited, num_updates : Tensor
        The state (see State). Both ``last_*`` values are detached scalars,
        None before the first call.

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

    With well-aligned views, the surrogate (and the global loss) are negative;
    the batch InfoNCE is the value to report:

    >>> _ = torch.manual_seed(0)
    >>> z = torch.randn(16, 8)
    >>> loss_fn = GlobalInfoNCE(100, temperature=0.1)
    >>> surrogate = loss_fn(z, z + 0.1 * torch.randn(16, 8), torch.arange(16))
    >>> bool(surrogate < 0), bool(loss_fn.last_minibatch_loss < 0), bool(loss_fn.last_infonce > 0)
    (True, True, True)
    """

    log_nu: Tensor
    visited: Tensor
    num_updates: Tensor
    needs_a_negative = "the normaliser Z is a mean over negatives and needs at least one"

    @keyword_only("GlobalInfoNCE(50000, temperature=0.1, negatives=16)", positional=1)
    def __init__(
        self,
        num_samples: int,
        *,
        temperature: float = 0.1,
        gamma: Gamma = 0.9,
        negatives: Negatives = "all",
        form: Form = "two_view",
        symmetric: bool = False,
        gather: bool = False,
        sync_state: bool = True,
        on_duplicate: OnDuplicate = "raise",
        normalize: bool = True,
        on_shortage: OnShortage = "raise",
        reduction: Reduction = "mean",
        check_finite: bool = True,
        learnable_temperature: bool = False,
        positives: Positives = "pair",
        filter_margin: float | None = None,
        filter_top: float | None = None,
    ) -> None:
        """Set up the loss and its state. ``num_samples`` may be given by
        position, every other argument is keyword-only; see Parameters in
        ``help(GlobalInfoNCE)``."""
        super().__init__()
        if not is_int(num_samples):
            raise TypeError(f"num_samples must be an int (the data set's size), got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (the data set's size), got {num_samples}")
        num_samples = int(num_samples)
        if not callable(gamma):
            gamma = _check_gamma_value(gamma)
        self._set_options(
            temperature=temperature, negatives=negatives, form=form, symmetric=symmetric, gather=gather,
            normalize=normalize, on_shortage=on_shortage, reduction=reduction, check_finite=check_finite,
            learnable_temperature=learnable_temperature, positives=positives, filter_margin=filter_margin,
            filter_top=filter_top,
        )
        check_choice(on_duplicate, "on_duplicate", ("raise", "mean"))
        self.gamma = gamma
        self.num_samples = num_samples
        self.sync_state = check_flag(sync_state, "sync_state")
        self.on_duplicate = on_duplicate
        self.register_buffer("log_nu", torch.zeros(num_samples, anchor_roles(form, symmetric)))
        self.register_buffer("visited", torch.zeros(num_samples, dtype=torch.bool))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("state_form", torch.tensor(STATE_FORMS.index((form, symmetric))))
        self.last_infonce: Tensor | None = None
        self.last_minibatch_loss: Tensor | None = None

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # .half()/.to(bfloat16) of a module holding the loss would move the state to half
        # precision, where the E-step's increments fall below the resolution of log nu
        # (about 20-30 at small temperatures) and nu stalls; it stays float32 at least.
        kept = self.log_nu
        out = super()._apply(fn, recurse)
        if self.log_nu.dtype in (torch.float16, torch.bfloat16):
            self.log_nu = kept.to(device=self.log_nu.device, dtype=torch.promote_types(kept.dtype, torch.float32))
        return out

    @property
    def num_roles(self) -> int:
        """Columns of ``log_nu``: anchor roles per sample (2 or 1)."""
        return self.log_nu.shape[1]

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, temperature={self.temperature}, gamma={self.gamma!r}, "
            f"negatives={self.negatives!r}, form={self.form!r}, symmetric={self.symmetric}, gather={self.gather}"
            f"{self._option_repr()}"
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
        if not isinstance(log_zhat, Tensor) or not log_zhat.is_floating_point():
            what = f"dtype {log_zhat.dtype}" if isinstance(log_zhat, Tensor) else type(log_zhat).__name__
            raise TypeError(
                f"log_zhat must be a floating-point tensor of shape ({indices.shape[0]}, {self.num_roles}) "
                f"(log Zhat per sample and anchor role), got {what}"
            )
        if log_zhat.shape != (indices.shape[0], self.num_roles):
            raise ValueError(
                f"log_zhat must have shape ({indices.shape[0]}, {self.num_roles}), got {tuple(log_zhat.shape)}"
            )
        log_zhat = log_zhat.to(device=self.log_nu.device, dtype=self.log_nu.dtype)
        if not bool(torch.isfinite(log_zhat).all()):
            raise ValueError(
                "log_zhat contains NaN or inf; the state is left unchanged (under DDP a rank whose batch "
                "failed sends NaN: see that rank's error)"
            )
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

    def _refusal(self, state_dict, prefix: str) -> str:
        """Why a saved state is refused (empty: it is not; see :meth:`BankLoss.load_state_dict`)."""
        foreign = self._foreign_form(state_dict, prefix)
        if foreign:
            return foreign
        # A checkpoint of a run whose state diverged would otherwise pass its
        # NaN on to every later loss of those samples, as set_log_normalizers
        # refuses it for.
        saved = state_dict.get(prefix + "log_nu")
        if isinstance(saved, Tensor) and not bool(torch.isfinite(saved).all()):
            return (
                f"{prefix}log_nu: the checkpoint's per-sample state holds NaN or inf (the run it comes from "
                "diverged); load an earlier checkpoint, or drop its 'log_nu' and 'visited' entries and load the rest with "
                "strict=False (every sample then starts unvisited)"
            )
        return ""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        # Reached directly when the loss is a part of a larger module being loaded.
        refused = self._refusal(state_dict, prefix)
        if refused:
            error_msgs.append(refused)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "state_form" not in state_dict and prefix + "state_form" in missing_keys:
            missing_keys.remove(prefix + "state_form")  # saved before the form was: judged by log_nu's columns

    def _foreign_form(self, state_dict, prefix: str) -> str:
        """Why a saved state of another form is refused (empty: it is not):
        by its ``state_form``, or, saved without one, by the columns of its
        ``log_nu`` (which cannot tell two-view from symmetric query-document)."""
        mine = STATE_FORMS[int(self.state_form)]
        saved, log_nu = state_dict.get(prefix + "state_form"), state_dict.get(prefix + "log_nu")
        if isinstance(saved, Tensor) and saved.numel() == 1 and 0 <= int(saved) < len(STATE_FORMS):
            theirs = [STATE_FORMS[int(saved)]]
        elif isinstance(log_nu, Tensor) and log_nu.dim() == 2:
            theirs = [form for form in STATE_FORMS if anchor_roles(*form) == log_nu.shape[1]]
        else:
            return ""
        if not theirs or mine in theirs:
            return ""
        return (
            f"{prefix}log_nu: the checkpoint's state belongs to a GlobalInfoNCE with "
            f"{' or '.join(_describe_form(form) for form in theirs)}, this one has {_describe_form(mine)}: its "
            "columns are the normalisers of another form's anchor roles; build the loss with "
            f"{_describe_form(theirs[0])} to load it"
        )

    def reset_state(self) -> None:
        """Forget every sample's estimate (all samples unvisited)."""
        with torch.no_grad():
            self.log_nu.zero_()
            self.visited.fill_(False)
            self.num_updates.zero_()

    # --------------------------------------------------------------- forward

    def _layout_terms(self, layout: Layout, generator, temperature: float) -> list[tuple[Tensor, ...]]:
        """:meth:`_terms` of every direction; a symmetric query-document call
        of one process computes both directions' dense terms from one
        product (:class:`~._pair.PairOfDirections`)."""
        chosen = [self._selected(direction, generator, layout) for direction in layout.directions]
        selections = [selection for selection, _ in chosen]
        out = shared_directions(layout, self.form, self.symmetric, selections, temperature, _TermsKernel,
                                takes=lambda s: s.single_positive)
        dense = [None] * len(chosen) if out is None else [out[:3], out[3:]]
        return [self._terms(direction, selection, count, temperature, terms)
                for direction, (selection, count), terms in zip(layout.directions, chosen, dense)]

    def _selected(self, direction: Direction, generator, layout: Layout) -> tuple[NegativeSelection, Tensor]:
        """The direction's selection and each anchor's number of negatives;
        an anchor without a negative is refused."""
        selection = self._negatives_of(direction, generator, layout)
        anchors, bank = direction.anchors, direction.bank
        n = anchors.shape[0]
        if not selection.is_dense:
            count = selection.valid[:, selection.num_positive_slots :].sum(dim=1)
        elif direction.num_excluded is not None:
            count = torch.full((n,), bank.shape[0] - direction.num_excluded, device=anchors.device)
        elif selection.single_positive:  # the positive and the negatives are the allowed columns
            count = selection.allowed.sum(dim=1, dtype=torch.int32) - 1
        else:
            count = selection.negative_mask().sum(dim=1, dtype=torch.int32)
        if bool((count == 0).any()):
            raise self._no_negatives_error()
        return selection, count

    def _terms(
        self, direction: Direction, selection: NegativeSelection, count: Tensor, temperature: float,
        dense: tuple[Tensor, ...] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Positive logit (the mean over several positives), sum of shifted
        negative exponentials (with grad), the shift, the log of the number
        of negatives, and the log-sum-exp of the positives (detached; for the
        logged InfoNCE, SupCon's L_out with several), per anchor. ``dense``:
        the first three, computed with the other direction's."""
        anchors, bank = direction.anchors, direction.bank
        if not selection.single_positive:
            logits = selection_logits(anchors, bank, selection, temperature)
            slots = selection.positive_slots()
            positive = logits.masked_fill(~slots, 0.0).sum(dim=1) / slots.sum(dim=1)
            positives_lse = logits.detach().masked_fill(~slots, float("-inf")).logsumexp(dim=1)
            negative = logits.masked_fill(slots, float("-inf"))
            shift = negative.detach().amax(dim=1)
            acc = torch.promote_types(negative.dtype, torch.float32)
            summed = torch.exp(negative - shift[:, None]).sum(dim=1, dtype=acc)
        elif dense is not None:
            positive, summed, shift = dense
        elif fused_dense(selection, anchors):
            positive, summed, shift = _DenseTerms.apply(anchors, bank, selection, temperature)
        else:
            logits = selection_logits(anchors, bank, selection, temperature)
            positive, summed, shift = _PositiveAndNegativeSum.apply(logits, selection.positive_column)
        if selection.single_positive:
            positives_lse = positive.detach()
        return positive, summed, shift, count.to(torch.promote_types(summed.dtype, torch.float32)).log(), positives_lse

    def _prepared(
        self, a: Tensor, b: Tensor, hard_negatives: Tensor | None, mask: Tensor | None, labels: Tensor | None,
        guide: tuple[Tensor, ...] | None,
    ) -> tuple[Layout, float]:
        """The layout with labels and the filter applied, and the temperature of the kernels."""
        labels = check_labels(labels, a.shape[0], a.device)
        layout = self._layout(a, b, hard_negatives, mask, labels=labels)
        self._filter(layout, guide)
        return layout, self._temperature(layout)

    def _check_inputs(self, a: Tensor, b: Tensor, indices: Tensor, check_finite: bool = True) -> Tensor:
        check_views(a, b, self.form, self.check_finite and check_finite, self._own_scalars(), deferred=self.gather)
        if a.device != self.log_nu.device:
            raise ValueError(
                f"the embeddings are on {a.device} but the loss's state is on {self.log_nu.device}; "
                f"move the loss with loss.to(device)"
            )
        # The range is checked after gathering (see forward), so that under DDP
        # every rank raises together instead of leaving the others in a collective.
        return self.check_indices(indices, a.shape[0], check_range=False)

    def _global_indices(self, indices: Tensor) -> tuple[Tensor, list[int]]:
        """All ranks' indices (when the state is synchronised), checked once for
        every rank so that all ranks raise together, and every rank's number of
        rows."""
        if self.sync_state and is_distributed():
            return gather_with_sizes(indices)  # no gradient: an integer tensor
        return indices, [indices.shape[0]]

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        indices: Tensor,
        hard_negatives: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        guide: tuple[Tensor, ...] | None = None,
        generator: torch.Generator | None = None,
        update: bool = True,
    ) -> Tensor:
        check_flag(update, "update")  # update="no" would count as True and run the E-step
        sends = update and self.sync_state and is_distributed()
        # Without gather, the gathers of the indices and of the estimates are the only
        # collectives: a rank that refuses its batch (NaN, a mask that leaves an anchor no
        # negative) does so after sending its indices, and sends NaN for its estimates
        # (below). With gather, every rank checks every rank's rows in the layout.
        alone = not self.gather
        finite_later = sends and alone
        indices = self._check_inputs(a, b, indices, check_finite=not finite_later)
        all_indices, sizes = self._global_indices(indices) if update else (indices, [indices.shape[0]])
        self.check_indices(all_indices)
        if update and self.on_duplicate == "raise":
            self._check_duplicates(all_indices)
        if not alone:
            layout, temperature = self._prepared(a, b, hard_negatives, mask, labels, guide)
        n = a.shape[0]
        try:
            if finite_later:
                self._check_views(a, b)
            if alone:
                layout, temperature = self._prepared(a, b, hard_negatives, mask, labels, guide)
            terms = self._layout_terms(layout, generator, temperature)
        except ValueError:
            if sends:
                # The other ranks are about to gather this rank's estimates: send NaN, so
                # that their E-step raises too instead of waiting for this rank forever.
                dtype = torch.promote_types(a.dtype, self.log_nu.dtype)
                gather_nograd(torch.full((n, self.num_roles), float("nan"), dtype=dtype, device=a.device))
            raise
        positive = torch.cat([t[0] for t in terms])
        summed = torch.cat([t[1] for t in terms])
        shift = torch.cat([t[2] for t in terms])
        log_count = torch.cat([t[3] for t in terms])
        positives_lse = torch.cat([t[4] for t in terms])
        # Per-anchor scalars in at least the state's precision (fp16 logits:
        # log nu ~ 1/tau would lose its digits in half precision).
        acc = torch.promote_types(summed.dtype, self.log_nu.dtype)
        shift, log_count = shift.to(acc), log_count.to(acc)
        log_zhat = summed.detach().to(acc).log() + shift - log_count  # (R*n,), role-major
        if update:
            local = log_zhat.view(self.num_roles, n).t()
            all_log_zhat = gather_nograd(local) if (self.sync_state and is_distributed()) else local
            _refuse_failed_ranks(all_log_zhat, sizes)
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
            # InfoNCE's value: -l_p + lse(positive(s) and negatives), averaged over the positives
            # (SupCon's L_out with several: the mean positive logit against all of their exponentials).
            lse_all = torch.logaddexp(positives_lse.to(acc), summed.detach().to(acc).log() + shift)
            self.last_infonce = (-pos + lse_all).mean()
        return layout.reduce(per_anchor, self.reduction)

    def minibatch_loss(
        self,
        a: Tensor,
        b: Tensor,
        indices: Tensor | None = None,
        hard_negatives: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        guide: tuple[Tensor, ...] | None = None,
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
        self._check_views(a, b)
        if indices is not None:
            self.check_indices(indices, a.shape[0])
        layout, temperature = self._prepared(a, b, hard_negatives, mask, labels, guide)
        parts = []
        for positive, summed, shift, log_count, _ in self._layout_terms(layout, generator, temperature):
            parts.append((-positive + summed.log() + shift - log_count).to(positive.dtype))
        return layout.reduce(torch.cat(parts), self.reduction)
