"""Linear evaluation: multinomial logistic regression on frozen features.

Written in torch (full-batch L-BFGS on the L2-regularised cross-entropy)
rather than calling scikit-learn, so that the library stays importable with
torch/numpy/scipy only and the probe runs on the features' device. The
objective is convex; the tests compare it with scikit-learn's
``LogisticRegression`` on the same data.

* :func:`linear_probe`: float64, for small data (the digits).
* :func:`linear_eval`: float32 on the device, chunked, with an optional L2
  grid chosen on a validation split: the protocol at the papers' scale.
"""

from __future__ import annotations

import math
import numbers

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_positive_int, check_seed, is_int, is_real

__all__ = ["linear_probe", "linear_eval", "fit_logistic_regression"]


def _check_xy(x: Tensor, y: Tensor, xname: str, yname: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{xname} must be a non-empty 2-D tensor (n, d), got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32):
        given = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{yname} must be an int64 or int32 tensor of shape ({x.shape[0]},), one class index per "
                         f"row of {xname}, got {given}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{xname} contains NaN or inf")
    if len(y) and int(y.min()) < 0:
        # cross_entropy would skip -100 silently and fail on other negatives far from here.
        raise ValueError(f"{yname} must be class indices >= 0, got {int(y.min())}; drop unlabeled samples first")


def _check_splits(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor) -> None:
    _check_xy(train_features, train_labels, "train_features", "train_labels")
    _check_xy(test_features, test_labels, "test_features", "test_labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features and test_features have different widths: {train_features.shape[1]} vs {test_features.shape[1]}"
        )
    check_two_classes(train_labels)


def _check_l2(l2: object) -> float:
    """An L2 penalty: a finite number >= 0 (an infinite one pins W at 0, and
    L-BFGS fails on it with an overflow far from here)."""
    if not is_real(l2) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0 (the L2 penalty), got {l2!r}")
    return float(l2)


def check_two_classes(train_labels: Tensor) -> None:
    """A classifier of one training class predicts it everywhere: its accuracy
    would be that class's share of the test split, not a measurement."""
    if int(train_labels.min()) == int(train_labels.max()):
        raise ValueError(f"train_labels hold one class only ({int(train_labels.min())}); a probe needs at least 2")


