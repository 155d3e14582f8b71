"""k-nearest-neighbour accuracy on frozen features (cosine similarity)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import _check_xy

__all__ = ["knn_accuracy"]


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy of a majority vote among the ``k`` most cosine-similar
    training points (ties go to the smallest label).

    Test points are processed ``chunk_size`` at a time, so memory is
    O(chunk_size * n_train).

    Examples
    --------
    >>> import torch
    >>> from negbatch.evaluation import knn_accuracy
    >>> y = torch.arange(100) % 2
    >>> x = torch.stack([y * 2.0 - 1, torch.ones(100)], 1)
    >>> knn_accuracy(x[:50], y[:50], x[50:], y[50:], k=5)
    1.0
    """
    _check_xy(train_features, train_labels, "train_features", "train_labels")
    _check_xy(test_features, test_labels, "test_features", "test_labels")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k must be an int in [1, {train_features.shape[0]}] (the training set size), got {k!r}")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, test.shape[0], chunk_size):
        sims = test[start : start + chunk_size] @ train.T
        idx = sims.topk(k, dim=1).indices
        votes = F.one_hot(train_labels[idx].long(), num_classes).sum(1)
        pred = votes.argmax(1)
        correct += int((pred == test_labels[start : start + chunk_size]).sum())
    return correct / test.shape[0]
