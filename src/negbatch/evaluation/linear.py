"""Linear evaluation: multinomial logistic regression on frozen features.

Written in torch (full-batch L-BFGS on the L2-regularised cross-entropy, in
float64) rather than calling scikit-learn, so that the library stays
importable with torch/numpy/scipy only and the probe runs on the features'
device. The objective is convex; the tests compare it with scikit-learn's
``LogisticRegression`` on the same data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear_probe", "fit_logistic_regression"]


def _check_xy(x: Tensor, y: Tensor, xname: str, yname: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{xname} must be a non-empty 2-D tensor (n, d), got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{yname} must be an integer tensor of shape ({x.shape[0]},), got {getattr(y, 'shape', type(y))}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{xname} contains NaN or inf")


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
    _check_xy(train_features, train_labels, "train_features", "train_labels")
    _check_xy(test_features, test_labels, "test_features", "test_labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features and test_features have different widths: {train_features.shape[1]} vs {test_features.shape[1]}"
        )
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, got {l2!r}")
    xtr, xte = train_features.double(), test_features.double()
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-8)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    w, b = fit_logistic_regression((xtr - mean) / std, train_labels.long(), num_classes, l2=l2, max_iter=max_iter)
    pred = (((xte - mean) / std) @ w + b).argmax(1)
    return float((pred == test_labels.to(pred.device)).double().mean())
