"""Run a test body in real torch.distributed processes (gloo backend, CPU).

``run_distributed(fn, world_size=2, *args)`` starts ``world_size`` processes,
initialises a gloo process group in each, calls ``fn(rank, world_size, *args)``
and re-raises the first failure in the test process. ``fn`` must be a
module-level function (it is pickled where processes are spawned). Results can
be returned through files in a temporary directory passed in ``args``.
``timeout`` (seconds) bounds every collective: a rank left waiting for a peer
that never joins raises instead of blocking the test (torch's default is 30
minutes), for tests of what should not hang.

The processes are forked where the platform allows it (Linux): they inherit the
test process's imports (torch, negbatch, the test module), which a spawned
process loads again, for seconds that dominated every distributed test. Each
forked process draws a fresh seed for torch's global generator, as a spawned one
does, instead of the copy of the test process's state (the same on every rank).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# fork: Linux. macOS lists it too, but forking a process that has loaded its system frameworks is unsafe there.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def _worker(rank: int, world_size: int, port: int, error_dir: str, fn, args, timeout: float | None = None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    torch.seed()  # forked: not the parent's generator state, the same on every rank
    bound = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, **bound
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # nobody tears the group down while a peer still uses it
    except BaseException:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    dist.destroy_process_group()
    # Leave without interpreter shutdown: at exit, C++ static destructors can meet a
    # still-joinable gloo/autograd thread and abort ("terminate called without an
    # active exception") after the test body has passed. The work is done and
    # reported; exit status 0 is all the parent needs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size: int = 2, *args, timeout: float | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.start_processes(_worker, args=(world_size, _free_port(), tmp, fn, args, timeout), nprocs=world_size,
                               join=True, start_method=START_METHOD)
        except Exception as exc:
            details = "".join(
                open(os.path.join(tmp, name)).read() for name in sorted(os.listdir(tmp)) if name.startswith("rank")
            )
            raise AssertionError(f"a distributed worker failed:\n{details}") from exc
