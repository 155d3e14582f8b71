"""Before a race: do its two sides compute the same thing?

A speed ratio compares two computations only if they are the same one: the
same value and the same gradients (same temperature, normalisation,
reduction, candidates, directions; a learnable scale on both sides or on
neither). :func:`check_same` calls each side once, outside the timing, and
raises :class:`RaceMismatch` when the values or the gradients differ, or
when one side gives a gradient to a tensor that the other does not (work
that only one side does), so that a change to a bench cannot make a race
time two different computations without the bench failing.

The check runs on the race's own inputs (float32 at the races' sizes), so
its tolerance is relative to the larger of the two sides, with a small
absolute part for values and gradients that underflow to about zero (the
tau = 0.01 races on trained-like embeddings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

RTOL, ATOL = 1e-3, 1e-6


class RaceMismatch(AssertionError):
    """The two sides of a race do not compute the same thing."""


def _run(call: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list]:
    for leaf in leaves:
        leaf.grad = None
    value = call()
    value.backward()
    grads = [None if leaf.grad is None else leaf.grad.detach().clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    return value.detach(), grads


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> tuple[bool, float]:
    a, b = a.double(), b.double()
    scale = max(float(a.abs().max()), float(b.abs().max())) if a.numel() else 0.0
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    return diff <= rtol * scale + atol, diff / max(scale, 1e-300)


def check_same(
    label: str,
    ours: Callable[[], torch.Tensor],
    peer: Callable[[], torch.Tensor],
    ours_leaves: Sequence[torch.Tensor],
    peer_leaves: Sequence[torch.Tensor] | None = None,
    *,
    others: Sequence[torch.Tensor] = (),
    gradients: bool = True,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> str:
    """Call each side once (forward and backward) and compare.

    ``ours_leaves[i]`` and ``peer_leaves[i]`` (default: the same tensors)
    are the corresponding inputs and parameters: each pair must receive the
    same gradient, or neither a gradient. ``others``: further tensors of the
    race (e.g. the other pairs' parameters), which neither side may give a
    gradient. ``gradients=False`` compares the values only (say why where it
    is called). Returns a one-line summary; raises :class:`RaceMismatch`.
    """
    peer_leaves = list(ours_leaves if peer_leaves is None else peer_leaves)
    ours_leaves, others = list(ours_leaves), list(others)
    if len(ours_leaves) != len(peer_leaves):
        raise ValueError(f"{label}: {len(ours_leaves)} leaves of ours against {len(peer_leaves)} of the peer")
    every = list({id(t): t for t in ours_leaves + peer_leaves + others}.values())
    value_ours, grads_ours = _run(ours, every)
    value_peer, grads_peer = _run(peer, every)
    index = {id(t): i for i, t in enumerate(every)}
    problems = []
    ok, rel = _close(value_ours, value_peer, rtol, atol)
    if not ok:
        problems.append(f"values {float(value_ours):.6g} (ours) and {float(value_peer):.6g} (peer)")
    worst = 0.0
    if gradients:
        for i, (a, b) in enumerate(zip(ours_leaves, peer_leaves)):
            ga, gb = grads_ours[index[id(a)]], grads_peer[index[id(b)]]
            if (ga is None) != (gb is None):
                problems.append(f"leaf {i}: a gradient on {'ours' if gb is None else 'the peer'}'s side only")
            elif ga is not None:
                same, rel_g = _close(ga, gb, rtol, atol)
                worst = max(worst, rel_g)
                if not same:
                    problems.append(f"leaf {i}: gradients differ (max difference {rel_g:.1e} of the largest)")
    for name, grads, own in (("ours", grads_ours, ours_leaves), ("the peer", grads_peer, peer_leaves)):
        # Gradients are expected on the matched leaves (compared above), or, when only the
        # values are compared, on the side's own leaves; anywhere else they are extra work.
        expected = {id(t) for t in (ours_leaves + peer_leaves if gradients else own)}
        for t, g in zip(every, grads):
            if g is not None and id(t) not in expected:
                problems.append(f"{name} gives a gradient to a tensor the other side does not use "
                                f"(shape {tuple(t.shape)}): work only one side does")
    if problems:
        raise RaceMismatch(f"race '{label}' compares different computations: " + "; ".join(problems))
    what = f"value and gradients (worst {worst:.0e})" if gradients else "value (gradients not compared)"
    return f"same {what}: {label}"


def check_same_gradients(label: str, ours: Sequence[torch.Tensor | None], peer: Sequence[torch.Tensor | None],
                         *, rtol: float = RTOL, atol: float = ATOL) -> str:
    """The same check on gradients already computed (e.g. a model's
    parameters after each side's step): ``ours[i]`` against ``peer[i]``, all
    of them as one vector (a tensor whose gradient is tiny is judged against
    the largest gradient, not its own)."""
    if len(ours) != len(peer):
        raise ValueError(f"{label}: {len(ours)} gradients of ours against {len(peer)} of the peer")
    problems = [f"tensor {i}: a gradient on {'ours' if b is None else 'the peer'}'s side only"
                for i, (a, b) in enumerate(zip(ours, peer)) if (a is None) != (b is None)]
    both = [(a, b) for a, b in zip(ours, peer) if a is not None and b is not None]
    worst = 0.0
    if both:
        same, worst = _close(torch.cat([a.reshape(-1).double() for a, _ in both]),
                             torch.cat([b.reshape(-1).double() for _, b in both]), rtol, atol)
        if not same:
            problems.append(f"gradients differ (max difference {worst:.1e} of the largest)")
    if problems:
        raise RaceMismatch(f"race '{label}' compares different computations: " + "; ".join(problems))
    return f"same gradients (worst {worst:.0e}): {label}"
