"""k-nearest-neighbour accuracy on frozen features (cosine similarity).

* :func:`knn_accuracy`: a majority vote among the k nearest (small data).
* :func:`weighted_knn_accuracy` / :func:`weighted_knn_predict`: the weighted
  kNN monitor of Wu et al. (2018), streamed over chunks of test and training
  features, for data at the papers' scale.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_positive_int, check_temperature, is_int
from .linear import _check_xy, check_two_classes

__all__ = ["knn_accuracy", "weighted_knn_accuracy", "weighted_knn_predict"]


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
    training points (ties of the vote go to the smallest label; which of
    several training points at exactly the same similarity is among the ``k``
    is left to ``torch.topk``, not decided by their index).

    Test points are processed ``chunk_size`` at a time, so memory is
    O(chunk_size * n_train). Similarities are computed in float32 whatever
    the features' dtype: features whose cosines differ only below about
    1e-6 (a large component shared by all) lose their order; centre them
    first.

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
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train_features and test_features have different widths: "
                         f"{train_features.shape[1]} vs {test_features.shape[1]}")
    check_two_classes(train_labels)
    if not is_int(k) or not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k must be an int in [1, {train_features.shape[0]}] (the training set size), got {k!r}")
    k, chunk_size = int(k), check_positive_int(chunk_size, "chunk_size")
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


def weighted_knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.07,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    test_chunk: int = 1024,
    train_chunk: int = 65536,
) -> Tensor:
    """Weighted kNN predictions (Wu et al., 2018), streamed in chunks.

    Each test point's ``k`` most cosine-similar training points vote for their
    class with weight ``exp(s / temperature)``; the class with the largest sum
    wins (ties: the smallest label; training points at exactly the same
    similarity as the k-th are kept in ``torch.topk``'s choice). Test points are taken ``test_chunk`` at a
    time and, for each, the training points ``train_chunk`` at a time, keeping
    a running top-k: memory is O(test_chunk x (train_chunk + k)) on the
    device, and the training features need not fit there (each chunk is moved
    when needed; on a GPU move them there first if they fit).

    Returns
    -------
    LongTensor (n_test,) on the CPU.

    Examples
    --------
    >>> import torch
    >>> from negbatch.evaluation import weighted_knn_predict
    >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> weighted_knn_predict(train, torch.tensor([0, 0, 1]), torch.tensor([[0.1, 1.0], [1.0, 0.2]]), k=2).tolist()
    [1, 0]
    """
    _check_xy(train_features, train_labels, "train_features", "train_labels")
    if not isinstance(test_features, Tensor) or test_features.ndim != 2 or test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"test_features must be a 2-D tensor with {train_features.shape[1]} columns (the training "
                         f"features' width), got {getattr(test_features, 'shape', type(test_features))}")
    if not torch.isfinite(test_features).all():
        raise ValueError("test_features contains NaN or inf")
    n_train = train_features.shape[0]
    if not is_int(k) or not 1 <= k <= n_train:
        raise ValueError(f"k must be an int in [1, {n_train}] (the training set size), got {k!r}")
    temperature = check_temperature(temperature)
    k = int(k)
    test_chunk = check_positive_int(test_chunk, "test_chunk")
    train_chunk = check_positive_int(train_chunk, "train_chunk")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes}) (num_classes), got "
                         f"{int(train_labels.min())}..{int(train_labels.max())}")
    device = torch.device(device) if device is not None else test_features.device
    labels = train_labels.to(device).long()
    preds = []
    for t0 in range(0, test_features.shape[0], test_chunk):
        q = F.normalize(test_features[t0 : t0 + test_chunk].to(device, torch.float32), dim=1)
        best_s = q.new_empty((q.shape[0], 0))
        best_y = labels.new_empty((q.shape[0], 0))
        for s0 in range(0, n_train, train_chunk):
            keys = F.normalize(train_features[s0 : s0 + train_chunk].to(device, torch.float32), dim=1)
            sims = q @ keys.T
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            # merge with the running top-k: the k largest of (old k) + (this chunk's k)
            cand_s = torch.cat([best_s, top.values], dim=1)
            cand_y = torch.cat([best_y, labels[s0 + top.indices]], dim=1)
            keep = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_s, best_y = keep.values, cand_y.gather(1, keep.indices)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float32, device=device)
        # Weights relative to each row's nearest neighbour: exp(1 / 0.01) overflows float32,
        # and tied infinite votes would elect the smallest label. The shift leaves the vote.
        weights = torch.exp((best_s - best_s.max(1, keepdim=True).values) / temperature)
        votes.scatter_add_(1, best_y, weights)
        preds.append(votes.argmax(1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def weighted_knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    **kwargs,
) -> float:
    """Top-1 accuracy of :func:`weighted_knn_predict` (the kNN monitor of
    Wu et al., 2018: k = 200, temperature 0.07 by default; similarities in
    float32, as :func:`knn_accuracy`'s).

    Examples
    --------
    >>> import torch
    >>> from negbatch.evaluation import weighted_knn_accuracy
    >>> y = torch.arange(100) % 2
    >>> x = torch.stack([y * 2.0 - 1, torch.ones(100)], 1)
    >>> weighted_knn_accuracy(x[:50], y[:50], x[50:], y[50:], k=5)
    1.0
    """
    _check_xy(train_features, train_labels, "train_features", "train_labels")
    _check_xy(test_features, test_labels, "test_features", "test_labels")
    check_two_classes(train_labels)
    if "num_classes" not in kwargs:
        kwargs["num_classes"] = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    pred = weighted_knn_predict(train_features, train_labels, test_features, **kwargs)
    return float((pred == test_labels.cpu()).double().mean())
