"""The studies' statistics (negbatch.lab.stats) against scipy and against hand
computations that share no code with it: the Welch-Satterthwaite interval with a
t quantile from a numerically integrated t density, ranks and a Pearson
correlation written out."""

import math
import statistics

import pytest

from negbatch.lab.stats import fmt_mean_std, holm, mean_std, spearman, welch, welch_p

A = [0.91, 0.93, 0.92, 0.95]
B = [0.90, 0.89, 0.93]


def _t_cdf(x: float, df: float) -> float:
    """Student's t CDF by Simpson's rule on the density (float64, 2,000 intervals)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    pdf = lambda u: c * (1 + u * u / df) ** (-(df + 1) / 2)  # noqa: E731
    n, a = 2000, 0.0
    h = (abs(x) - a) / n
    area = pdf(a) + pdf(abs(x)) + sum((4 if i % 2 else 2) * pdf(a + i * h) for i in range(1, n))
    half = area * h / 3
    return 0.5 + half if x >= 0 else 0.5 - half


def _t_quantile(q: float, df: float) -> float:
    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def _welch_by_hand(a, b, confidence=0.95):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se = va / len(a) + vb / len(b)
    df = se**2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    t = (ma - mb) / math.sqrt(se)
    p = 2 * (1 - _t_cdf(abs(t), df))
    half = _t_quantile((1 + confidence) / 2, df) * math.sqrt(se)
    return p, ma - mb - half, ma - mb + half, df


@pytest.mark.parametrize("a, b", [(A, B), ([1.0, 2.0, 4.0, 8.0, 3.0], [2.5, 2.6, 2.4]), ([0.5, 0.5, 0.5], [0.4, 0.6])])
def test_welch_against_a_hand_computation_and_scipy(a, b):
    import warnings

    from scipy import stats

    w = welch(a, b)
    p, low, high, df = _welch_by_hand(a, b)
    assert w.p == pytest.approx(p, abs=1e-7) and w.df == pytest.approx(df, rel=1e-12)
    assert (w.low, w.high) == pytest.approx((low, high), abs=1e-7)
    assert w.difference == pytest.approx(sum(a) / len(a) - sum(b) / len(b), abs=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns about the constant group
        result = stats.ttest_ind(a, b, equal_var=False)
    assert w.p == pytest.approx(result.pvalue, rel=1e-12)
    if hasattr(result, "confidence_interval"):  # scipy >= 1.11
        ci = result.confidence_interval(0.95)
        assert (w.low, w.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert w.significant == (w.low > 0 or w.high < 0)  # the interval excludes 0 exactly when p < 0.05
    assert welch_p(a, b) == w.p


def test_welch_other_confidence_and_undefined_cases():
    narrow, wide = welch(A, B, confidence=0.5), welch(A, B, confidence=0.99)
    assert wide.low < narrow.low < narrow.difference < narrow.high < wide.high
    assert (wide.low, wide.high) == pytest.approx(_welch_by_hand(A, B, 0.99)[1:3], abs=1e-6)
    assert welch([0.5], [0.4, 0.6]) is None and welch([0.5, 0.5], [0.4, 0.4]) is None
    assert welch_p([], [1.0, 2.0]) is None
    with pytest.raises(ValueError, match="confidence"):
        welch(A, B, confidence=1.5)


def _ranks(v):
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return ranks


def test_spearman_against_ranks_by_hand_and_scipy():
    from scipy import stats

    x = [math.log(k) for k in (1, 2, 5, 10, 1, 2, 5, 10)]
    y = [0.31, 0.35, 0.35, 0.40, 0.29, 0.36, 0.33, 0.41]
    rho, p = spearman(x, y)
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    pearson = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert rho == pytest.approx(pearson, abs=1e-12)
    assert (rho, p) == pytest.approx(tuple(stats.spearmanr(x, y)), rel=1e-12)
    assert spearman([1, 2], [3, 4]) is None and spearman([1, 2, 3], [5, 5, 5]) is None
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2, 3], [1, 2])


def test_mean_std():
    values = [0.2, 0.4, None, float("nan"), 0.9]
    m, s, n = mean_std(values)
    assert n == 3 and m == pytest.approx(statistics.mean([0.2, 0.4, 0.9]))
    assert s == pytest.approx(statistics.stdev([0.2, 0.4, 0.9]))
    assert mean_std([0.7]) == (0.7, 0.0, 1)
    assert fmt_mean_std([0.2, 0.4], 2) == "0.30 ± 0.14" and fmt_mean_std([None]) == "n/a"
    assert fmt_mean_std([0.2, None], 2) == "0.20 (1 value)"  # one seed has no spread to show


def _holm_rejects(p_values, alpha):
    """Holm's procedure as the paper states it: walk the p-values upwards,
    rejecting while p_(j) <= alpha / (m - j + 1), and stop at the first that is not."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = set()
    for j, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - j):
            break
        rejected.add(i)
    return rejected


@pytest.mark.parametrize("seed", range(20))
def test_holm_adjusted_p_rejects_exactly_what_the_step_down_procedure_rejects(seed):
    import random

    rng = random.Random(seed)
    p = [rng.choice([rng.random() * 0.1, rng.random()]) for _ in range(rng.randint(1, 9))]
    if seed % 4 == 0 and len(p) > 1:
        p[1] = p[0]  # a tie
    adjusted = holm(p)
    for alpha in [0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5] + sorted(p):
        assert {i for i, a in enumerate(adjusted) if a <= alpha} == _holm_rejects(p, alpha)
    assert all(a >= q for a, q in zip(adjusted, p)) and all(a <= 1 for a in adjusted)


def test_holm_of_one_test_is_its_p_and_undefined_tests_are_left_out():
    assert holm([0.03]) == [0.03]
    assert holm([]) == []
    # None does not count in m: two defined tests, not three.
    assert holm([0.02, None, 0.04]) == pytest.approx([0.04, None, 0.04])
    with pytest.raises(ValueError, match="p_values must lie in"):
        holm([0.5, 1.5])
    with pytest.raises(ValueError, match="p_values must lie in"):
        holm([float("nan")])
