"""The loss tests' inputs: seeded float64 embeddings that require gradients."""

from __future__ import annotations

import torch


def float64_views(n: int, d: int = 5, seed: int = 0, hard: int = 0) -> list[torch.Tensor]:
    """Two (n, d) inputs (views, or queries and documents) and, with ``hard``, (n, hard, d) hard negatives."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    if hard:
        xs.append(torch.randn(n, hard, d, generator=g, dtype=torch.float64, requires_grad=True))
    return xs
