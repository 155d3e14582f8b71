import math

import numpy as np
import pytest
import torch

from negbatch.evaluation import fit_logistic_regression, knn_accuracy, linear_probe


def blobs(n=300, d=5, classes=3, sep=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centers = torch.randn(classes, d, generator=g) * sep
    return centers[y] + torch.randn(n, d, generator=g), y


def test_linear_probe_separable_data():
    x, y = blobs()
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) == 1.0


def test_linear_probe_chance_on_random_labels():
    x, _ = blobs(n=600, sep=0.0)
    y = torch.randint(0, 3, (600,), generator=torch.Generator().manual_seed(1))
    assert linear_probe(x[:300], y[:300], x[300:], y[300:]) < 0.5


def test_logistic_regression_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(n=200, sep=1.0, seed=2)
    l2 = 0.01
    w, b = fit_logistic_regression(x, y, 3, l2=l2, max_iter=500)
    # scikit-learn minimises C * sum(loss) + ||W||^2 / 2, i.e. our mean loss with l2 = 1 / (C n).
    ref = sklearn.LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())
    ours = torch.softmax(x.double() @ w + b, 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x.numpy()), atol=2e-4)


def test_knn_matches_brute_force():
    x, y = blobs(n=120, sep=1.0, seed=3)
    xtr, ytr, xte, yte = x[:80], y[:80], x[80:], y[80:]
    k = 7
    correct = 0
    for i in range(len(xte)):
        sims = [float(torch.nn.functional.cosine_similarity(xte[i], xtr[j], dim=0)) for j in range(len(xtr))]
        nearest = sorted(range(len(xtr)), key=lambda j: -sims[j])[:k]
        votes = [sum(int(ytr[j]) == c for j in nearest) for c in range(3)]
        correct += votes.index(max(votes)) == int(yte[i])
    assert knn_accuracy(xtr, ytr, xte, yte, k=k, chunk_size=13) == pytest.approx(correct / len(xte))


def test_probe_input_errors():
    x, y = blobs(n=20)
    with pytest.raises(ValueError, match="train_labels"):
        linear_probe(x, y[:5], x, y)
    with pytest.raises(ValueError, match="widths"):
        linear_probe(x, y, x[:, :2], y)
    with pytest.raises(ValueError, match="NaN"):
        linear_probe(x * float("nan"), y, x, y)
    for missing in (-100, -1):  # -100 would be skipped silently by cross_entropy
        with pytest.raises(ValueError, match=f"train_labels must be class indices >= 0, got {missing}"):
            linear_probe(x, torch.where(torch.arange(len(y)) == 3, missing, y), x, y)
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(x, y, x, y, k=100)


