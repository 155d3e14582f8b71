"""The two directions of a symmetric query-document batch from one product.

In one process, the document-to-query logits are the query-to-document
logits transposed (the documents' block of them). Computed direction by
direction, as the layout lays them out, a fused kernel runs one product for
each direction's forward and two for its backward: 6 products of n x m x d
where 3 suffice. :class:`PairOfDirections` runs the one product
``queries @ bank.T`` (the documents first, then any hard negatives or queued
documents), copies the documents' n x n block for the column direction (the
buffer that direction would hold anyway) and hands each direction's buffer
to the loss's own in-place kernel, the column direction as a transposed
view, so that the kernel's rows are the documents. The backward adds the
column direction's gradient into the block and runs the two products once.

A kernel is an object with two methods:

* ``forward_(buf, selection, lowest, extra) -> (outputs, kept)``: turn the
  logits ``buf`` (rows: anchors) in place into what its backward reads;
  ``outputs`` a tuple of per-anchor tensors, ``kept`` a tuple of tensors (or
  None) for the backward; ``lowest`` the bound of :func:`exp_lower_bound`;
  ``extra`` a further input of the loss or None (SigLIP's bias);
* ``backward_(buf, kept, grads, inv_tau) -> Tensor | None``: turn ``buf`` in
  place into ``d loss / d scores`` from the outputs' gradients ``grads``;
  returns this direction's gradient of ``extra`` (None without one);

and an attribute ``non_differentiable``, the positions of the outputs that
carry no gradient (a shift).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import refuse_second_order
from ..distributed import world_size
from ._layout import fused_dense


def scaled_logits(anchors: Tensor, bank: Tensor, temperature: float) -> Tensor:
    """``anchors @ bank.T / temperature`` with the scale applied by the GEMM."""
    if temperature == 1.0:
        return anchors @ bank.t()
    out = anchors.new_empty(anchors.shape[0], bank.shape[0])
    return torch.addmm(out, anchors, bank.t(), beta=0.0, alpha=1.0 / temperature, out=out)


def exp_lower_bound(anchors: Tensor, bank: Tensor, temperature: float) -> float | None:
    """A bound under exp's arguments ``l - max`` of the logits ``anchors @ bank.T / tau``:
    whether they can reach the floor (_exp.py; CPU only, None elsewhere)."""
    if anchors.device.type != "cpu" or not anchors.shape[0] or not bank.shape[0]:
        return None
    return -2.0 * float(anchors.norm(dim=1).max() * bank.norm(dim=1).max()) / temperature


def shares_one_product(layout, form: str, symmetric: bool) -> bool:
    """Whether ``layout``'s second direction's logits are its first's
    transposed: a symmetric query-document layout of one process (with
    gather, the ranks' blocks differ) whose documents' bank holds the
    queries alone (not queued ones)."""
    if form != "query_document" or not symmetric or (layout.gathered and world_size() > 1):
        return False
    queries, documents = layout.directions
    return documents.bank.shape[0] == layout.n_local <= queries.bank.shape[0]


def shared_directions(layout, form: str, symmetric: bool, selections: list, temperature: float, kernel,
                      extra: Tensor | None = None, takes=None) -> tuple[Tensor, ...] | None:
    """Both directions' outputs of ``kernel`` from one product (:class:`PairOfDirections`: the
    queries' outputs, then the documents'), or None where the directions must run one by one:
    the layout does not share its product (:func:`shares_one_product`), or a selection is not
    on the fused all-candidates path or is not one the loss ``takes`` (a predicate)."""
    if not shares_one_product(layout, form, symmetric):
        return None
    queries = layout.directions[0]
    if not all(fused_dense(s, queries.anchors) and (takes is None or takes(s)) for s in selections):
        return None
    return PairOfDirections.apply(queries.anchors, queries.bank, extra, *selections, temperature, kernel)


class PairOfDirections(torch.autograd.Function):
    """Both directions' outputs of ``kernel`` (see the module docstring):
    ``apply(queries, bank, extra, query_selection, document_selection, temperature, kernel)``
    returns the queries' outputs, then the documents'. The backward runs once."""

    @staticmethod
    def forward(ctx, queries, bank, extra, query_selection, document_selection, temperature, kernel):  # type: ignore[override]
        buf = scaled_logits(queries, bank, temperature)
        columns = buf[:, : queries.shape[0]].clone()
        lowest = exp_lower_bound(queries, bank, temperature)
        rows_out, rows_kept = kernel.forward_(buf, query_selection, lowest, extra)
        columns_out, columns_kept = kernel.forward_(columns.t(), document_selection, lowest, extra)
        ctx.save_for_backward(queries, bank, buf, columns, *rows_kept, *columns_kept)
        ctx.temperature, ctx.kernel, ctx.kept = temperature, kernel, len(rows_kept)
        ctx.extra = None if extra is None else (extra.dtype, extra.shape)
        ctx.consumed = False
        outputs = (*rows_out, *columns_out)
        ctx.mark_non_differentiable(*(outputs[start + j] for start in (0, len(rows_out)) for j in kernel.non_differentiable))
        return outputs

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        refuse_second_order(ctx)
        if ctx.consumed:
            raise RuntimeError("a symmetric loss's dense backward runs once; do not backward twice through the loss")
        ctx.consumed = True
        queries, bank, buf, columns, *kept = ctx.saved_tensors
        inv_tau, half = 1.0 / ctx.temperature, len(grads) // 2
        rows_extra = ctx.kernel.backward_(buf, kept[: ctx.kept], grads[:half], inv_tau)
        columns_extra = ctx.kernel.backward_(columns.t(), kept[ctx.kept :], grads[half:], inv_tau)
        grad_extra = None
        if ctx.extra is not None and ctx.needs_input_grad[2]:
            dtype, shape = ctx.extra
            grad_extra = (rows_extra + columns_extra).to(dtype).reshape(shape)
        buf[:, : columns.shape[1]] += columns
        grad_queries = buf @ bank if ctx.needs_input_grad[0] else None
        grad_bank = buf.t() @ queries if ctx.needs_input_grad[1] else None
        return grad_queries, grad_bank, grad_extra, None, None, None, None
