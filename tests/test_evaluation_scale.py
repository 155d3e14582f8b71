"""Evaluation at scale: streamed feature extraction, the device linear evaluation
against the float64 probe and scikit-learn, the weighted kNN monitor against a
brute-force loop."""

import math

import numpy as np
import pytest
import torch

from negbatch.evaluation import (
    extract_features,
    fit_logistic_regression,
    linear_eval,
    linear_probe,
    weighted_knn_accuracy,
    weighted_knn_predict,
)


def blobs(n=300, d=6, classes=4, sep=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centers = torch.randn(classes, d, generator=g) * sep
    return centers[y] + torch.randn(n, d, generator=g), y


# ------------------------------------------------------------------ features


def test_extract_features_streams_and_converts():
    x = torch.randint(0, 256, (23, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seen = []

    def model_fn(b):
        seen.append(b.shape[0])
        assert b.dtype == torch.float32 and float(b.max()) <= 1
        return torch.cat([b.mean(dim=(2, 3)), b.amax(dim=(1, 2, 3))[:, None]], 1)

    f = extract_features(model_fn, x, batch_size=5)
    assert seen == [5, 5, 5, 5, 3] and f.shape == (23, 4) and f.device.type == "cpu"
    xf = x.float() / 255
    assert torch.allclose(f[:, :3], xf.mean(dim=(2, 3))) and torch.allclose(f[:, 3], xf.amax(dim=(1, 2, 3)))
    assert torch.equal(extract_features(model_fn, xf, batch_size=50), f)
    shifted = extract_features(model_fn, x, batch_size=7, preprocess=lambda b: b * 0.5)
    assert torch.allclose(shifted, f * 0.5)
    with pytest.raises(ValueError, match="model_fn must return features"):
        extract_features(lambda b: b, x)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        extract_features(model_fn, x, batch_size=0)


def test_extract_features_from_files_with_workers(tmp_path):
    pytest.importorskip("PIL")
    from _image_formats import write_image_folder
    from negbatch.data import load_image_folder

    write_image_folder(tmp_path)
    files = load_image_folder(tmp_path, decode_size=6).x_train
    want = files[torch.arange(len(files))].float().div(255).flatten(1)
    got = extract_features(lambda b: b.flatten(1), files, batch_size=4, num_workers=2)
    assert torch.equal(got, want)


# ------------------------------------------------------------ linear eval


def objective(x, y, w, b, l2, mean, std):
    x = (x.double() - mean) / std
    return float(torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum())


def test_linear_eval_reaches_the_float64_optimum():
    x, y = blobs(n=400, sep=1.0, seed=1)
    xtr, ytr, xte, yte = x[:300], y[:300], x[300:], y[300:]
    l2 = 1e-3
    res = linear_eval(xtr, ytr, xte, yte, l2=l2, return_details=True, chunk_size=64)
    # the float64 reference: the same objective minimised by linear.fit_logistic_regression
    xd = xtr.double()
    mean, std = xd.mean(0), xd.std(0, unbiased=False).clamp_min(1e-8)
    w, b = fit_logistic_regression((xd - mean) / std, ytr, 4, l2=l2, max_iter=500)
    best = objective(xtr, ytr, w, b, l2, mean, std)
    assert res["loss"] == pytest.approx(best, rel=1e-4)
    probe = linear_probe(xtr, ytr, xte, yte, l2=l2, max_iter=500)
    assert abs(res["accuracy"] - probe) <= 1 / len(xte) + 1e-12  # at most one test point apart
    assert 0.5 < res["accuracy"] < 1.0  # a problem where accuracy can actually differ


def test_linear_eval_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(n=360, sep=1.0, seed=4)
    xtr, ytr, xte, yte = x[:240], y[:240], x[240:], y[240:]
    l2 = 1e-2
    ours = linear_eval(xtr, ytr, xte, yte, l2=l2)
    mean, std = xtr.mean(0), xtr.std(0)
    ref = sklearn.LogisticRegression(C=1 / (l2 * len(xtr)), tol=1e-10, max_iter=10000)
    ref.fit(((xtr - mean) / std).numpy(), ytr.numpy())
    acc = float((ref.predict(((xte - mean) / std).numpy()) == yte.numpy()).mean())
    assert abs(ours - acc) <= 1 / len(xte) + 1e-12


def test_linear_eval_chunking_and_grid():
    x, y = blobs(n=300, sep=0.8, seed=2)
    a = linear_eval(x[:200], y[:200], x[200:], y[200:], chunk_size=37, return_details=True)
    b = linear_eval(x[:200], y[:200], x[200:], y[200:], chunk_size=100000, return_details=True)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"]
    grid = [1.0, 1e-2, 1e-4]
    res = linear_eval(x[:200], y[:200], x[200:], y[200:], l2=grid, return_details=True)
    scores = res["val_accuracy"]
    assert sorted(scores) == sorted(grid) and res["l2"] == max(sorted(grid, reverse=True), key=scores.get)
    assert res["accuracy"] == linear_eval(x[:200], y[:200], x[200:], y[200:], l2=res["l2"])
    with pytest.raises(ValueError, match="l2 must be a number"):
        linear_eval(x, y, x, y, l2=[])
    with pytest.raises(ValueError, match="max_iter"):
        linear_eval(x, y, x, y, max_iter=0)


# ------------------------------------------------------------------ kNN


def brute_force_weighted_knn(xtr, ytr, xte, k, temperature, num_classes):
    xtr, xte = xtr.double(), xte.double()
    preds = []
    for i in range(len(xte)):
        sims = []
        for j in range(len(xtr)):
            sims.append(float(xte[i] @ xtr[j] / (xte[i].norm() * xtr[j].norm())))
        nearest = sorted(range(len(xtr)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[int(ytr[j])] += math.exp(sims[j] / temperature)
        preds.append(votes.index(max(votes)))
    return preds


@pytest.mark.parametrize("test_chunk,train_chunk", [(1024, 65536), (3, 5), (7, 1), (40, 11)])
def test_weighted_knn_matches_brute_force(test_chunk, train_chunk):
    x, y = blobs(n=140, d=5, classes=4, sep=0.7, seed=5)
    xtr, ytr, xte = x[:100], y[:100], x[100:]
    for k, temperature in ((9, 0.07), (1, 0.5), (100, 0.07)):
        want = brute_force_weighted_knn(xtr, ytr, xte, k, temperature, 4)
        got = weighted_knn_predict(xtr, ytr, xte, k=k, temperature=temperature, test_chunk=test_chunk,
                                   train_chunk=train_chunk)
        assert got.tolist() == want


def test_weighted_knn_accuracy_and_errors():
    x, y = blobs(n=200, sep=3.0, seed=6)
    acc = weighted_knn_accuracy(x[:150], y[:150], x[150:], y[150:], k=10)
    want = np.mean(np.array(brute_force_weighted_knn(x[:150], y[:150], x[150:], 10, 0.07, 4)) == y[150:].numpy())
    assert acc == pytest.approx(want) and acc > 0.9
    with pytest.raises(ValueError, match="k must be an int in \\[1, 150\\]"):
        weighted_knn_predict(x[:150], y[:150], x[150:], k=151)
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        weighted_knn_predict(x, y, x, temperature=0)
    with pytest.raises(ValueError, match="test_features must be a 2-D tensor with 6 columns"):
        weighted_knn_predict(x, y, x[:, :2], k=3)
    with pytest.raises(ValueError, match="train_labels must lie in \\[0, 2\\)"):
        weighted_knn_predict(x, y, x, k=3, num_classes=2)
