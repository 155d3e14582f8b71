"""A short tour of negbatch's losses: runs in seconds on a CPU.

Trains a small MLP encoder on two noisy views of random cluster data with the
full InfoNCE loss and with 4 sampled negatives per anchor, then ReLIC, and
prints the losses as they fall.
"""

import torch
from torch import nn

from negbatch import InfoNCE, ReLIC

torch.manual_seed(0)
centers = torch.randn(10, 32)
labels = torch.randint(0, 10, (1024,))
data = centers[labels] + 0.3 * torch.randn(1024, 32)


def two_views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x + 0.2 * torch.randn_like(x), x + 0.2 * torch.randn_like(x)


for name, loss_fn in [
    ("InfoNCE, all negatives", InfoNCE(temperature=0.2)),
    ("InfoNCE, 4 sampled negatives", InfoNCE(temperature=0.2, negatives=4)),
    ("ReLIC, 16 sampled negatives", ReLIC(temperature=0.2, alpha=1.0, negatives=16)),
]:
    torch.manual_seed(1)
    encoder = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for step in range(60):
        batch = data[torch.randint(0, 1024, (128,))]
        v1, v2 = two_views(batch)
        loss = loss_fn(encoder(v1), encoder(v2), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"{name:32s} loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f}")
