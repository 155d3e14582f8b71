import math

import pytest
import torch

from negbatch.diagnostics import alignment, intra_class_distance, silhouette_score, uniformity


def data(seed=0, n=40, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def dist(a, b):
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def test_intra_class_distance_brute_force():
    z, y = data()
    per_class = []
    for c in set(y.tolist()):
        idx = [i for i in range(len(y)) if y[i] == c]
        pairs = [dist(z[i], z[j]) for i in idx for j in idx if i != j]
        per_class.append(sum(pairs) / len(pairs))
    assert intra_class_distance(z, y) == pytest.approx(sum(per_class) / len(per_class))


def test_silhouette_brute_force_and_singletons():
    z, y = data(1)
    y[0] = 7  # a singleton class scores 0
    n = len(y)
    scores = []
    for i in range(n):
        same = [dist(z[i], z[j]) for j in range(n) if j != i and y[j] == y[i]]
        if not same:
            scores.append(0.0)
            continue
        a = sum(same) / len(same)
        b = min(
            sum(dist(z[i], z[j]) for j in range(n) if y[j] == c) / sum(1 for j in range(n) if y[j] == c)
            for c in set(y.tolist()) if c != y[i]
        )
        scores.append((b - a) / max(a, b))
    assert silhouette_score(z, y, chunk_size=7) == pytest.approx(sum(scores) / n)


def test_silhouette_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    z, y = data(2)
    assert silhouette_score(z, y) == pytest.approx(metrics.silhouette_score(z.numpy(), y.numpy()))


def test_alignment_uniformity_brute_force():
    z1, _ = data(3, n=10)
    z2, _ = data(4, n=10)
    assert alignment(z1, z2) == pytest.approx(sum(dist(a, b) ** 2 for a, b in zip(z1, z2)) / 10)
    terms = [math.exp(-2 * dist(z1[i], z1[j]) ** 2) for i in range(10) for j in range(10) if i != j]
    assert uniformity(z1) == pytest.approx(math.log(sum(terms) / len(terms)))


def test_geometry_errors():
    z, y = data()
    with pytest.raises(ValueError, match="labels"):
        silhouette_score(z, y[:3])
    with pytest.raises(ValueError, match="2 distinct labels"):
        silhouette_score(z, torch.zeros(len(z), dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        alignment(z, z[:3])
    with pytest.raises(ValueError, match="got torch.float32 of shape"):
        intra_class_distance(z, y.float())
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        silhouette_score(z, y, chunk_size=0)
    for alpha in (-1, 0, float("nan"), "2"):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            alignment(z, z, alpha=alpha)
    for t in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="t must be a finite number > 0"):
            uniformity(z, t=t)
    assert alignment(z, z + 1, alpha=1) == pytest.approx(math.sqrt(z.shape[1]))  # an int alpha is fine


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 40, 2048])
def test_uniformity_and_intra_class_distance_in_row_blocks_equal_the_brute_force(chunk_size):
    z, y = data(5, n=23)
    terms = [math.exp(-1.5 * dist(z[i], z[j]) ** 2) for i in range(23) for j in range(23) if i != j]
    assert uniformity(z, t=1.5, chunk_size=chunk_size) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-12)
    per_class = []
    for c in set(y.tolist()):
        idx = [i for i in range(len(y)) if y[i] == c]
        pairs = [dist(z[i], z[j]) for i in idx for j in idx if i != j]
        per_class.append(sum(pairs) / len(pairs))
    assert intra_class_distance(z, y, chunk_size=chunk_size) == pytest.approx(sum(per_class) / len(per_class),
                                                                              rel=1e-12)


def test_geometry_holds_at_most_chunk_size_rows_of_distances(monkeypatch):
    """Bounded memory: a 10,000-image test set once made uniformity hold 10,000 x 10,000 doubles
    (and two copies), 60,000 rows some 80 GB."""
    from negbatch.diagnostics import geometry

    shapes, original = [], torch.cdist

    def cdist(a, b):
        shapes.append((a.shape[0], b.shape[0]))
        return original(a, b)

    monkeypatch.setattr(geometry.torch, "cdist", cdist)
    z, y = data(6, n=50)
    uniformity(z, chunk_size=8)
    intra_class_distance(z, y, chunk_size=8)
    silhouette_score(z, y, chunk_size=8)
    assert shapes and max(rows for rows, _ in shapes) <= 8


@pytest.mark.parametrize("fn", [uniformity, intra_class_distance, silhouette_score])
@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_a_bad_chunk_size_is_refused_by_name(fn, bad):
    z, y = data(7, n=10)
    args = (z,) if fn is uniformity else (z, y)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fn(*args, chunk_size=bad)
