"""Properties of the negative selection: validity, uniformity, reproducibility, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from negbatch import InfoNCE, ReLIC, select_negatives
import negbatch.negatives as negatives_module
from negbatch.negatives import sample_uniform_ranks


@st.composite
def problems(draw):
    n = draw(st.integers(1, 12))
    m = draw(st.integers(3, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    positive = torch.randint(0, m, (n,), generator=g)
    with_self = draw(st.booleans())
    self_index = None
    if with_self:
        shift = torch.randint(1, m, (n,), generator=g)
        self_index = (positive + shift) % m  # never the positive
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(n, m, generator=g) < draw(st.floats(0.0, 0.6))
    return n, m, positive, self_index, mask, seed


def _forbidden(n, m, positive, self_index, mask):
    forbidden = torch.zeros(n, m, dtype=torch.bool) if mask is None else mask.clone()
    rows = torch.arange(n)
    forbidden[rows, positive] = True
    if self_index is not None:
        forbidden[rows, self_index] = True
    return forbidden


@settings(max_examples=150, deadline=None)
@given(problems(), st.integers(1, 40))
def test_sampled_sets_are_valid_distinct_and_reproducible(problem, k):
    n, m, positive, self_index, mask, seed = problem
    forbidden = _forbidden(n, m, positive, self_index, mask)
    population = (~forbidden).sum(1)

    def draw():
        return select_negatives(positive, m, k, self_index=self_index, mask=mask,
                                generator=torch.Generator().manual_seed(seed), on_shortage="use_all")

    sel = draw()
    if sel.is_dense:
        # K equals every anchor's candidate count and no mask: the standard loss; or
        # K >= m, so that every anchor is short: all its candidates ("use_all").
        assert (mask is None and bool((population == k).all())) or k >= m
        assert torch.equal(sel.allowed, ~forbidden | torch.nn.functional.one_hot(positive, m).bool())
        return
    assert torch.equal(sel.index[:, 0], positive)
    again = draw()
    assert torch.equal(sel.index, again.index) and torch.equal(sel.valid, again.valid)
    for i in range(n):
        cols = sel.index[i, 1:][sel.valid[i, 1:]].tolist()
        assert len(cols) == min(k, int(population[i]))
        assert len(set(cols)) == len(cols)
        assert not any(bool(forbidden[i, c]) for c in cols)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_all_mode_allows_exactly_the_valid_candidates_and_the_positive(problem):
    n, m, positive, self_index, mask, _ = problem
    sel = select_negatives(positive, m, "all", self_index=self_index, mask=mask)
    forbidden = _forbidden(n, m, positive, self_index, mask)
    expected = ~forbidden
    expected[torch.arange(n), positive] = True
    assert torch.equal(sel.allowed, expected)


def _subset_counts(index_rows, k):
    return [tuple(sorted(r)) for r in index_rows]


@pytest.mark.parametrize(
    "path,m,k,masked",
    [
        ("floyd", 8, 2, False),  # population 6, C(6,2) = 15 subsets
        ("keys", 9, 6, False),  # K^2 > 4m: random-key path; population 7, C(7,6) = 7
        ("floyd+mask", 9, 2, True),  # masked columns: rank lookup path
        ("keys+mask", 9, 5, True),  # random keys past each row's population; C(6,5) = 6
    ],
)
def test_k_subsets_are_uniform_chi_square(path, m, k, masked):
    draws = 30_000
    positive = torch.zeros(draws, dtype=torch.long)
    self_index = torch.ones(draws, dtype=torch.long)
    mask = None
    if masked:
        mask = torch.zeros(draws, m, dtype=torch.bool)
        mask[:, 4] = True  # population 6 after removing 0, 1 and 4
    sel = select_negatives(positive, m, k, self_index=self_index, mask=mask, generator=torch.Generator().manual_seed(123))
    subsets = _subset_counts(sel.index[:, 1:].tolist(), k)
    population = [c for c in range(m) if c not in (0, 1) and not (masked and c == 4)]
    universe = list(itertools.combinations(population, k))
    counts = {s: 0 for s in universe}
    for s in subsets:
        counts[s] += 1  # KeyError here would mean a forbidden or duplicate column
    observed = list(counts.values())
    assert sum(observed) == draws
    p = chisquare(observed).pvalue
    assert p > 1e-3, f"{path}: subsets not uniform (p={p:.2e}, {len(universe)} subsets)"


@pytest.fixture(params=["table", "compare"])
def floyd_way(request, monkeypatch):
    """Both ways Floyd's algorithm finds an earlier draw on the CPU: a table
    of booleans (small banks) or comparison with the row's draws (large)."""
    compare = request.param == "compare"
    monkeypatch.setattr(negatives_module, "_floyd_by_comparison", lambda n, k, width: compare)


