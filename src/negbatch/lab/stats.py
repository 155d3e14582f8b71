"""The statistics of the studies' reports: mean ± std over seeds, Welch's
t-test with the confidence interval of the difference, Holm's correction of a
family of p-values, Spearman's rank correlation. One copy of each, used by
every study.

Every function returns None (or NaN for :func:`mean_std`) where the quantity
is undefined, instead of a number that looks like a result: a test on fewer
than two values per group, or on groups without any spread.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = ["mean_std", "fmt_mean_std", "per_seed", "Welch", "welch", "welch_p", "holm", "spearman"]


def per_seed(rows: Iterable[dict[str, Any]], key: str) -> list[float]:
    """``key`` once per seed, for a value that belongs to the seed, not to the run (the untrained
    encoder, a seed's trained model measured once): every run of the seed repeats it, and counted
    once per run the seeds' spread came out too small. Several values of a seed are averaged."""
    by_seed: dict[Any, list[float]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], []).append(r[key])
    return [sum(v) / len(v) for v in by_seed.values()]


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count, ignoring None and NaN.

    Examples
    --------
    >>> mean_std([1.0, 2.0, None, 3.0])
    (2.0, 1.0, 3)
    >>> mean_std([])
    (nan, nan, 0)
    """
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return float("nan"), float("nan"), 0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s, len(v)


def fmt_mean_std(values: Iterable[float | None], digits: int = 3) -> str:
    """``"m ± s"`` with ``digits`` decimals, ``"m (1 value)"`` for one value
    (no spread to show: an interrupted study), or ``"n/a"`` without values.

    Examples
    --------
    >>> fmt_mean_std([0.5, 0.7])
    '0.600 ± 0.141'
    >>> fmt_mean_std([0.5])
    '0.500 (1 value)'
    """
    m, s, n = mean_std(values)
    if n == 0:
        return "n/a"
    return f"{m:.{digits}f} (1 value)" if n == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance t-test of two groups.

    Attributes
    ----------
    p : float
        Two-sided p-value of "the means are equal".
    difference : float
        mean(a) - mean(b).
    low, high : float
        The confidence interval of the difference (Welch–Satterthwaite degrees of freedom).
    df : float
        The Welch–Satterthwaite degrees of freedom.
    confidence : float
        The interval's confidence level.
    """

    p: float
    difference: float
    low: float
    high: float
    df: float
    confidence: float

    @property
    def significant(self) -> bool:
        """Whether p < 1 - confidence (then the interval excludes 0)."""
        return self.p < 1 - self.confidence


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Welch | None:
    """Welch's t-test of mean(a) = mean(b) and the confidence interval of mean(a) - mean(b).

    With standard errors ``s_a² / n_a`` and ``s_b² / n_b`` (sample variances),
    ``t = (mean(a) - mean(b)) / sqrt(se_a + se_b)`` and the
    Welch–Satterthwaite degrees of freedom
    ``df = (se_a + se_b)² / (se_a² / (n_a - 1) + se_b² / (n_b - 1))``; the
    interval is ``difference ± t_{df}((1 + confidence) / 2) · sqrt(se_a + se_b)``.

    Returns None when the test is undefined: fewer than two values in a group,
    or no spread in either group.

    Examples
    --------
    >>> w = welch([0.91, 0.93, 0.92, 0.95], [0.90, 0.89, 0.93])
    >>> round(w.p, 3), round(w.difference, 4), w.low < w.difference < w.high
    (0.233, 0.0208, True)
    >>> welch([0.5], [0.4, 0.6]) is None, welch([0.5, 0.5], [0.4, 0.4]) is None
    (True, True)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2 or (len(set(a)) == 1 and len(set(b)) == 1):
        return None
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-identical values: p is still usable
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    if math.isnan(p):
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    se_a = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    se_b = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    df = (se_a + se_b) ** 2 / (se_a**2 / (len(a) - 1) + se_b**2 / (len(b) - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * math.sqrt(se_a + se_b)
    return Welch(p=p, difference=ma - mb, low=ma - mb - half, high=ma - mb + half, df=df, confidence=confidence)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The p-value of :func:`welch`, or None where the test is undefined."""
    result = welch(a, b)
    return None if result is None else result.p


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values of a family of tests.

    A report that compares several methods with one reference at the 0.05
    level finds some difference by chance far more often than one time in
    twenty; an adjusted p below ``alpha`` rejects its hypothesis with a
    chance of at most ``alpha`` of any false rejection in the family (Holm
    1979, valid for dependent tests, such as several methods against one
    shared reference). With the m defined p-values in ascending order,
    ``adjusted_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))`` (1-based).
    None (an undefined test) stays None and does not count in m.

    Examples
    --------
    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    >>> holm([0.2, None])
    [0.2, None]
    """
    defined = sorted((float(p), i) for i, p in enumerate(p_values) if p is not None)
    for p, _ in defined:
        if not 0 <= p <= 1 or math.isnan(p):
            raise ValueError(f"p_values must lie in [0, 1] (or be None for an undefined test), got {p!r}")
    adjusted: list[float | None] = [None] * len(p_values)
    running, m = 0.0, len(defined)
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
    """Spearman's rank correlation and its two-sided p-value, or None when
    undefined (fewer than three pairs, or either side constant).

    Examples
    --------
    >>> rho, p = spearman([1, 2, 3, 4], [10, 30, 20, 40])
    >>> round(rho, 2)
    0.8
    >>> spearman([1, 2, 3], [5, 5, 5]) is None
    True
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 3 or len(set(x)) == 1 or len(set(y)) == 1:
        return None
    from scipy import stats

    rho, p = stats.spearmanr(x, y)
    if math.isnan(rho):
        return None
    return float(rho), float(p)
