"""Peak memory of one piece of work: the gradcache study's measurements and
``bench/bench_gradcache.py`` use this one instrument.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` over the allocation
before the work. On CPU it is the peak resident set size (RSS) over the RSS
just before the work: Linux lets a process reset its peak (writing 5 to
``/proc/self/clear_refs``), so an earlier, higher transient (importing torch)
cannot hide the work's own; elsewhere the peak is ``ru_maxrss``, which only
sees work that grows the process beyond every earlier peak. Measure in a
fresh process for numbers that do not depend on what ran before.
"""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass
from typing import Iterator

__all__ = ["status_kib", "trim_heap", "baseline_rss", "peak_rss", "PeakMemory", "peak_memory"]


def status_kib(name: str) -> int | None:
    """A ``/proc/self/status`` entry in KiB (``VmRSS``, ``VmHWM``), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def trim_heap() -> None:
    """Give freed heap back to the OS (glibc's ``malloc_trim``; elsewhere nothing),
    so that work whose memory fits in what was freed before it still shows as RSS growth."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def baseline_rss() -> tuple[int, str]:
    """The RSS in bytes before the work, with the source :func:`peak_rss` must read.

    Trims the heap and resets the peak where Linux allows it (source
    ``"VmHWM after clear_refs"``); otherwise the baseline is ``ru_maxrss``
    itself (source ``"ru_maxrss"``).
    """
    trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = status_kib("VmRSS")
        if rss is not None:
            return rss * 1024, "VmHWM after clear_refs"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def peak_rss(source: str) -> int:
    """The peak RSS in bytes since :func:`baseline_rss` returned ``source``."""
    if source.startswith("VmHWM"):
        hwm = status_kib("VmHWM")
        if hwm is not None:
            return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class PeakMemory:
    """What :func:`peak_memory` measured (bytes); ``step_bytes = peak_bytes - base_bytes``."""

    source: str
    base_bytes: int = 0
    peak_bytes: int = 0

    @property
    def step_bytes(self) -> int:
        return self.peak_bytes - self.base_bytes


@contextlib.contextmanager
def peak_memory(device=None) -> Iterator[PeakMemory]:
    """Measure the peak memory of the block on ``device`` (CPU by default).

    Examples
    --------
    >>> import torch
    >>> with peak_memory() as m:
    ...     x = torch.ones(4 * 2**20)  # 16 MiB, touched
    >>> m.step_bytes >= 0 and m.peak_bytes >= m.base_bytes
    True
    """
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = PeakMemory("torch.cuda.max_memory_allocated", base_bytes=torch.cuda.memory_allocated(device))
    else:
        base, source = baseline_rss()
        result = PeakMemory(source, base_bytes=base)
    yield result
    if cuda:
        torch.cuda.synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        result.peak_bytes = peak_rss(result.source)