@pytest.mark.parametrize("k", [7, 90])
def test_floyd_ways_draw_the_same_ranks(monkeypatch, k):
    """A table of every row, tables of blocks of rows (61 rows of the
    widest rank here), and comparison with the row's earlier draws."""
    population = torch.randint(k + 1, 4 * k, (500,), generator=torch.Generator().manual_seed(2))
    raw = torch.randint(0, 2**62, (500, k), generator=torch.Generator().manual_seed(4))
    width = int(population.max())
    ways = []
    for compare, cells in ((False, 500 * width), (False, 61 * width), (True, 500 * width)):
        monkeypatch.setattr(negatives_module, "FLOYD_TABLE_CELLS", cells)
        monkeypatch.setattr(negatives_module, "_floyd_by_comparison", lambda n, k, width, compare=compare: compare)
        ways.append(sample_uniform_ranks(population, k, raw))
    assert torch.equal(ways[0], ways[1]) and torch.equal(ways[0], ways[2])


def test_floyd_compares_only_past_the_cache_sized_table_and_for_small_k():
    rule = negatives_module._floyd_by_comparison
    cells = negatives_module.FLOYD_TABLE_CELLS
    assert not rule(1, 1, cells) and rule(1, 1, cells + 1)  # the table while it fits a cache
    assert rule(8192, 16, 8190) and not rule(2048, 256, 2046)  # then by the cost of each way
    assert rule(8192, 64, 16382) and not rule(8192, 256, 16382)  # more blocks: comparison up to a larger K


def test_floyd_in_torch_ops_draws_what_numpy_draws():
    """The torch version (what CUDA tensors take) run on CPU tensors: the same
    ranks as the numpy version the CPU takes, from the same random numbers."""
    gen = torch.Generator().manual_seed(5)
    for k in (1, 6, 13):
        population = torch.randint(k, 3 * k + 10, (300,), generator=gen)
        raw = torch.randint(0, 2**62, (300, k), generator=gen)
        width = int(population.max())
        in_numpy = negatives_module._floyd_numpy(population.numpy(), k, raw.numpy(), width)
        assert torch.equal(negatives_module._floyd_torch(population, k, raw, width), torch.from_numpy(in_numpy))


def test_floyd_ranks_match_exact_subset_probabilities(floyd_way):
    population = torch.full((60_000,), 5)
    raw = torch.randint(0, 2**62, (60_000, 3), generator=torch.Generator().manual_seed(9))
    ranks = sample_uniform_ranks(population, 3, raw)
    counts: dict[tuple, int] = {}
    for row in ranks.tolist():
        key = tuple(sorted(row))
        assert len(set(row)) == 3 and all(0 <= r < 5 for r in row)
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == math.comb(5, 3)
    assert chisquare(list(counts.values())).pvalue > 1e-3


@pytest.mark.parametrize("k", [4, 20])  # Floyd's algorithm; random keys (2K > m)
def test_sampling_does_not_depend_on_how_rows_are_split(k):
    """Rows 4..7 sampled alone with row_index equal those rows sampled together."""
    m = 30
    positive = torch.arange(8)
    whole = select_negatives(positive, m, k, generator=torch.Generator().manual_seed(3))
    part = select_negatives(positive[4:], m, k, generator=torch.Generator().manual_seed(3),
                            row_index=torch.arange(4, 8), n_rows_global=8)
    assert torch.equal(whole.index[4:], part.index)


# ---- bad input -------------------------------------------------------------

