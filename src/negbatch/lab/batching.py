"""Batch samplers that plan from embeddings (GCBS, hard-negative batches) in the
trainer, and the per-epoch diagnostics of any sampler (global-train gap,
embedding and ordering time).

The library samplers (:mod:`negbatch.sampling`) are DataLoader batch samplers
that plan an epoch on their first ``next`` and advance by themselves. The
trainer instead asks for ``batches()`` and indexes them step by step. The
adapter :class:`PlannedBatchSampler` bridges the two *lazily*: batch ``b`` is
drawn from the library sampler only when the trainer asks for it, after
``b`` optimizer steps, so ``refresh_every`` re-plans with the model of that
moment and a checkpoint saves the exact position.

What the samplers embed: the **un-augmented** training images, the
projection-head output (what the loss sees), with the anchor and positive
side both equal to it. It costs one forward pass, draws no random numbers
(so a run's augmentations are the same whatever the sampler) and does not
depend on an augmentation seed. The price: the N diagonal entries of
``X Yᵀ`` are self-similarities equal to 1, always above the threshold, so
of the ``(1 - q) N²`` kept entries only ``(1 - q) N² - N`` are edges
between distinct samples: at small N choose ``q`` well below the paper's
0.999 (``1 - q`` several times ``1 / N``).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..diagnostics import global_train_gap
from ..sampling import EpochBatchSampler, GCBSampler, HardNegativeBatchSampler, embed_dataset
from .config import TrainConfig

__all__ = ["PlannedBatchSampler", "build_planned_sampler", "epoch_diagnostics", "image_embed_fn", "same_class_pairs"]


class _Timed:
    """Mixin for a library sampler: times the embedding (``prepare``) and the
    planning (``plan_batches``) and keeps the embeddings of the last full
    pass, which the gap diagnostic reuses."""

    def _init_timing(self) -> None:
        self.embed_seconds = 0.0
        self.order_seconds = 0.0
        self.last_embeddings: Tensor | None = None

    def prepare(self, indices: np.ndarray) -> Any:
        t0 = time.perf_counter()
        out = super().prepare(indices)  # type: ignore[misc]
        self.embed_seconds += time.perf_counter() - t0
        # A refresh embeds only the samples not yet seen; keep full passes only.
        full = len(indices) == self.num_samples  # type: ignore[attr-defined]
        self.last_embeddings = (out[0] if isinstance(out, tuple) else out) if full else None
        return out

    def plan_batches(self, indices: np.ndarray, prepared: Any, rng: np.random.Generator) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = super().plan_batches(indices, prepared, rng)  # type: ignore[misc]
        self.order_seconds += time.perf_counter() - t0
        return out


class _TimedGCBSampler(_Timed, GCBSampler):
    pass


class _TimedHardNegativeBatchSampler(_Timed, HardNegativeBatchSampler):
    pass


class _LazyBatches(Sequence[Tensor]):
    """The epoch's batches as the trainer indexes them, drawn one at a time
    from the library sampler's iterator (``start`` on a mid-epoch resume)."""

    def __init__(self, owner: "PlannedBatchSampler", start: int) -> None:
        self._owner, self._start = owner, start
        self._iter = iter(owner.sampler)
        self._drawn: list[Tensor] = []
        self._len = len(owner.sampler)
        if start < self._len:
            self._draw()  # plans the epoch now, so its diagnostics can be logged before the first step

    def _draw(self) -> None:
        self._drawn.append(torch.as_tensor(next(self._iter), dtype=torch.long))
        if self._start + len(self._drawn) == self._len:
            # Finish the library's epoch now so that its state says "next epoch".
            for _ in self._iter:
                raise RuntimeError("the sampler yielded more batches than its length")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, b: int) -> Tensor:  # type: ignore[override]
        if not self._start <= b < self._len:
            raise IndexError(f"batch {b} is outside [{self._start}, {self._len}) of this epoch")
        while self._start + len(self._drawn) <= b:
            self._draw()
        self._owner._served = max(self._owner._served, b + 1)
        return self._drawn[b - self._start]


class PlannedBatchSampler:
    """The trainer's sampler interface (``set_epoch``, ``batches``, ``len``,
    ``state_dict``) around a library :class:`~negbatch.sampling.EpochBatchSampler`.

    The checkpointed state is the library sampler's: the epoch, the epoch's
    plan (it depends on the model at the epoch's start, which a resumed run no
    longer has) and the number of batches the trainer has taken.

    Examples
    --------
    >>> from negbatch.sampling import RandomBatchSampler
    >>> s = PlannedBatchSampler(RandomBatchSampler(10, 4, drop_last=True, seed=0))
    >>> s.set_epoch(0)
    >>> [len(b) for b in s.batches()]
    [4, 4]
    """

    def __init__(self, sampler: EpochBatchSampler) -> None:
        if not isinstance(sampler, EpochBatchSampler):
            raise TypeError(f"sampler must be a negbatch.sampling.EpochBatchSampler, got {type(sampler).__name__}")
        self.sampler = sampler
        self._served = 0
        self._timing_reported = {"embed_seconds": 0.0, "order_seconds": 0.0}

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._served = 0

    def batches(self) -> Sequence[Tensor]:
        state = self.sampler.state_dict()
        start = int(state["position"]) if state["plan"] is not None else 0
        self._served = start
        return _LazyBatches(self, start)

    def epoch_plan(self) -> list[Tensor] | None:
        """Every batch of the current epoch's plan (None before it is planned)."""
        state = self.sampler.state_dict()
        if state["plan"] is None:
            return None
        return list(torch.split(state["plan"], state["plan_sizes"].tolist()))

    def timing(self) -> dict[str, float]:
        """Seconds spent embedding and ordering so far (in this process)."""
        return {"embed_seconds": getattr(self.sampler, "embed_seconds", 0.0),
                "order_seconds": getattr(self.sampler, "order_seconds", 0.0)}

    def timing_since_last_call(self) -> dict[str, float]:
        """Seconds spent embedding and ordering since the previous call."""
        now = self.timing()
        delta = {k: now[k] - self._timing_reported[k] for k in now}
        self._timing_reported = now
        return delta

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict(position=self._served)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._served = int(state["position"]) if state["plan"] is not None else 0


