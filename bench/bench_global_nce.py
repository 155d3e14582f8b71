"""Step time of the bias-corrected global loss against plain InfoNCE, side by side.

Two measurements at batch size B (default 1024), embedding dimension 128,
two-view form, all negatives:

* loss only: forward + backward of the loss on given embeddings;
* encoder step: a small MLP encoder (784 -> 512 -> 128) forward, loss,
  backward and an SGD step, i.e. what one training step costs.

Goal: corrected / plain <= 1.1 for both. Variants race in one process, in a
fresh random order every round (bench/_order.py), and the median of the
repeats is reported.

Usage: python bench/bench_global_nce.py [B] [REPEATS]
       (env NEGBATCH_BENCH_B / NEGBATCH_BENCH_REPEATS work too; e.g. B=128 for a smoke run)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _order import rounds  # noqa: E402

from negbatch import GlobalInfoNCE, InfoNCE  # noqa: E402

GOAL = 1.1


def _args() -> tuple[int, int]:
    b = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("NEGBATCH_BENCH_B", 1024))
    r = int(sys.argv[2]) if len(sys.argv) > 2 else int(os.environ.get("NEGBATCH_BENCH_REPEATS", 15))
    return b, r


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    batch, repeats = _args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dim, num_samples = 128, 50 * batch
    torch.manual_seed(0)
    plain = InfoNCE(temperature=0.1)
    corrected = GlobalInfoNCE(num_samples, temperature=0.1, gamma=0.9).to(device)
    encoder = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, dim)).to(device)
    opt = torch.optim.SGD(encoder.parameters(), lr=1e-3)
    x1, x2 = torch.randn(batch, 784, device=device), torch.randn(batch, 784, device=device)
    z1 = torch.randn(batch, dim, device=device, requires_grad=True)
    z2 = torch.randn(batch, dim, device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    # Drawn up front: the data loader's job, not the loss's.
    pool = [torch.randperm(num_samples, generator=gen)[:batch].to(device) for _ in range(8)]
    calls = iter(range(10**9))

    def indices() -> torch.Tensor:
        return pool[next(calls) % len(pool)]

    def loss_only(name: str) -> None:
        # Fresh gradients, as a training step's zero_grad gives: accumulating
        # into .grad would time an extra add per call on both sides.
        z1.grad = z2.grad = None
        out = plain(z1, z2) if name == "plain" else corrected(z1, z2, indices())
        out.backward()

    def encoder_step(name: str) -> None:
        opt.zero_grad(set_to_none=True)
        a, b = encoder(x1), encoder(x2)
        out = plain(a, b) if name == "plain" else corrected(a, b, indices())
        out.backward()
        opt.step()

    print(f"device={device}, B={batch}, d={dim}, N={num_samples}, repeats={repeats}, threads={torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'measurement':<16}{'plain InfoNCE ms':>18}{'GlobalInfoNCE ms':>18}{'ratio':>8}{'goal':>8}")
    for label, fn in (("loss fwd+bwd", loss_only), ("encoder step", encoder_step)):
        times: dict[str, list[float]] = {"plain": [], "corrected": []}
        for rep, order in rounds(list(times), repeats):  # round 0 warms up
            for name in order:
                _sync(device)
                start = time.perf_counter()
                fn(name)
                _sync(device)
                if rep:
                    times[name].append(time.perf_counter() - start)
        p, c = statistics.median(times["plain"]), statistics.median(times["corrected"])
        ratio = c / p
        verdict = "ok" if ratio <= GOAL else "MISSED"
        print(f"{label:<16}{1e3 * p:>18.2f}{1e3 * c:>18.2f}{ratio:>8.2f}{'<=' + str(GOAL):>8} {verdict}")


if __name__ == "__main__":
    main()
