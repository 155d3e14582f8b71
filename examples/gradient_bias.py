"""Measure the gradient bias of minibatch contrastive losses on real data.

On scikit-learn's digits (1,797 images; random clustered data when
scikit-learn is missing), with two fixed noisy views per image and a small
MLP encoder:

1. at initialisation: relative bias and variance of the plain minibatch loss
   and of the corrected surrogate with nu at the exact Z, against batch size;
2. after training briefly with GlobalInfoNCE: the corrected surrogate with the
   running nu it holds, against the plain loss.

Usage: python examples/gradient_bias.py [NUM_BATCHES]   (default 200; ~1 min on one CPU core)
"""

from __future__ import annotations

import sys

import torch

from negbatch import GlobalInfoNCE
from negbatch.diagnostics import bias_curve, exact_global_gradient, gradient_bias


def load() -> torch.Tensor:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(10, 64, generator=g)
        return centers[torch.arange(1797) % 10] + 0.5 * torch.randn(1797, 64, generator=g)
    return torch.tensor(load_digits().data, dtype=torch.float32) / 16.0


def main(num_batches: int) -> None:
    x = load()
    g = torch.Generator().manual_seed(0)
    views = tuple(x + 0.2 * torch.randn(x.shape, generator=g) for _ in range(2))
    n = x.shape[0]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    loss = GlobalInfoNCE(n, temperature=0.1, gamma=0.9)

    print(f"N={n}, tau={loss.temperature}, {num_batches} batches per row")
    print(f"{'batch':>6} {'estimator':>16} {'rel. bias':>10} {'noise floor':>12} {'debiased':>9} {'rel. var':>9}")
    for row in bias_curve(model, loss, views, [8, 32, 128, 512], num_batches):
        print(f"{row.batch_size:>6} {row.estimator:>16} {row.relative_bias:>10.4f} {row.noise_floor:>12.4f} "
              f"{row.relative_bias_debiased:>9.4f} {row.relative_variance:>9.4f}")

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch_size = 32
    for epoch in range(3):
        order = torch.randperm(n, generator=g)
        logged = []
        for s in range(0, n - batch_size + 1, batch_size):
            idx = order[s : s + batch_size]
            opt.zero_grad()
            loss(model(views[0][idx]), model(views[1][idx]), idx).backward()  # one call = one E-step
            opt.step()
            logged.append(float(loss.last_infonce))
        print(f"epoch {epoch}: mean batch InfoNCE {sum(logged) / len(logged):.3f}")
    exact = exact_global_gradient(model, loss, views)
    print(f"after training (global loss {exact.loss:.3f}), batch {batch_size}:")
    for est in ("plain", "corrected", "corrected_fixed", "corrected_exact"):
        row = gradient_bias(model, loss, views, batch_size, num_batches, estimator=est, exact=exact)
        print(f"{row.batch_size:>6} {row.estimator:>16} {row.relative_bias:>10.4f} {row.noise_floor:>12.4f} "
              f"{row.relative_bias_debiased:>9.4f} {row.relative_variance:>9.4f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
