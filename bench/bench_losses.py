"""Forward + backward time of InfoNCE with K sampled negatives vs the full loss.

For 2B anchors of width d, every variant is timed side by side in this one
process, in a fresh random order every round (bench/_order.py), and reported as the
median time divided by the median time of a plain hand-written full-batch
NT-Xent (the baseline a user would otherwise write) and by negbatch's own
``negatives="all"`` (the alternative a negbatch user has). Goals (issue 2):
sampled K never slower than negbatch's full loss; at 2B = 8192, K = 64 at most
0.5x the hand-written one.

On CUDA (``--device cuda``, bench/gpu_check.sh) each call is timed to the
device's completion; the draw there is Floyd's K steps in torch ops, a few
small kernels each, so sampled K's cost at small sizes is a measurement of
its own (not yet made: no device had been lent when this option was added).

Usage: python bench/bench_losses.py [--sizes 2048 8192] [--ks 1 16 64 256] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _agree import check_same
from _order import rounds

import torch
import torch.nn.functional as F

from negbatch import InfoNCE


def plain_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192], help="2B values")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then every call is timed to the device's completion)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tau = 0.1
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, d={args.dim}, "
          f"median of {args.repeats}")
    print(f"{'2B':>6} {'variant':>14} {'ms':>9} {'ratio to plain':>15} {'ratio to all':>13}")
    verdicts = []
    for two_b in args.sizes:
        g = torch.Generator().manual_seed(0)
        z1 = torch.randn(two_b // 2, args.dim, generator=g).to(device).requires_grad_()
        z2 = torch.randn(two_b // 2, args.dim, generator=g).to(device).requires_grad_()
        variants = {"plain NT-Xent": lambda: plain_nt_xent(z1, z2, tau), "negbatch all": None}
        losses = {"negbatch all": InfoNCE(temperature=tau)}
        for k in args.ks:
            losses[f"negbatch K={k}"] = InfoNCE(temperature=tau, negatives=k)
        gen = torch.Generator(device).manual_seed(1)
        for name, fn in losses.items():
            variants[name] = (lambda fn=fn: fn(z1, z2, generator=gen))
        # The one race of equal computations (sampled K is another estimator):
        # checked once before timing.
        print(f"{'':>6} " + check_same(f"2B={two_b} negbatch all / plain NT-Xent", variants["negbatch all"],
                                       variants["plain NT-Xent"], [z1, z2]))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep, order in rounds(list(variants), args.repeats):  # first round warms up
            for name in order:  # a fresh order every round (see _order.py)
                run = variants[name]
                sync()
                t0 = time.perf_counter()
                run().backward()
                sync()
                elapsed = time.perf_counter() - t0
                z1.grad = z2.grad = None
                if rep:
                    times[name].append(elapsed)
        base = statistics.median(times["plain NT-Xent"])
        full = statistics.median(times["negbatch all"])
        for name, ts in times.items():
            ratio, to_all = statistics.median(ts) / base, statistics.median(ts) / full
            print(f"{two_b:>6} {name:>14} {1000 * statistics.median(ts):>9.1f} {ratio:>15.3f} {to_all:>13.3f}")
            if name.startswith("negbatch K="):
                verdicts.append(("never slower than negbatch's full loss", two_b, name, to_all, to_all <= 1.0))
                if two_b == 8192 and name == "negbatch K=64":
                    verdicts.append(("2B=8192, K=64 <= 0.5x", two_b, name, ratio, ratio <= 0.5))
    print()
    for goal, two_b, name, ratio, ok in verdicts:
        print(f"{'PASS' if ok else 'MISS'}  {goal}: 2B={two_b} {name} ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
