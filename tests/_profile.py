"""What a call runs, counted by torch's profiler (tests of how a loss computes, not of its value)."""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


def matrix_products(fn) -> int:
    """Matrix products (aten::mm and aten::addmm) run by ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