def image_embed_fn(model: nn.Module, train_x: Tensor, *, two_sided: bool = True):
    """``embed_fn(indices)`` for the library samplers: the projections of the
    un-augmented images, as the pair ``(z, z)`` (or ``z`` alone)."""

    def embed_fn(indices: Tensor):
        z = model(train_x[indices.to(train_x.device)])
        return (z, z) if two_sided else z

    return embed_fn


def build_planned_sampler(cfg: TrainConfig, train_x: Tensor, model: nn.Module) -> PlannedBatchSampler:
    """The ``gcbs`` or ``hard`` sampler of a :class:`~negbatch.lab.TrainConfig`.

    Like the trainer's random sampler, it drops the short tail batch, so every
    sampler takes the same number of steps per epoch.
    """
    n = train_x.shape[0]
    if cfg.batch_size > n:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {n} training samples; lower batch_size")
    common = dict(drop_last=True, seed=cfg.seed, refresh_every=cfg.refresh_every or None, num_replicas=1, rank=0,
                  model=model, chunk_size=1024)
    if cfg.sampler == "gcbs":
        sampler: EpochBatchSampler = _TimedGCBSampler(image_embed_fn(model, train_x), n, cfg.batch_size,
                                                      q=cfg.gcbs_q, **common)
    elif cfg.sampler == "hard":
        sampler = _TimedHardNegativeBatchSampler(image_embed_fn(model, train_x, two_sided=False), n,
                                                 cfg.batch_size, **common)
    else:
        raise ValueError(f"sampler={cfg.sampler!r} does not plan from embeddings; expected gcbs or hard")
    sampler._init_timing()
    return PlannedBatchSampler(sampler)


def same_class_pairs(batches: Sequence[Tensor], labels: Tensor) -> float:
    """Fraction of the in-batch pairs (i != j) whose labels agree: with labels
    as classes, the share of in-batch negatives that are false negatives.

    Examples
    --------
    >>> import torch
    >>> same_class_pairs([torch.tensor([0, 1]), torch.tensor([2, 3])], torch.tensor([5, 5, 5, 6]))
    0.5
    """
    same = pairs = 0
    for b in batches:
        counts = torch.bincount(labels[torch.as_tensor(b).to(labels.device)].long())
        same += int((counts * (counts - 1)).sum())
        pairs += len(b) * (len(b) - 1)
    return same / pairs if pairs else float("nan")


def epoch_diagnostics(cfg: TrainConfig, sampler: Any, batches: Sequence[Tensor], model: nn.Module, train_x: Tensor,
                      labels: Tensor | None = None) -> dict[str, float]:
    """What the trainer logs at the start of an epoch, once its batches are planned.

    ``embed_seconds`` / ``order_seconds``: time the sampler spent embedding the
    data and ordering it for this epoch (samplers that plan from embeddings).
    With ``cfg.log_gap``: ``gap``, ``gap_global_loss``, ``gap_train_loss`` of
    :func:`~negbatch.diagnostics.global_train_gap` on this epoch's batches and
    the current model's embeddings of the un-augmented images (the sampler's
    own embeddings when it has them), ``same_class_pairs`` (given ``labels``:
    :func:`same_class_pairs` of the batches) and ``gap_seconds``, their cost,
    which is not part of training.
    """
    row: dict[str, float] = {}
    if isinstance(sampler, PlannedBatchSampler):
        row.update(sampler.timing_since_last_call())
    if cfg.log_gap:
        t0 = time.perf_counter()
        plan = sampler.epoch_plan() if isinstance(sampler, PlannedBatchSampler) else list(batches)
        z = getattr(sampler.sampler, "last_embeddings", None) if isinstance(sampler, PlannedBatchSampler) else None
        if z is None:
            z, _ = embed_dataset(image_embed_fn(model, train_x, two_sided=False), np.arange(train_x.shape[0]),
                                 model=model, two_sided=False, shard=False)
        result = global_train_gap(z, plan, cfg.temperature)
        row.update({"gap": result.gap, "gap_global_loss": result.global_loss, "gap_train_loss": result.train_loss})
        if labels is not None:
            row["same_class_pairs"] = same_class_pairs(plan, labels)
        row["gap_seconds"] = time.perf_counter() - t0
    return row
