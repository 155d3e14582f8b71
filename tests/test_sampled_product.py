"""The sampled logits' product in each of its ways against the per-anchor loops.

``_SampledDot`` computes ``<anchors[i], bank[index[i, k]]>`` either by sparse
products (SDDMM forward, CSR products backward) or by one dense product read
at the entries; which one runs depends on the sizes (``sparse_pays``), so the
reference tests' small batches would see one way only. Here each way is forced.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _reference as ref
import negbatch.negatives as negatives_module
from negbatch import InfoNCE, select_negatives

TAU = 0.3


@pytest.fixture(params=["sparse", "dense"])
def product_way(request, monkeypatch):
    monkeypatch.setattr(negatives_module, "sparse_pays", lambda num_columns, slots: request.param == "sparse")
    return request.param


def _grads(value, inputs):
    return torch.autograd.grad(value, inputs)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_two_view_sampled_logits_each_way(product_way, k):
    g = torch.Generator().manual_seed(k)
    n = 9
    z1, z2 = (torch.randn(n, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    loss = InfoNCE(temperature=TAU, negatives=k)
    # Past the plain call's size, so the layout (and _SampledDot) computes it.
    value = loss(z1, z2, mask=torch.zeros(n, n, dtype=torch.bool), generator=torch.Generator().manual_seed(3))
    rows = torch.arange(2 * n)
    sel = select_negatives(rows.roll(n), 2 * n, k, self_index=rows, generator=torch.Generator().manual_seed(3),
                           row_index=rows, n_rows_global=2 * n)
    want = ref.infonce_two_view(z1, z2, TAU, neg_sets=sel.index[:, 1:].tolist())
    torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
    for got, expected in zip(_grads(value, [z1, z2]), _grads(want, [z1, z2])):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


def test_query_document_sampled_logits_with_hard_negatives_each_way(product_way):
    g = torch.Generator().manual_seed(0)
    n, h, k = 8, 3, 6
    q, d = (torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    hard = torch.randn(n, h, 5, generator=g, dtype=torch.float64, requires_grad=True)
    value = InfoNCE(temperature=TAU, negatives=k, form="query_document")(q, d, hard,
                                                                        generator=torch.Generator().manual_seed(4))
    rows = torch.arange(n)
    sel = select_negatives(rows, n * (1 + h), k, generator=torch.Generator().manual_seed(4), row_index=rows,
                           n_rows_global=n)
    want = ref.infonce_query_document(q, d, TAU, hard=hard, neg_sets=sel.index[:, 1:].tolist())
    torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
    for got, expected in zip(_grads(value, [q, d, hard]), _grads(want, [q, d, hard])):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("num_columns", [40, 1 << 15, (1 << 15) + 7, 1 << 16, (1 << 16) + 3])
def test_transposed_csr_is_the_transpose(num_columns):
    # Each way of building it: numpy's 16-bit radix sort (signed keys, unsigned past 2**15) and torch's sort.
    rng = np.random.default_rng(num_columns)
    n, k = 30, 7
    index = torch.from_numpy(np.stack([rng.choice(num_columns, k, replace=False) for _ in range(n)]))
    index[0, 0] = num_columns - 1  # the last column is reached
    values = torch.randn(n, k, dtype=torch.float64)
    dense = torch.zeros(n, num_columns, dtype=torch.float64).scatter_(1, index, values)
    got = negatives_module._csr_transposed(index, values, num_columns)
    assert got.shape == (num_columns, n)
    torch.testing.assert_close(got.to_dense(), dense.t(), rtol=0, atol=0)
    # Within a transposed row the original rows ascend (a stable sort): the same on every path.
    crow, col = got.crow_indices(), got.col_indices()
    for c in torch.unique(index).tolist():
        rows = col[crow[c]: crow[c + 1]]
        assert torch.equal(rows, rows.sort().values)
