"""Symmetric query-document losses: both directions from one product against
direction by direction.

In one process the document-to-query logits are the query-to-document ones
transposed; since 2026-12-04 InfoNCE, DCL, GlobalInfoNCE and SigLIP compute them once
(``negbatch.losses._pair``: one product and two backward products where the
directions ran six). This bench races each loss's symmetric call against the
same call with the pair switched off (the kernels as they ran before), side
by side in one process, in a fresh random order every round (bench/_order.py),
after checking that both sides give the same value and gradients
(bench/_agree.py). Forward + backward, d = 128, B query-document pairs
(2B embeddings), ``labels`` of 50 classes so that InfoNCE takes the layout at
every size (a plain InfoNCE call without them takes its short path up to
B = 2048, which computes the product once already).

Goal: the pair is never slower (ratio <= 1.03, the spread of these calls).

On CUDA (``--device cuda``, bench/gpu_check.sh) each call is timed to the device's completion.

Usage: python bench/bench_symmetric.py [--sizes 256 1024 4096] [--repeats 9] [--keep-freed-memory]
       [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

from _agree import check_same
from _order import rounds

import torch

from negbatch import DCL, GlobalInfoNCE, InfoNCE, SigLIP
from negbatch.allocator import freed_memory_kept
from negbatch.losses import _pair

GOAL = 1.03


@contextlib.contextmanager
def per_direction():
    """The symmetric call's directions computed one by one (before 2026-12-04)."""
    saved = _pair.shares_one_product
    _pair.shares_one_product = lambda *args: False
    try:
        yield
    finally:
        _pair.shares_one_product = saved


def takes_the_pair(call) -> bool:
    """Whether ``call`` computes its directions by the pair (InfoNCE below 2^14 logits a direction
    takes its two cross-entropies on both sides: the same code, not a race)."""
    apply, taken = _pair.PairOfDirections.apply, []
    _pair.PairOfDirections.apply = lambda *args: taken.append(1) or apply(*args)
    try:
        call()
    finally:
        _pair.PairOfDirections.apply = apply
    return bool(taken)


def race(name: str, loss_fn, b: int, dim: int, repeats: int, device: torch.device) -> float | None:
    gen = torch.Generator().manual_seed(b)
    q, d = (torch.randn(b, dim, generator=gen).to(device).requires_grad_() for _ in range(2))
    labels = torch.arange(b, device=device) % 50
    extra = (torch.arange(b, device=device),) if isinstance(loss_fn, GlobalInfoNCE) else ()
    loss_fn.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def call():
        return loss_fn(q, d, *extra, labels=labels)

    def separate():
        with per_direction():
            return call()

    # The global loss's state moves with every call: compare on a fresh state each side.
    if isinstance(loss_fn, GlobalInfoNCE):
        state = {k: v.clone() for k, v in loss_fn.state_dict().items()}

        def fresh(fn):
            def run():
                loss_fn.load_state_dict(state)
                return fn()
            return run

        check_same(name, fresh(call), fresh(separate), [q, d])
    else:
        check_same(name, call, separate, [q, d])
    if not takes_the_pair(call):
        print(f"{b:>6} {name:>14}   both sides the per-direction code (the pair does not apply at this size)")
        return None
    times: dict[str, list[float]] = {"pair": [], "per direction": []}
    sides = {"pair": call, "per direction": separate}
    for round_, order in rounds(list(sides), repeats):
        for side in order:
            q.grad = d.grad = None
            sync()
            start = time.perf_counter()
            sides[side]().backward()
            sync()
            if round_:
                times[side].append(time.perf_counter() - start)
    pair, apart = (statistics.median(times[k]) * 1e3 for k in ("pair", "per direction"))
    ratio = pair / apart
    print(f"{b:>6} {name:>14} {pair:10.2f} {apart:14.2f} {ratio:7.2f}  {'met' if ratio <= GOAL else 'NOT met'}",
          flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="B, pairs per batch")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="race under negbatch.allocator.freed_memory_kept, as negbatch's training runs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then every call is timed to the device's completion)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, d={args.dim}, median of {args.repeats} "
          f"(fewer above B = 2048), load average {os.getloadavg()[0]:.1f}, "
          f"freed memory {'kept' if args.keep_freed_memory else 'under glibc settings'}")
    print(f"{'B':>6} {'loss':>14} {'pair ms':>10} {'per dir. ms':>14} {'ratio':>7}  goal <= {GOAL}")
    losses = {
        "InfoNCE": lambda b: InfoNCE(form="query_document", symmetric=True),
        "DCL": lambda b: DCL(form="query_document", symmetric=True),
        "GlobalInfoNCE": lambda b: GlobalInfoNCE(num_samples=b, form="query_document", symmetric=True),
        "SigLIP": lambda b: SigLIP(form="query_document", symmetric=True),
    }
    worst = 0.0
    with freed_memory_kept(device) if args.keep_freed_memory else contextlib.nullcontext():
        for b in args.sizes:
            repeats = args.repeats if b <= 2048 else max(3, args.repeats // 2)
            for name, make in losses.items():
                ratio = race(name, make(b), b, args.dim, repeats, device)
                worst = worst if ratio is None else max(worst, ratio)
    print(f"worst pair / per direction = {worst:.2f} (goal <= {GOAL}: {'met' if worst <= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