def test_weighted_knn_at_a_low_temperature_and_bad_input():
    from negbatch.evaluation import weighted_knn_predict

    train = torch.tensor([[1.0, 0.0], [1.0, 0.001], [0.95, 0.31], [0.95, 0.312], [0.95, 0.314]])
    labels, q = torch.tensor([1, 1, 0, 0, 0]), torch.tensor([[1.0, 0.0]])
    # Two votes at similarity 1 outweigh three at 0.95 at any temperature; exp(1/0.01) overflows float32.
    for t in (0.05, 0.01, 0.002):
        assert weighted_knn_predict(train, labels, q, k=5, temperature=t).tolist() == [1]
    with pytest.raises(ValueError, match="test_features contains NaN"):
        weighted_knn_predict(train, labels, torch.tensor([[float("nan"), 1.0]]), k=2)
    for bad in (0, -0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
            weighted_knn_predict(train, labels, q, k=2, temperature=bad)
    with pytest.raises(TypeError, match="temperature must be a positive float, got str"):  # was '>' on a str
        weighted_knn_predict(train, labels, q, k=2, temperature="0.1")
    for bad in (0, -5):
        with pytest.raises(ValueError, match="chunk_size"):
            knn_accuracy(train, labels, train, labels, k=1, chunk_size=bad)
    with pytest.raises(ValueError, match="different widths"):
        knn_accuracy(train, labels, torch.ones(2, 3), torch.tensor([0, 1]), k=1)


def test_linear_probe_with_constant_features_one_class_and_a_numpy_l2():
    from negbatch.evaluation import knn_accuracy, linear_eval, weighted_knn_accuracy

    x, y = torch.tensor([[1.0, 2.0], [1.0, 2.0]]), torch.tensor([2, 0])
    test_x, test_y = torch.tensor([[1.0, 2.0], [0.5, 1.0]]), torch.tensor([2, 2])
    for probe in (linear_probe, linear_eval):  # constant features: the population std is 0, not NaN
        assert math.isfinite(probe(x, y, test_x, test_y))
    # One training class: the "accuracy" was that class's share of the test split (sklearn refuses too).
    one = torch.tensor([2, 2])
    for probe in (linear_probe, linear_eval, knn_accuracy, weighted_knn_accuracy):
        kwargs = {"k": 1} if "knn" in probe.__name__ else {}
        with pytest.raises(ValueError, match=r"train_labels hold one class only \(2\)"):
            probe(x, one, test_x, test_y, **kwargs)
    with pytest.raises(ValueError, match="max_iter must be a positive int"):
        linear_probe(x, y, test_x, test_y, max_iter=0)  # it returned the untrained W = 0's accuracy
    g = torch.Generator().manual_seed(0)
    many, labels = torch.randn(20, 3, generator=g), torch.arange(20) % 2
    with pytest.raises(ValueError, match="val_fraction=0.98 holds out all 20 training rows"):
        linear_eval(many, labels, many, labels, l2=[1e-2, 1e-4], val_fraction=0.98)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(40, 3, generator=g), torch.arange(40) % 2
    assert linear_eval(xs, ys, xs, ys, l2=np.float32(1e-3)) == linear_eval(xs, ys, xs, ys, l2=1e-3)


def test_lab_representations_restore_the_models_mode():
    from negbatch.lab.tasks.image import representations

    class Model(torch.nn.Module):
        def representation(self, x):
            if x.shape[0] > 3:
                raise RuntimeError("boom")
            return x * (1.0 if self.training else 2.0)

    model = Model().eval()
    assert torch.equal(representations(model, torch.ones(3, 2)), torch.full((3, 2), 2.0))
    assert not model.training  # stays in eval mode
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        representations(model, torch.ones(5, 2), batch_size=5)
    assert model.training  # restored after an error too


def test_knn_takes_numpy_integers():
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]), torch.tensor([0, 1, 0, 1])
    assert knn_accuracy(x, y, x, y, k=np.int64(1), chunk_size=np.int64(2)) == knn_accuracy(x, y, x, y, k=1, chunk_size=2)


def test_evaluation_names_what_is_wrong_with_labels_penalties_and_empty_training_sets():
    """An empty training set crashed weighted_knn_accuracy in torch's max(); labels
    of another dtype were refused as not 'of shape (n,)' while of that shape; an
    infinite l2 crashed linear_eval's L-BFGS with an overflow, and a string l2
    linear_probe's comparison, both with bare errors."""
    from negbatch.evaluation import linear_eval, weighted_knn_accuracy

    x, y = blobs(n=20)
    with pytest.raises(ValueError, match=r"train_features must be a non-empty 2-D tensor"):
        weighted_knn_accuracy(x[:0], y[:0], x, y, k=1)
    for bad in (y.to(torch.uint8), y.bool(), y.float()):
        with pytest.raises(ValueError, match=rf"train_labels must be an int64 or int32 tensor of shape \(20,\).*"
                                             rf"got {bad.dtype} of shape \(20,\)"):
            knn_accuracy(x, bad, x, y, k=1)
    with pytest.raises(ValueError, match=r"test_labels .* got list"):
        linear_probe(x, y, x, y.tolist())
    for probe in (linear_probe, linear_eval):
        for bad in (float("inf"), float("nan"), -1.0, "1e-4", None):
            with pytest.raises(ValueError, match="l2 must be a (finite )?number >= 0"):
                probe(x, y, x, y, l2=bad)
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0"):
        linear_eval(x, y, x, y, l2=[1e-2, float("inf")])
    assert linear_eval(x, y, x, y, l2=np.array([1e-2, 1e-4])) == linear_eval(x, y, x, y, l2=[1e-2, 1e-4])
