"""Geometry of representations: intra-class concentration (Mitrovic et al.,
Figures 2-3) and alignment / uniformity (Wang and Isola, 2020).

All distances are Euclidean. Pass L2-normalised features to measure on the
unit sphere (the functions do not normalise for you, except where noted).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import is_int, is_real

__all__ = ["intra_class_distance", "silhouette_score", "alignment", "uniformity"]


def _check(z: Tensor, labels: Tensor | None = None) -> None:
    if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"features must be a 2-D tensor with at least 2 rows, got {getattr(z, 'shape', type(z))}")
    if not torch.isfinite(z).all():
        raise ValueError("features contain NaN or inf")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (z.shape[0],)
                               or labels.is_floating_point() or labels.is_complex()):
        given = getattr(labels, "dtype", type(labels).__name__)
        raise ValueError(f"labels must be an integer tensor of shape ({z.shape[0]},), got {given} of shape "
                         f"{tuple(getattr(labels, 'shape', ()))}")


def _positive(value: object, name: str, what: str) -> float:
    """A finite number > 0 (a float or an int)."""
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 ({what}), got {value!r}")
    return float(value)


def intra_class_distance(z: Tensor, labels: Tensor, *, chunk_size: int = 2048) -> float:
    """Mean over classes of the mean pairwise distance between distinct
    members of the class (classes with one member are skipped). Memory is
    O(chunk_size * n).

    Examples
    --------
    >>> import torch
    >>> from negbatch.diagnostics import intra_class_distance
    >>> z = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 1.0]])
    >>> intra_class_distance(z, torch.tensor([0, 0, 1, 1]))
    3.0
    """
    _check(z, labels)
    chunk_size = _chunk_size(chunk_size)
    z = z.double()
    per_class = []
    for c in labels.unique():
        zc = z[labels == c]
        n = zc.shape[0]
        if n < 2:
            continue
        # The diagonal's distances are 0 (or a rounding of 0: masked, not trusted).
        total = sum(_off_diagonal_rows(torch.cdist(zc[rows], zc), rows, 0.0).sum() for rows in _row_chunks(n, chunk_size))
        per_class.append(total / (n * (n - 1)))
    if not per_class:
        raise ValueError("every class has a single member; intra-class distance is undefined")
    return float(torch.stack(per_class).mean())


def _chunk_size(chunk_size: object) -> int:
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows of distances computed at once), got {chunk_size!r}")
    return int(chunk_size)


def _row_chunks(n: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def _off_diagonal_rows(block: Tensor, rows: slice, fill: float) -> Tensor:
    """Rows ``rows`` of an (n, n) pairwise matrix with each row's own column set to ``fill``."""
    local = torch.arange(block.shape[0], device=block.device)
    block[local, local + rows.start] = fill
    return block


def silhouette_score(z: Tensor, labels: Tensor, *, chunk_size: int = 2048) -> float:
    """Mean silhouette coefficient under the given labels (Euclidean).

    For sample i: a = mean distance to the other members of its class,
    b = smallest mean distance to another class, s = (b - a) / max(a, b);
    s = 0 for members of singleton classes (scikit-learn's convention).
    Memory is O(chunk_size * n).

    Examples
    --------
    >>> import torch
    >>> from negbatch.diagnostics import silhouette_score
    >>> z = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    >>> round(silhouette_score(z, torch.tensor([0, 0, 1, 1])), 4)
    0.8997
    """
    _check(z, labels)
    chunk_size = _chunk_size(chunk_size)
    classes, inverse = labels.unique(return_inverse=True)
    if len(classes) < 2:
        raise ValueError("silhouette needs at least 2 distinct labels")
    z = z.double()
    onehot = torch.nn.functional.one_hot(inverse, len(classes)).double()
    counts = onehot.sum(0)
    scores = []
    for start in range(0, z.shape[0], chunk_size):
        zc, ic = z[start : start + chunk_size], inverse[start : start + chunk_size]
        sums = torch.cdist(zc, z) @ onehot  # (chunk, classes): total distance to each class
        own = counts[ic] - 1
        a = sums.gather(1, ic[:, None]).squeeze(1) / own.clamp_min(1)
        other = sums / counts
        other.scatter_(1, ic[:, None], float("inf"))
        b = other.min(1).values
        s = (b - a) / torch.maximum(a, b).clamp_min(1e-300)
        scores.append(torch.where(own > 0, s, torch.zeros_like(s)))
    return float(torch.cat(scores).mean())


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola alignment: mean ``||z1_i - z2_i||^alpha`` over positive pairs (lower is better).

    Examples
    --------
    >>> import torch
    >>> from negbatch.diagnostics import alignment
    >>> alignment(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    2.0000000000000004
    """
    if not isinstance(z1, Tensor) or not isinstance(z2, Tensor) or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must be tensors of the same shape, got {tuple(getattr(z1, 'shape', ()))} "
                         f"and {tuple(getattr(z2, 'shape', ()))}")
    _check(torch.cat([z1, z2]))
    alpha = _positive(alpha, "alpha", "the power of the distance; Wang and Isola use 2")
    return float((z1.double() - z2.double()).norm(dim=1).pow(alpha).mean())


def uniformity(z: Tensor, t: float = 2.0, *, chunk_size: int = 2048) -> float:
    """Wang & Isola uniformity: ``log mean_{i != j} exp(-t ||z_i - z_j||^2)`` (lower is more uniform).

    Memory is O(chunk_size * n): the log-sum-exp runs over blocks of rows.

    Examples
    --------
    >>> import torch
    >>> from negbatch.diagnostics import uniformity
    >>> z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> uniformity(z, t=2.0)
    -8.0
    """
    _check(z)
    t = _positive(t, "t", "the Gaussian kernel's scale; Wang and Isola use 2")
    chunk_size = _chunk_size(chunk_size)
    z = z.double()
    n = z.shape[0]
    blocks = [
        torch.logsumexp(_off_diagonal_rows(torch.cdist(z[rows], z).pow_(2).mul_(-t), rows, -math.inf).reshape(-1), 0)
        for rows in _row_chunks(n, chunk_size)
    ]
    return float(torch.logsumexp(torch.stack(blocks), 0) - math.log(n * (n - 1)))
