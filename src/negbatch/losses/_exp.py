"""``exp`` for the fused kernels, flushing terms too small to matter to zero.

On the CPU, torch's ``exp`` of a float32 argument below about -87.3 (float64:
-708), whose result is subnormal or zero, takes a path about 200 times slower
than other arguments (torch 2.13, AVX-512, measured 2026-12-02: 2.1 ms
against 10 us for 65,536 float32 elements; ``-inf`` itself 20 times), and
subnormal numbers slow every later product they enter (a gradient times
1/(N tau), a matrix product). At a CLIP-like logit scale (1/tau near 100,
where CLIP's learned scale ends) with trained embeddings most terms of a
softmax's ``exp(l - max)`` are that small: a two-view InfoNCE at 2B = 2048
took 1.4 s instead of 31 ms. Here the arguments are raised to a floor (-69;
float64: -600) before the ``exp``, and the floor's value is subtracted from
every term and negatives set to zero: each term below exp(-69) = 1e-30
(float64: 1e-261) becomes exactly 0 (so does ``-inf``'s: the excluded
entries stay zero), every other term changes by at most that much, which no
sum of terms up to 1 can resolve (float32 resolves 1.2e-7 of it), and what
stays is a normal number far from the subnormal range for every factor a
gradient multiplies it by; a NaN stays NaN. The result is about what a CPU
flushing subnormals to zero computes, on the fast path, without changing the
process's floating-point mode. The kernels skip the floor (two passes, 2-5%
of a small call) when a bound on the logits shows no argument can reach it:
unit rows at 1/tau up to about 30.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["exp_floored", "exp_floored_", "lowest_log_softmax"]

#: Per dtype, the smallest argument kept; below it a term is zero.
_FLOOR = {torch.float32: -69.0, torch.float64: -600.0}
#: exp of each floor, as torch computes it: the value a floored term takes before it is zeroed.
_AT_FLOOR = {dtype: float(torch.tensor(floor, dtype=dtype).exp()) for dtype, floor in _FLOOR.items()}


def _floored(x: Tensor, lowest: float | None) -> bool:
    """Whether ``x`` takes the floor: CPU float32/float64 whose finite
    arguments may lie below it (``lowest``: a bound under them, None: none
    known). Above the floor the two passes it costs (2-5% of a small call)
    buy nothing."""
    floor = _FLOOR.get(x.dtype)
    return floor is not None and x.device.type == "cpu" and (lowest is None or lowest < floor)


def exp_floored_(x: Tensor, lowest: float | None = None) -> Tensor:
    """``x.exp_()`` with every term below ``exp(floor)`` exactly zero (see the
    module docstring). Returns ``x``."""
    if not _floored(x, lowest):
        return x.exp_()
    # Less the floor's own value, then negatives to zero: a NaN stays NaN (a
    # threshold would zero it), every other term changes by 1e-30 (1e-261) at most.
    return x.clamp_min_(_FLOOR[x.dtype]).exp_().sub_(_AT_FLOOR[x.dtype]).relu_()


def exp_floored(x: Tensor, lowest: float | None = None) -> Tensor:
    """:func:`exp_floored_` into a new tensor."""
    if not _floored(x, lowest):
        return x.exp()
    return x.clamp_min(_FLOOR[x.dtype]).exp_().sub_(_AT_FLOOR[x.dtype]).relu_()


def lowest_log_softmax(logit_bound: float, columns: int) -> float:
    """A bound under the finite ``l - max(l)`` and ``log_softmax(l)`` of
    ``columns`` logits within ``[-logit_bound, logit_bound]``."""
    return -2.0 * logit_bound - math.log(max(columns, 1))