def _z(n=6, d=4, **kw):
    return torch.randn(n, d, **kw), torch.randn(n, d, **kw)


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(negatives=0), ValueError, "negatives"),
        (dict(negatives=-3), ValueError, "negatives"),
        (dict(negatives="some"), ValueError, "negatives"),
        (dict(negatives=2.5), TypeError, "negatives"),
        (dict(negatives=True), TypeError, "negatives"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(form="triplet"), ValueError, "form"),
        (dict(symmetric=True), ValueError, "symmetric"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(on_shortage="skip"), ValueError, "on_shortage"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        InfoNCE(**kwargs)


def test_relic_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        ReLIC(alpha=-1.0)


def test_k_larger_than_candidates():
    z1, z2 = _z(n=4)
    with pytest.raises(ValueError, match="negatives=7"):
        InfoNCE(negatives=7)(z1, z2)  # 2B - 2 = 6 candidates
    with pytest.raises(ValueError, match="negatives=4"):
        ReLIC(negatives=4)(z1, z2)  # B - 1 = 3 candidates


def test_mismatched_shapes_devices_dtypes():
    z1, z2 = _z()
    with pytest.raises(ValueError, match="view1 and view2"):
        InfoNCE()(z1, z2[:5])
    with pytest.raises(ValueError, match="view1 and view2"):
        InfoNCE()(z1, torch.randn(6, 5))
    with pytest.raises(TypeError, match="dtype"):
        InfoNCE()(z1, z2.double())
    with pytest.raises(ValueError, match="2-d"):
        InfoNCE()(z1[0], z2[0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        InfoNCE()(z1.numpy(), z2)
    with pytest.raises(ValueError, match="hard_negatives"):
        InfoNCE(form="query_document")(z1, z2, torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match="hard_negatives"):
        InfoNCE()(z1, z2, torch.randn(6, 2, 4))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            InfoNCE()(z1, z2.cuda())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings(bad):
    z1, z2 = _z()
    z2[3, 1] = bad
    with pytest.raises(ValueError, match="view2 contains NaN or inf"):
        InfoNCE()(z1, z2)
    with pytest.raises(ValueError, match="documents contains NaN or inf"):
        InfoNCE(form="query_document")(z1, z2)
    with pytest.raises(ValueError, match="view2 contains NaN or inf"):
        ReLIC()(z1, z2)


def test_bad_masks():
    z1, z2 = _z()
    with pytest.raises(ValueError, match=r"mask must have shape \(6, 6\)"):
        InfoNCE()(z1, z2, mask=torch.zeros(6, 12, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        InfoNCE()(z1, z2, mask=torch.zeros(6, 6))
    with pytest.raises(ValueError, match=r"mask must have shape \(6, 18\)"):
        InfoNCE(form="query_document")(z1, z2, torch.randn(6, 2, 4), mask=torch.zeros(6, 6, dtype=torch.bool))


def _inclusion_tests(index, population_cols, k):
    """First and second order inclusion frequencies of uniform k-subsets."""
    rows = index.shape[0]
    member = torch.zeros(rows, max(population_cols) + 1)
    member.scatter_(1, index, 1.0)
    member = member[:, population_cols]
    p = len(population_cols)
    singles = member.sum(0)
    assert torch.allclose(singles.sum(), torch.tensor(float(rows * k)))
    assert chisquare(singles.numpy()).pvalue > 1e-3
    pairs = (member.t() @ member)[torch.triu_indices(p, p, 1).unbind()]
    assert chisquare(pairs.numpy()).pvalue > 1e-3


def test_large_k_path_inclusion_frequencies_are_uniform():
    m, k, rows = 100, 40, 6000  # 2K <= m: Floyd's algorithm with a bitmap
    positive = torch.zeros(rows, dtype=torch.long)
    self_index = torch.ones(rows, dtype=torch.long)
    sel = select_negatives(positive, m, k, self_index=self_index, generator=torch.Generator().manual_seed(8))
    assert sel.index.shape == (rows, k + 1)
    _inclusion_tests(sel.index[:, 1:], list(range(2, m)), k)


def test_heavily_masked_rows_stay_valid_and_uniform():
    m, k, rows = 200, 40, 3000
    mask = torch.zeros(rows, m, dtype=torch.bool)
    mask[:, 43:] = True  # 41 candidates left: K is almost all of them
    positive = torch.zeros(rows, dtype=torch.long)
    self_index = torch.ones(rows, dtype=torch.long)
    sel = select_negatives(positive, m, k, self_index=self_index, mask=mask, generator=torch.Generator().manual_seed(2))
    cols = sel.index[:, 1:]
    assert bool(((cols >= 2) & (cols < 43)).all())
    assert all(len(set(r)) == k for r in cols.tolist())
    singles = torch.zeros(m).index_add_(0, cols.reshape(-1), torch.ones(cols.numel()))[2:43]
    assert chisquare(singles.numpy()).pvalue > 1e-3


def test_bad_on_shortage_and_mask_shape_are_refused_up_front():
    positive = torch.tensor([1, 0])
    with pytest.raises(ValueError, match="on_shortage"):
        select_negatives(positive, 5, 2, on_shortage="ignore")  # nobody is short: still refused
    with pytest.raises(ValueError, match="mask must have shape"):
        select_negatives(positive, 5, 2, mask=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(positive_index=torch.tensor([0, -1, 2])), ValueError, r"positive_index must hold bank columns in \[0, 4\)"),
    (dict(positive_index=torch.tensor([0, 9, 2])), ValueError, r"positive_index must hold bank columns in \[0, 4\)"),
    (dict(positive_index=torch.tensor([0.0, 1.0, 2.0])), TypeError, "positive_index must be a 1-d integer tensor"),
    (dict(self_index=torch.tensor([1, 2])), ValueError, r"self_index must be an integer tensor of shape \(3,\)"),
    (dict(self_index=torch.tensor([1, 2, 4])), ValueError, r"self_index must hold bank columns .* in \[-1, 4\)"),
    (dict(mask=torch.zeros(3, 4)), TypeError, "mask must be a bool tensor"),
    (dict(row_index=torch.tensor([0, 1])), ValueError, "n_rows_global .* is required"),
    (dict(row_index=torch.tensor([0, 1]), n_rows_global=5), ValueError, r"row_index must be an integer tensor"),
    (dict(row_index=torch.tensor([0, 1, 5]), n_rows_global=5), ValueError, r"row_index must hold global rows"),
])
def test_select_negatives_names_a_bad_index_argument(kwargs, exc, message):
    """Each index argument checked before use (they failed inside torch, or, for a negative
    positive_index with sampled negatives, silently took the last column as the positive)."""
    args = dict(positive_index=torch.tensor([1, 2, 3]), num_candidates=4, negatives=2) | kwargs
    with pytest.raises(exc, match=message):
        select_negatives(**args)
