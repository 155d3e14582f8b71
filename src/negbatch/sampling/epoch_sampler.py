"""The machinery every batch sampler of negbatch shares: a plan of global
batches per epoch, computed once (on rank 0) and broadcast, each rank's share
of every global batch, ``set_epoch``, optional re-planning every n batches,
and a position that checkpoints save so that a resumed epoch continues.

A subclass says only how an epoch's batches are composed, in
:meth:`EpochBatchSampler.plan_batches` (and, if it needs the model, in
:meth:`EpochBatchSampler.prepare`, which runs on every rank).

A training loop iterates the sampler itself (or hands it to a DataLoader as
``batch_sampler``); :meth:`EpochBatchSampler.plan` shows the epoch's global
batches before the first one is drawn, and :attr:`EpochBatchSampler.timing`
says how long embedding and planning took.
"""

from __future__ import annotations

from typing import Any, Iterator

import time

import numpy as np
import torch
from torch.utils.data import Sampler

from .. import distributed as nbdist
from .._checks import check_flag, check_positive_int, check_seed, is_int

__all__ = ["EpochBatchSampler", "cut_into_batches"]


def cut_into_batches(
    order: np.ndarray, batch_size: int, drop_last: bool, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Consecutive chunks of ``order``; the short tail is dropped or kept.

    With ``rng`` and ``drop_last``, the ``len(order) % batch_size`` samples
    left out are a run of consecutive entries at a random position of
    ``order`` instead of its end: an order that changes little from epoch to
    epoch (GCBS) would otherwise leave out the same samples every epoch.
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    spare = len(order) % batch_size
    if drop_last and rng is not None and spare:
        start = int(rng.integers(0, len(order) - spare + 1))
        order = np.concatenate([order[:start], order[start + spare :]])
    n_full = len(order) // batch_size
    batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(n_full)]
    if not drop_last and len(order) > n_full * batch_size:
        batches.append(order[n_full * batch_size :])
    return batches