def fit_logistic_regression(
    x: Tensor, y: Tensor, num_classes: int, *, l2: float = 1e-4, max_iter: int = 200
) -> tuple[Tensor, Tensor]:
    """Minimise mean cross-entropy + ``l2/2 * ||W||^2`` over (W, b) with L-BFGS.

    Returns ``(W, b)`` with ``W`` of shape (d, num_classes), in float64.
    """
    x = x.double()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    l2: float = 1e-4,
    max_iter: int = 100,
) -> float:
    """Top-1 test accuracy of a multinomial logistic regression on frozen features.

    Features are standardised with the training split's mean and standard
    deviation first (the probe's regularisation then means the same thing for
    every encoder).

    Parameters
    ----------
    train_features, test_features : Tensor (n, d)
    train_labels, test_labels : int Tensor (n,)
    l2 : float, default 1e-4
        L2 penalty on the weights (mean loss + l2/2 ||W||^2).
    max_iter : int, default 100
        L-BFGS iterations.

    Examples
    --------
    >>> import torch
    >>> from negbatch.evaluation import linear_probe
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(200) % 2
    >>> x = torch.randn(200, 5, generator=g) + 3 * y[:, None]
    >>> linear_probe(x[:100], y[:100], x[100:], y[100:]) > 0.95
    True
    """
    _check_splits(train_features, train_labels, test_features, test_labels)
    l2 = _check_l2(l2)
    if not is_int(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int (L-BFGS iterations), got {max_iter!r}")
    max_iter = int(max_iter)
    xtr, xte = train_features.double(), test_features.double()
    mean, std = xtr.mean(0), xtr.std(0, unbiased=False).clamp_min(1e-8)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    w, b = fit_logistic_regression((xtr - mean) / std, train_labels.long(), num_classes, l2=l2, max_iter=max_iter)
    pred = (((xte - mean) / std) @ w + b).argmax(1)
    return float((pred == test_labels.to(pred.device)).double().mean())


def _fit_chunked(
    x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int, chunk_size: int,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, float, int]:
    n, d = x.shape
    if init is None:
        w = torch.zeros(d, num_classes, dtype=x.dtype, device=x.device)
        b = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    else:
        w, b = (t.clone() for t in init)
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=1e-6,
                            tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        # Summed chunk by chunk: only chunk_size x num_classes logits exist at a time.
        for start in range(0, n, chunk_size):
            part = F.cross_entropy(x[start : start + chunk_size] @ w + b, y[start : start + chunk_size], reduction="sum") / n
            part.backward()
            total += part.detach()
        reg = 0.5 * l2 * (w * w).sum()
        reg.backward()
        return total + reg.detach()

    opt.step(closure)
    w, b = w.detach(), b.detach()
    with torch.no_grad():
        final = 0.5 * l2 * float((w * w).sum())
        for start in range(0, n, chunk_size):
            final += float(F.cross_entropy(x[start : start + chunk_size] @ w + b, y[start : start + chunk_size],
                                           reduction="sum")) / n
    iterations = opt.state[opt._params[0]].get("n_iter", 0)
    return w, b, final, int(iterations)


def _accuracy(x: Tensor, y: Tensor, w: Tensor, b: Tensor, chunk_size: int) -> float:
    correct = 0
    for start in range(0, x.shape[0], chunk_size):
        pred = (x[start : start + chunk_size] @ w + b).argmax(1)
        correct += int((pred == y[start : start + chunk_size]).sum())
    return correct / x.shape[0]


def linear_eval(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    l2: float | Sequence[float] = 1e-4,
    max_iter: int = 500,
    device: torch.device | str | None = None,
    chunk_size: int = 16384,
    val_fraction: float = 0.2,
    seed: int = 0,
    return_details: bool = False,
) -> float | dict[str, Any]:
    """The linear evaluation protocol at scale: a multinomial logistic regression
    on frozen features, fitted on the device.

    The same objective as :func:`linear_probe` (features standardised with the
    training split's statistics; mean cross-entropy + ``l2/2 ||W||^2``),
    minimised by full-batch L-BFGS in float32 on ``device`` with the loss and
    gradient accumulated ``chunk_size`` rows at a time. The problem is convex,
    so this reaches the same optimum as any mini-batch schedule would approach,
    with no learning rate or epoch count to tune; 50,000 x 2,048 features take
    a few hundred passes of two matrix products each (seconds on a GPU). The
    features must fit on the device (50,000 x 2,048 float32: 0.4 GB).

    Parameters
    ----------
    train_features, test_features : Tensor (n, d)
    train_labels, test_labels : int Tensor (n,)
    l2 : float or sequence of float, default 1e-4
        The L2 penalty. A sequence: each value is fitted on a seeded
        ``1 - val_fraction`` of the training features (from the largest
        penalty down, each warm-starting the next) and scored on the rest;
        the best is refitted on all of them.
    max_iter : int, default 500
        L-BFGS iterations per fit.
    device : device, optional
        Default: the training features' device.
    chunk_size : int, default 16384
    val_fraction : float, default 0.2
    seed : int, default 0
        Seeds the validation split.
    return_details : bool, default False
        Return a dict (``accuracy``, ``l2``, ``loss``, ``iterations``,
        ``val_accuracy`` per l2 when a sequence is given) instead of the accuracy.

    Examples
    --------
    >>> import torch
    >>> from negbatch.evaluation import linear_eval
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(300) % 3
    >>> x = torch.randn(300, 8, generator=g) + 4 * torch.nn.functional.one_hot(y, 8)
    >>> linear_eval(x[:200], y[:200], x[200:], y[200:]) > 0.9
    True
    >>> linear_eval(x[:200], y[:200], x[200:], y[200:], l2=[1e-1, 1e-3], return_details=True)["l2"] in (1e-1, 1e-3)
    True
    """
    _check_splits(train_features, train_labels, test_features, test_labels)
    grid = [l2] if isinstance(l2, numbers.Real) else list(l2) if hasattr(l2, "__iter__") else []
    if not grid:
        raise ValueError(f"l2 must be a number >= 0 or a non-empty sequence of them, got {l2!r}")
    grid = [_check_l2(v) for v in grid]
    max_iter = check_positive_int(max_iter, "max_iter")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    seed = check_seed(seed)
    if len(grid) > 1 and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    device = torch.device(device) if device is not None else train_features.device
    xtr = train_features.to(device, torch.float32)
    mean, std = xtr.mean(0), xtr.std(0, unbiased=False).clamp_min(1e-8)
    xtr = (xtr - mean) / std
    ytr = train_labels.to(device).long()
    xte = (test_features.to(device, torch.float32) - mean) / std
    yte = test_labels.to(device).long()
    num_classes = int(max(int(ytr.max()), int(yte.max()))) + 1

    details: dict[str, Any] = {}
    best = grid[0]
    if len(grid) > 1:
        perm = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(seed)).to(device)
        n_val = max(1, int(round(val_fraction * xtr.shape[0])))
        if n_val >= xtr.shape[0]:  # every penalty would be fitted on no row
            raise ValueError(f"val_fraction={val_fraction} holds out all {xtr.shape[0]} training rows for validation, "
                             "leaving none to fit the penalties on; lower it")
        val, fit = perm[:n_val], perm[n_val:]
        scores: dict[float, float] = {}
        init = None
        for value in sorted(grid, reverse=True):
            w, b, _, _ = _fit_chunked(xtr[fit], ytr[fit], num_classes, float(value), max_iter, chunk_size, init)
            init = (w, b)
            scores[value] = _accuracy(xtr[val], ytr[val], w, b, chunk_size)
        best = max(sorted(grid, reverse=True), key=lambda v: scores[v])  # ties: the larger penalty
        details["val_accuracy"] = scores
    w, b, loss, iterations = _fit_chunked(xtr, ytr, num_classes, float(best), max_iter, chunk_size)
    accuracy = _accuracy(xte, yte, w, b, chunk_size)
    if not return_details:
        return accuracy
    details.update({"accuracy": accuracy, "l2": best, "loss": loss, "iterations": iterations})
    return details
