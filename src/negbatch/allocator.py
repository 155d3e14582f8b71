"""Freed memory kept in the process while CPU work that frees and asks again
for the same large blocks runs (glibc): ``negbatch.lab.train``'s loop and the
block search of :func:`negbatch.evaluation.retrieval.relevant_ranks`.

Why: every training step frees its activations and asks for the same sizes
again at the next (every block of the search its scores). glibc's malloc
serves a block above its mmap threshold (raised dynamically, at most 32 MiB)
with a fresh ``mmap`` and unmaps it when it is freed, and hands the heap's
free top back to the OS above its trim threshold: the next step then touches
fresh pages, a page fault and a page of zeros each.
On ``bench/bench_trainer.py``'s CIFAR-sized run (ResNet-18 at a quarter of its
widths, batch 256, a 2-core CPU, 2026-12-04) that was 220,000 faults a step in
the minimal loop and 400,000 in the lab's (whose other allocations left glibc
a lower threshold): about a quarter of the step. With mmap off and the trim
threshold at its maximum, freed blocks stay in the heap for the next step
(under 100 faults a step). The search of 2,000 queries in 100,000 documents
(1024 x 16384 blocks) took 5.7-6.7 s under glibc's settings, 2.2-2.4 s with
freed memory kept. What is computed does not change: an allocator
decides where numbers live, not what they are.

The setting is the process's, so it is applied for the duration of a block
(nested blocks: the outermost decides) and undone after it: glibc's limits
back to their defaults and the kept memory given back (``malloc_trim``).
glibc cannot resume its dynamic threshold once it has been set, so after the
block blocks above the threshold it had reached are mapped afresh each time.
Elsewhere (macOS, Windows, musl) the block runs unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from typing import Iterator

import torch

__all__ = ["freed_memory_kept", "keeping_freed_memory"]

# mallopt's parameters (malloc.h) and glibc's defaults for them on 64-bit Linux.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}
_KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # no mmap; a heap top trimmed never (mallopt takes an int)

_depth = 0


def _glibc():
    """The C library if it is glibc (``mallopt``, ``malloc_trim``), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keeping_freed_memory() -> bool:
    """Whether a :func:`freed_memory_kept` block is running and glibc took its settings."""
    return _depth > 0


@contextlib.contextmanager
def freed_memory_kept(device: torch.device | str | None = None) -> Iterator[bool]:
    """Keep freed memory in the process for the block (see the module's docstring).

    ``device``: the work's device; off a CPU (the host's heap is not where its
    blocks live) the block runs unchanged. Yields whether the setting applies
    (glibc took it), False elsewhere.

    Examples
    --------
    >>> import torch
    >>> from negbatch.allocator import freed_memory_kept
    >>> with freed_memory_kept():
    ...     for _ in range(3):  # the second and third 64 MiB come from the first's pages
    ...         x = torch.ones(16 * 2**20); del x
    """
    global _depth
    if device is not None and torch.device(device).type != "cpu":
        yield False
        return
    if _depth:  # an outer block set it and will undo it
        yield True
        return
    libc = _glibc()
    applied = libc is not None and [libc.mallopt(k, v) for k, v in _KEEP.items()] == [1] * len(_KEEP)
    if libc is not None and not applied:  # refused in part: glibc's own settings again
        for k, v in _DEFAULTS.items():
            libc.mallopt(k, v)
    _depth += applied
    try:
        yield applied
    finally:
        if applied:
            _depth -= 1
            for k, v in _DEFAULTS.items():
                libc.mallopt(k, v)
            libc.malloc_trim(0)
