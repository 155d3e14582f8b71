"""The candidate-bank layout shared by the losses, against layouts written out
by hand: anchors, banks, positive/self/row indices, masks and row counts for
each form, on one process and gathered over 2 real gloo processes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _dist import run_distributed
from negbatch.losses._layout import anchor_roles, build_layout, check_views

B, H, D = 3, 2, 4
SRC = Path(__file__).resolve().parents[1] / "src" / "negbatch"


def _inputs(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, D, generator=g, dtype=torch.float64)
    hard = torch.randn(n, H, D, generator=g, dtype=torch.float64)
    mask = torch.rand(n, n * (1 + H), generator=g) < 0.3
    return a, b, hard, mask


def _as_tuples(direction):
    """A direction as plain lists, to compare with a hand-built one."""
    optional = lambda t: None if t is None else t.tolist()  # noqa: E731
    return (
        direction.anchors.tolist(), direction.bank.tolist(), direction.positive_index.tolist(),
        optional(direction.self_index), optional(direction.mask), direction.row_index.tolist(),
        direction.n_rows_global,
    )


def test_two_view_both_views_by_hand():
    a, b, _, mask = _inputs()
    mask = mask[:, :B]
    layout = build_layout(a, b, form="two_view", mask=mask, normalize=False)
    assert (layout.n_local, layout.n_global, layout.offset, layout.gathered) == (B, B, 0, False)
    (direction,) = layout.directions
    assert _as_tuples(direction) == (
        torch.cat([a, b]).tolist(), torch.cat([a, b]).tolist(),
        [3, 4, 5, 0, 1, 2], [0, 1, 2, 3, 4, 5],
        [row + row for row in mask.tolist()] + [row + row for row in mask.tolist()],
        [0, 1, 2, 3, 4, 5], 6,
    )
    assert direction.num_excluded is None
    assert build_layout(a, b, form="two_view").directions[0].num_excluded == 2  # itself and the positive


def test_two_view_other_view_by_hand():
    """ReLIC: each view against the other view's bank, no self column, the
    sample-level mask as given, global rows of view 2 after those of view 1."""
    a, b, _, mask = _inputs()
    mask = mask[:, :B]
    first, second = build_layout(a, b, form="two_view", mask=mask, normalize=False, bank="other_view").directions
    assert _as_tuples(first) == (a.tolist(), b.tolist(), [0, 1, 2], None, mask.tolist(), [0, 1, 2], 6)
    assert _as_tuples(second) == (b.tolist(), a.tolist(), [0, 1, 2], None, mask.tolist(), [3, 4, 5], 6)
    assert first.num_excluded is None and build_layout(a, b, form="two_view", bank="other_view").directions[0].num_excluded == 1


def test_query_document_with_hard_negatives_symmetric_by_hand():
    q, d, hard, mask = _inputs()
    layout = build_layout(q, d, hard, form="query_document", symmetric=True, mask=mask, normalize=False)
    to_queries, to_documents = layout.directions
    # Documents 0..B-1, then the hard negatives query-major: (query 0, hard 0), (query 0, hard 1), ...
    bank = d.tolist() + [hard[i, j].tolist() for i in range(B) for j in range(H)]
    assert _as_tuples(to_queries) == (q.tolist(), bank, [0, 1, 2], None, mask.tolist(), [0, 1, 2], 3)
    transposed = [[bool(mask[i, j]) for i in range(B)] for j in range(B)]
    assert _as_tuples(to_documents) == (d.tolist(), q.tolist(), [0, 1, 2], None, transposed, [0, 1, 2], 3)
    assert (layout.n_local, layout.n_global) == (B, B)
    one_way = build_layout(q, d, hard, form="query_document", normalize=False)
    assert len(one_way.directions) == 1 and one_way.directions[0].num_excluded == 1
    # H = 0 hard negatives per query: the documents alone.
    none = build_layout(q, d, hard[:, :0], form="query_document", mask=mask[:, :B], normalize=False).directions[0]
    assert _as_tuples(none) == (q.tolist(), d.tolist(), [0, 1, 2], None, mask[:, :B].tolist(), [0, 1, 2], 3)


def test_normalize_and_roles():
    a, b, hard, _ = _inputs()
    (direction,) = build_layout(a, b, form="two_view").directions
    assert torch.equal(direction.anchors, torch.cat([F.normalize(a, dim=-1), F.normalize(b, dim=-1)]))
    qd = build_layout(a, b, hard, form="query_document").directions[0]
    torch.testing.assert_close(qd.bank[B:], F.normalize(hard, dim=-1).reshape(-1, D), rtol=0, atol=0)
    assert [anchor_roles("two_view", False), anchor_roles("query_document", True),
            anchor_roles("query_document", False)] == [2, 2, 1]


def test_reduce_without_gather():
    a, b, _, _ = _inputs()
    layout = build_layout(a, b, form="two_view")
    values = torch.arange(6.0)
    assert float(layout.reduce(values, "mean")) == 2.5 and float(layout.reduce(values, "sum")) == 15.0
    assert layout.reduce(values, "none") is values


def test_bad_inputs_name_the_argument():
    a, b, hard, mask = _inputs()
    with pytest.raises(ValueError, match="hard_negatives applies to form='query_document' only"):
        build_layout(a, b, hard, form="two_view")
    with pytest.raises(ValueError, match=r"hard_negatives must have shape \(B, H, d\) = \(3, H, 4\)"):
        build_layout(a, b, hard[:2], form="query_document")
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 9\)"):
        build_layout(a, b, hard, form="query_document", mask=mask[:, :3])
    with pytest.raises(ValueError, match="queries and documents must agree"):
        check_views(a, b[:2], "query_document", True)
    with pytest.raises(ValueError, match="view1 is an empty batch"):
        check_views(a[:0], b[:0], "two_view", True)


def _gather_worker(rank, world):
    # 2 rows on rank 0, 3 on rank 1: the offsets and row counts of an uneven split.
    full_a, full_b, full_hard, full_mask = _inputs(5, seed=3)
    lo, hi = (0, 2) if rank == 0 else (2, 5)
    rows = list(range(lo, hi))
    a, b, hard, mask = full_a[lo:hi], full_b[lo:hi], full_hard[lo:hi], full_mask[lo:hi]

    layout = build_layout(a, b, form="two_view", gather=True, mask=mask[:, :5], normalize=False)
    assert (layout.n_local, layout.n_global, layout.offset, layout.gathered) == (hi - lo, 5, lo, True)
    (direction,) = layout.directions
    assert _as_tuples(direction) == (
        torch.cat([a, b]).tolist(), torch.cat([full_a, full_b]).tolist(),
        [r + 5 for r in rows] + rows, rows + [r + 5 for r in rows],
        [m + m for m in mask[:, :5].tolist()] * 2, rows + [r + 5 for r in rows], 10,
    )
    first, second = build_layout(a, b, form="two_view", gather=True, mask=mask[:, :5], normalize=False,
                                 bank="other_view").directions
    assert _as_tuples(first) == (a.tolist(), full_b.tolist(), rows, None, mask[:, :5].tolist(), rows, 10)
    assert _as_tuples(second) == (b.tolist(), full_a.tolist(), rows, None, mask[:, :5].tolist(),
                                  [r + 5 for r in rows], 10)

    layout = build_layout(a, b, hard, form="query_document", symmetric=True, gather=True, mask=mask, normalize=False)
    to_queries, to_documents = layout.directions
    bank = full_b.tolist() + [full_hard[i, j].tolist() for i in range(5) for j in range(H)]
    assert _as_tuples(to_queries) == (a.tolist(), bank, rows, None, mask.tolist(), rows, 5)
    # Document j's mask row is column j of every rank's query mask.
    transposed = [[bool(full_mask[i, j]) for i in range(5)] for j in rows]
    assert _as_tuples(to_documents) == (b.tolist(), full_a.tolist(), rows, None, transposed, rows, 5)

    # "mean" is this rank's share of the global mean: their average is the mean of all 5 rows.
    values = torch.arange(float(lo), float(hi))
    share = layout.reduce(values, "mean")
    assert torch.allclose(share, values.mean() * world * (hi - lo) / 5)


@pytest.mark.distributed
def test_gathered_layout_by_hand_on_two_ranks_of_uneven_size():
    run_distributed(_gather_worker, 2)


def test_losses_and_gradcache_share_no_private_names():
    """The layout is the one place the losses share; GradCache imports no loss."""
    for path in [*(SRC / "losses").glob("*.py"), SRC / "gradcache.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if path.name == "gradcache.py":
                    assert "losses" not in module, f"gradcache.py imports {module}"
                elif module in ("infonce", "relic", "global_nce"):
                    private = [alias.name for alias in node.names if alias.name.startswith("_")]
                    assert not private, f"{path.name} imports {private} from {module}"