class EpochBatchSampler(Sampler[list[int]]):
    """Base class: yields this rank's share of each planned global batch.

    Parameters
    ----------
    num_samples : int
        Size of the data set (indices ``0 .. num_samples-1``).
    batch_size : int
        The *global* batch size: the samples that are contrasted together
        (after gathering across ranks). Each of the ``num_replicas`` ranks gets
        ``batch_size / num_replicas`` of them; it must divide evenly.
    drop_last : bool
        Drop the short tail batch (as DataLoader's ``drop_last``).
    shuffle_batches : bool
        Shuffle the order of the batches (seeded by ``seed`` and the epoch).
    seed : int
        Seed of every random choice, in ``[0, 2**64)`` (e.g. ``torch.initial_seed()``); the same on every rank.
    refresh_every : int, optional
        Re-plan the batches not yet yielded after every ``refresh_every``
        batches (each sample is still seen exactly once per epoch).
    num_replicas, rank : int, optional
        Default to torch.distributed's world size and rank.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        drop_last: bool = False,
        shuffle_batches: bool = True,
        seed: int = 0,
        refresh_every: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        """Set up the sampler; see Parameters in the class docstring (``help()``
        of the class: :class:`EpochBatchSampler` or the subclass, e.g.
        :class:`~negbatch.sampling.baselines.RandomBatchSampler`)."""
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        if self.batch_size > self.num_samples:
            raise ValueError(
                f"batch_size ({self.batch_size}) is larger than the data set ({self.num_samples} samples); "
                f"use a smaller batch_size"
            )
        self.num_replicas = (check_positive_int(num_replicas, "num_replicas") if num_replicas is not None
                             else nbdist.world_size())
        if rank is not None and not is_int(rank):  # int() read rank=1.7 as rank 1: another rank's share
            raise TypeError(f"rank must be an int (this process's rank) or None (torch.distributed's), got {rank!r}")
        self.rank = int(rank) if rank is not None else nbdist.rank()
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        if self.batch_size % self.num_replicas:
            raise ValueError(
                f"batch_size ({self.batch_size}) is the global batch and must be divisible by the number of "
                f"ranks ({self.num_replicas}); choose a multiple"
            )
        self.drop_last = check_flag(drop_last, "drop_last")
        self.shuffle_batches = check_flag(shuffle_batches, "shuffle_batches")
        self.seed = check_seed(seed)
        self.refresh_every = check_positive_int(refresh_every, "refresh_every") if refresh_every is not None else None
        self.epoch = 0
        self._plan: list[np.ndarray] | None = None
        self._position = 0
        self._refreshed_at = -1  # position of the last refresh in the current plan
        # (epoch, plan, refreshed_at) of the epoch the iteration finished last: a
        # DataLoader with workers runs the sampler ahead of training, past an
        # epoch's end while the trainer still works through its last batches.
        self._finished: tuple[int, list[np.ndarray], int] | None = None
        #: Seconds spent in :meth:`prepare` (embedding) and :meth:`plan_batches` (ordering), in this process.
        self.timing = {"embed_seconds": 0.0, "order_seconds": 0.0}
        #: What :meth:`prepare` returned for the whole data set at the last full plan (None after a
        #: partial refresh): the embeddings of a sampler that embeds, reusable by diagnostics.
        self.last_prepared: Any = None

    # -- what a subclass provides -------------------------------------------------
    def prepare(self, indices: np.ndarray) -> Any:
        """Work that every rank must take part in (embedding); default none."""
        return None

    def plan_batches(self, indices: np.ndarray, prepared: Any, rng: np.random.Generator) -> list[np.ndarray]:
        """The global batches covering ``indices`` (rank 0 only)."""
        raise NotImplementedError

    # -- the epoch ------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (as with DistributedSampler); a new plan follows."""
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._drop_plan()

    def _drop_plan(self) -> None:
        # The refresh marker belongs to the plan: a new epoch refreshes at the same positions.
        self._plan, self._position, self._refreshed_at = None, 0, -1

    def _rng(self, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, salt])

    def _make_plan(self, indices: np.ndarray, salt: int) -> list[np.ndarray]:
        start = time.perf_counter()
        prepared = self.prepare(indices)
        self.timing["embed_seconds"] += time.perf_counter() - start
        self.last_prepared = prepared if len(indices) == self.num_samples else None
        plan = None
        if self.rank == 0 or not nbdist.is_distributed():
            start = time.perf_counter()
            try:
                rng = self._rng(salt)
                plan = [np.asarray(b, dtype=np.int64) for b in self.plan_batches(indices, prepared, rng)]
            except Exception as error:
                # The other ranks wait for the plan: send them the error instead.
                if self.num_replicas > 1:
                    nbdist.broadcast_object(f"{type(error).__name__}: {error}")
                raise
            if self.shuffle_batches:
                plan = [plan[i] for i in rng.permutation(len(plan))]
            self.timing["order_seconds"] += time.perf_counter() - start
        plan = nbdist.broadcast_object(plan) if self.num_replicas > 1 else plan
        if isinstance(plan, str):
            raise RuntimeError(f"rank 0 failed to plan the epoch's batches ({plan}); see rank 0's error")
        return plan

    def _ensure_plan(self) -> list[np.ndarray]:
        if self._plan is None:
            self._plan = self._make_plan(np.arange(self.num_samples, dtype=np.int64), salt=0)
            self._position = 0
        return self._plan

    def plan(self) -> list[np.ndarray]:
        """The current epoch's global batches, planned now if they are not yet.

        A loop that logs something about the epoch's batches before training on
        them (e.g. the global-train gap) calls this first; iterating then
        yields this rank's share of the same batches.
        """
        return list(self._ensure_plan())

    def _refresh(self) -> None:
        """Re-plan the batches not yet yielded, keeping their number."""
        assert self._plan is not None
        rest = self._plan[self._position :]
        if not rest:
            return
        remaining = np.concatenate(rest)
        new = self._make_plan(remaining, salt=self._position)
        self._plan = self._plan[: self._position] + new

    def share_bounds(self, global_length: int) -> tuple[int, int]:
        """``(start, stop)``: the rows of a global batch of ``global_length`` that
        this rank receives (``np.array_split`` order: rank 0 first).

        Examples
        --------
        >>> from negbatch.sampling import RandomBatchSampler
        >>> RandomBatchSampler(20, 9, num_replicas=3, rank=1).share_bounds(10)
        (4, 7)
        """
        base, extra = divmod(global_length, self.num_replicas)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def _share(self, batch: np.ndarray) -> list[int]:
        if self.num_replicas == 1:
            return batch.tolist()
        if len(batch) < self.num_replicas:
            # Only a kept tail can be this short: pad it from the epoch's first
            # samples (as DistributedSampler does) so that every rank gets a batch.
            batch = np.concatenate([batch, self._padding(batch, self.num_replicas - len(batch))])
        start, stop = self.share_bounds(len(batch))
        return batch[start:stop].tolist()

    def _padding(self, batch: np.ndarray, count: int) -> np.ndarray:
        """``count`` samples of the epoch's plan, in plan order, that are not in
        ``batch`` (a sample twice in one global batch would be its own negative)."""
        pool = np.concatenate(self._plan)  # type: ignore[arg-type]
        return pool[~np.isin(pool, batch)][:count]

    def __iter__(self) -> Iterator[list[int]]:
        plan = self._ensure_plan()
        while self._position < len(plan):
            if self.refresh_every and self._position > 0 and self._position % self.refresh_every == 0 \
                    and self._position > self._refreshed_at:
                self._refreshed_at = self._position
                self._refresh()
                plan = self._plan
            batch = plan[self._position]
            self._position += 1
            yield self._share(batch)
        # The epoch is complete: the next iteration plans the next epoch.
        self._finished = (self.epoch, plan, self._refreshed_at)
        self.epoch += 1
        self._drop_plan()

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self, position: int | None = None, epoch: int | None = None) -> dict[str, Any]:
        """The epoch, the position in it and the epoch's plan.

        The plan is saved because it depends on the model at the start of the
        epoch, which a resumed run no longer has. A DataLoader with workers
        runs the sampler ahead of training (it prefetches batches, and may
        already have finished the epoch), so a trainer passes where *it* is:
        ``position``, the steps it completed in the epoch, and ``epoch``, the
        epoch those steps belong to (the one just finished, the current one,
        or, with ``position`` 0, the next). ``kind``, the sampler's class
        name, lets :meth:`load_state_dict` refuse a state of another kind.
        """
        for name, value, what in (("position", position, "steps done in its epoch"), ("epoch", epoch, "epoch")):
            if value is not None and (not is_int(value) or value < 0):
                raise ValueError(f"{name} must be an int >= 0 (the trainer's {what}), got {value!r}")
        pos = self._position if position is None else int(position)
        current = self.epoch if epoch is None else int(epoch)
        plan, refreshed_at = self._plan, self._refreshed_at
        if current == self.epoch - 1 and self._finished is not None and self._finished[0] == current:
            _, plan, refreshed_at = self._finished  # the loader is ahead: the epoch the trainer is in
        elif current == self.epoch + 1 and pos == 0:
            plan = None  # the trainer finished the epoch before the sampler did: the next starts afresh
        elif current != self.epoch:
            raise ValueError(
                f"epoch={current} is not the sampler's epoch ({self.epoch}) nor the one it finished last "
                f"({None if self._finished is None else self._finished[0]}): pass the trainer's epoch"
            )
        if plan is None and pos:
            raise ValueError(f"position={pos} in epoch {current}, but the sampler has not planned that epoch")
        if plan is not None and pos > len(plan):
            # Saved as is, it made a checkpoint that only failed when the run resumed.
            raise ValueError(f"position={pos} is past the end of epoch {current}, which has {len(plan)} batches; "
                             f"pass the number of batches the trainer completed in that epoch")
        return {
            "kind": type(self).__name__,
            "epoch": current,
            "position": pos if plan is not None else 0,
            "plan": None if plan is None else torch.from_numpy(np.concatenate(plan)),
            "plan_sizes": None if plan is None else torch.tensor([len(b) for b in plan], dtype=torch.long),
            "refreshed_at": refreshed_at,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
        }

    def _check_plan(self, plan: Any, plan_sizes: Any) -> tuple[np.ndarray, list[int]]:
        """A saved plan as the sampler makes one: distinct data-set indices
        below ``num_samples``, cut into non-empty batches whose sizes add up
        to it (a checkpoint edited or saved by another data set's sampler
        would otherwise feed a Dataset wrong or repeated samples)."""
        flat = torch.as_tensor(plan)
        sizes = torch.as_tensor(plan_sizes)
        if flat.dim() != 1 or flat.is_floating_point() or flat.dtype == torch.bool:
            raise ValueError(f"state's plan must be a 1-d integer tensor of data-set indices, got "
                             f"{flat.dtype} of shape {tuple(flat.shape)}; pass a dict made by state_dict()")
        if sizes.dim() != 1 or sizes.is_floating_point() or sizes.dtype == torch.bool or \
                (sizes.numel() and int(sizes.min()) < 1) or int(sizes.sum()) != flat.numel():
            raise ValueError(f"state's plan_sizes must be positive batch sizes adding up to the plan's "
                             f"{flat.numel()} indices, got {sizes.tolist()}; pass a dict made by state_dict()")
        flat = flat.numpy().astype(np.int64)
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self.num_samples):
            raise ValueError(f"state's plan holds indices in [{int(flat.min())}, {int(flat.max())}], outside this "
                             f"sampler's [0, {self.num_samples}); was it saved for another data set?")
        if np.unique(flat).size != flat.size:
            raise ValueError("state's plan repeats a data-set index (a plan holds each at most once); "
                             "pass a dict made by state_dict()")
        return flat, sizes.tolist()

    def _check_kind(self, state: dict[str, Any]) -> None:
        """Refuse a state saved by another kind of sampler: its plan (GCBS's
        order, hard-negative clusters) would resume as this one's, and every
        later epoch would be planned differently, without a word. A state
        without ``kind`` (saved before it was recorded) is taken as it is."""
        kind = state.get("kind")
        if kind is not None and kind != type(self).__name__:
            raise ValueError(
                f"state was saved by a {kind}, but this sampler is a {type(self).__name__}: resume with a "
                f"{kind} (the batch sampler the run was started with), or start this one afresh"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next iteration resumes the epoch.
        A state saved by another kind of sampler is refused."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be the dict made by state_dict(), got {type(state).__name__}")
        missing = {"epoch", "position", "plan", "plan_sizes"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; pass a dict made by state_dict()")
        self._check_kind(state)
        for key in ("epoch", "position"):  # 2.7 was cut to 2; -3 failed at the next epoch's plan
            value = state[key]
            if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
                value = value.item()
            if not is_int(value) or value < 0:
                raise ValueError(f"state's {key} must be an int >= 0, got {state[key]!r}; "
                                 f"pass a dict made by state_dict()")
        # A different seed would resume this epoch as saved and plan every later one differently;
        # a different drop_last would resume a plan with a short tail it never yields (or without
        # the samples it keeps), not the len() it reports.
        for key in ("num_samples", "batch_size", "seed", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"state was saved with {key}={state[key]} but this sampler has {key}={getattr(self, key)}"
                )
        # Everything is checked before anything is set: a refused state leaves the sampler as it was.
        if state["plan"] is None:
            self.epoch = int(state["epoch"])
            self._drop_plan()
            return
        flat, sizes = self._check_plan(state["plan"], state["plan_sizes"])
        position = int(state["position"])
        if not 0 <= position <= len(sizes):
            raise ValueError(f"state position {position} is outside the plan of {len(sizes)} batches")
        self.epoch = int(state["epoch"])
        self._refreshed_at = int(state.get("refreshed_at", -1))
        self._plan = list(np.split(flat, np.cumsum(sizes)[:-1])) if sizes else []
        self._position = position
