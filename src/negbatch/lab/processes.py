"""The processes of one run: one, or several started by ``torchrun``.

Under ``torchrun --nproc-per-node N`` (or a multi-node torchrun) every process
runs the same :func:`negbatch.lab.train`; this module is what makes them one
run: the process group (NCCL on CUDA, gloo on CPU), each process's device,
decisions taken by rank 0 and shared (the run folder's checks, a checkpoint to
resume from, when to stop), and values all ranks agree on.

The trap it exists to avoid: a check that fails on rank 0 alone (a folder of
another configuration, a damaged checkpoint) must fail on every rank, or the
others wait forever in their next collective. :meth:`Processes.on_main` runs a
function on rank 0 and hands its result, or its exception, to every rank.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from .. import distributed as nbdist
from .folder import main_process, resolve_device  # main_process: there for the stop request

__all__ = ["Processes", "launched_by_torchrun", "main_process"]

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclass
class Processes:
    """This process's place in the run: ``rank`` of ``world_size``, and the
    ``local_rank`` that picks its GPU.

    Use :meth:`start` to join torchrun's process group (or an existing one).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def current(cls) -> "Processes":
        """This process's place in an initialised process group (or alone)."""
        if nbdist.is_distributed():
            return cls(nbdist.world_size(), nbdist.rank(), int(os.environ.get("LOCAL_RANK", nbdist.rank())))
        return cls()

    @classmethod
    def start(cls, device: str) -> "Processes":
        """This process's place: an initialised process group is used as it is;
        under torchrun one is created (NCCL for CUDA devices, else gloo)."""
        if nbdist.is_distributed() or not launched_by_torchrun():
            return cls.current()
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            # torch's own error named the variable only, not why a process group was wanted or what to do.
            raise ValueError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} and RANK={os.environ['RANK']} are set, as torchrun sets them "
                f"for one of several processes, but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                "not: start the command with torchrun (torchrun --nproc-per-node N -m negbatch.cli ...), or unset "
                "WORLD_SIZE and RANK to run in one process")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_world_size(), dist.get_rank(), local_rank, owns_group=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    def device(self, name: str) -> torch.device:
        """The device of this process: ``auto`` -> CUDA when available; under
        several processes ``cuda`` means this process's GPU (``cuda:LOCAL_RANK``)."""
        device = resolve_device(name)
        if device.type == "cuda" and device.index is None and self.several:
            return torch.device("cuda", self.local_rank)
        return device

    def check_shares(self, cfg: Any) -> None:
        """Refuse a configuration (a :class:`~negbatch.lab.TrainConfig`) whose batches the processes
        cannot share evenly, before its data are loaded: each process trains ``batch_size / N`` rows of
        every global batch (``N`` more processes than rows would leave some with none), and accumulated
        chunks ``chunk_size / N`` rows. (The batch sampler refused it once the data were loaded; a study
        only when that run started, after training the runs before it.)"""
        if not self.several:
            return
        b, n = cfg.batch_size, self.world_size
        if b % n:
            none = f", {n - b} of them with no row of a batch" if b < n else ""
            lower = b // n * n
            choices = f"{lower} or {lower + n}" if lower else f"{n} or {2 * n}"
            raise ValueError(f"batch_size={b} does not split over the {n} processes{none}: each trains an equal share "
                             f"of every batch (batch_size is the global batch), so it must be a multiple of {n} "
                             f"(e.g. {choices}); change it, or the number of processes (torchrun --nproc-per-node)")
        if cfg.chunk_size and cfg.chunk_method == "accumulate":
            from .chunked import check_accumulated_chunks

            check_accumulated_chunks(cfg.chunk_size, n)

    @contextlib.contextmanager
    def warnings_on_main(self) -> Iterator[None]:
        """Python's warnings (a chunked BatchNorm, torch's own) shown by rank 0 alone: every process
        runs the same code and warned alike, once per process."""
        if self.is_main:
            yield
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0; every rank returns its result or raises its error."""
        if not self.several:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
                error = exc
        result, error = nbdist.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def check_all(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank (e.g. loading the data); if it fails on any
        rank, every rank raises (the first failing rank's error)."""
        if not self.several:
            return fn()
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn()
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
            error = exc
        errors = [None] * self.world_size
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return result

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true if it is true on any rank (one small all-reduce)."""
        if not self.several:
            return list(flags)
        t = torch.tensor([float(f) for f in flags])
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def mean(self, value: torch.Tensor) -> float:
        """The mean over ranks of a scalar tensor (each rank's share of a loss)."""
        if not self.several:
            return float(value)
        t = value.detach().reshape(1).clone()
        dist.all_reduce(t)
        return float(t) / self.world_size

    def mean_each(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """The mean over ranks of each value (one collective for all of them)."""
        if not self.several or not values:
            return dict(values)
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world_size).tolist()))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.several:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        return nbdist.broadcast_object(obj) if self.several else obj

    def barrier(self) -> None:
        if self.several:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this run created it.

        A run's DistributedDataParallel lives on in reference cycles after the
        run; collected only at the interpreter's exit, after its group was
        destroyed, it aborted the process now and then ("terminate called
        without an active exception", SIGABRT: 3 of 16 tiny studies under
        torchrun on 2 busy cores, and the launcher then stopped the other
        rank). Collected before the group goes: 0 of 48."""
        if self.owns_group:
            gc.collect()
            dist.destroy_process_group()
