"""Baselines for GCBS behind the same interface (:class:`EpochBatchSampler`):
random batches, hard-negative batches (k-means clusters), and random batches
without duplicate keys (for text pairs where the same text occurs twice).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

from .._checks import check_positive_int, is_int
from .embedding import EmbedFn, embed_dataset
from .epoch_sampler import EpochBatchSampler, cut_into_batches

__all__ = ["RandomBatchSampler", "HardNegativeBatchSampler", "NoDuplicateBatchSampler", "kmeans"]


class RandomBatchSampler(EpochBatchSampler):
    """Uniformly random batches, a new permutation every epoch.

    Epoch ``e``'s permutation is ``torch.randperm`` with a generator seeded by
    ``(seed * 1_000_003 + e) % 2**64``: a function of the seed and the epoch alone, as
    with torch's ``DistributedSampler``, so resuming needs only the epoch. With
    ``generator=`` instead, each epoch draws its permutation from that running
    generator (as torch's ``RandomSampler`` does); its state is part of
    :meth:`state_dict`.

    Parameters
    ----------
    num_samples, batch_size : int
    generator : torch.Generator, optional
        Draw every epoch's permutation from this generator.
    drop_last, shuffle_batches, seed, refresh_every, num_replicas, rank
        As for :class:`EpochBatchSampler` (``shuffle_batches`` adds nothing to
        a random permutation; pass False to keep the permutation's order).

    Examples
    --------
    >>> from negbatch import RandomBatchSampler
    >>> sampler = RandomBatchSampler(10, 4, seed=1)
    >>> sorted(i for b in sampler for i in b) == list(range(10))
    True
    >>> import torch
    >>> order = torch.randperm(10, generator=torch.Generator().manual_seed(1 * 1_000_003 + 0))
    >>> fixed = RandomBatchSampler(10, 5, seed=1, shuffle_batches=False)
    >>> [b for b in fixed] == [order[:5].tolist(), order[5:].tolist()]
    True
    """

    def __init__(
        self, num_samples: int, batch_size: int, *, generator: torch.Generator | None = None, **kwargs: Any
    ) -> None:
        super().__init__(num_samples, batch_size, **kwargs)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def plan_batches(self, indices: np.ndarray, prepared: Any, rng: np.random.Generator) -> list[np.ndarray]:
        g = self.generator or torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**64)
        order = indices[torch.randperm(len(indices), generator=g).numpy()]
        return cut_into_batches(order, self.batch_size, self.drop_last)

    def state_dict(self, position: int | None = None, epoch: int | None = None) -> dict[str, Any]:
        state = super().state_dict(position, epoch)
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.generator is not None:
            if "generator" not in state:
                raise ValueError("state holds no generator state: it was saved by a sampler without generator=")
            self.generator.set_state(state["generator"])


def kmeans(x: Tensor, k: int, *, iters: int = 20, generator: torch.Generator | None = None) -> Tensor:
    """Plain k-means (Lloyd, k-means++ start) on the rows of ``x``.

    Parameters
    ----------
    x : Tensor
        ``(N, d)`` points.
    k : int
        Number of clusters, ``1 <= k <= N``.
    iters : int
        Lloyd iterations (stops early when assignments no longer change).
    generator : torch.Generator, optional
        Seeds the k-means++ start.

    Returns
    -------
    Tensor
        ``(N,)`` int64 cluster labels in ``[0, k)``.

    Examples
    --------
    >>> import torch
    >>> x = torch.cat([torch.zeros(5, 2), torch.ones(5, 2)])
    >>> labels = kmeans(x, 2, generator=torch.Generator().manual_seed(0))
    >>> len(set(labels[:5].tolist())), len(set(labels[5:].tolist())), bool(labels[0] != labels[5])
    (1, 1, True)
    """
    n = x.shape[0]
    if not is_int(k) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}], got {k!r}")
    if not is_int(iters) or iters < 1:
        raise ValueError(f"iters must be an int >= 1 (Lloyd iterations; every point needs a label), got {iters!r}")
    k, iters = int(k), int(iters)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or inf: k-means needs finite points (check the embeddings)")
    x = x.double()
    gen = generator or torch.Generator().manual_seed(0)
    centres = x[torch.randint(n, (1,), generator=gen)]
    dist = torch.cdist(x, centres).squeeze(1) ** 2
    for _ in range(1, k):  # k-means++: next centre with probability ∝ squared distance
        w = dist.clamp_min(0)
        pick = torch.multinomial(w / w.sum(), 1, generator=gen) if w.sum() > 0 else torch.randint(n, (1,), generator=gen)
        centres = torch.cat([centres, x[pick]])
        dist = torch.minimum(dist, (torch.cdist(x, x[pick]).squeeze(1)) ** 2)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return labels


class HardNegativeBatchSampler(EpochBatchSampler):
    """Hard-negative batches: k-means on the anchor embeddings, then batches
    filled from one cluster at a time (clusters and members in random order),
    so that in-batch negatives are near neighbours.

    Parameters
    ----------
    embed_fn : callable
        As for :class:`~negbatch.sampling.gcbs.GCBSampler`; may return one
        tensor (the anchors) or a pair, of which the anchors are clustered.
    num_samples, batch_size : int
        Data set size, global batch size.
    model : torch.nn.Module, optional
        Put in eval mode while embedding.
    num_clusters : int, optional
        Default ``num_samples // batch_size`` (one batch per cluster on average).
    kmeans_iters : int
        Lloyd iterations.
    normalize : bool
        Cluster L2-normalised embeddings (cosine geometry).
    chunk_size, progress, drop_last, shuffle_batches, seed, refresh_every, num_replicas, rank
        As for :class:`~negbatch.sampling.gcbs.GCBSampler`.

    Examples
    --------
    >>> from negbatch import HardNegativeBatchSampler
    >>> import torch
    >>> data = torch.randn(40, 3)
    >>> s = HardNegativeBatchSampler(lambda i: data[i], 40, 8, num_clusters=5)
    >>> sorted(i for b in s for i in b) == list(range(40))
    True
    """

    def __init__(
        self,
        embed_fn: EmbedFn,
        num_samples: int,
        batch_size: int,
        *,
        model: torch.nn.Module | None = None,
        num_clusters: int | None = None,
        kmeans_iters: int = 20,
        normalize: bool = True,
        chunk_size: int = 1024,
        progress: bool = False,
        drop_last: bool = False,
        shuffle_batches: bool = True,
        seed: int = 0,
        refresh_every: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        """Set up the sampler; see Parameters in ``help(HardNegativeBatchSampler)``."""
        super().__init__(
            num_samples, batch_size, drop_last=drop_last, shuffle_batches=shuffle_batches, seed=seed,
            refresh_every=refresh_every, num_replicas=num_replicas, rank=rank,
        )
        if not callable(embed_fn):
            raise TypeError(f"embed_fn must be callable, got {type(embed_fn).__name__}")
        self.num_clusters = num_clusters if num_clusters is not None else max(1, num_samples // batch_size)
        if not is_int(self.num_clusters) or not 1 <= self.num_clusters <= num_samples:
            raise ValueError(f"num_clusters must be an int in [1, {num_samples}], got {num_clusters!r}")
        if not is_int(kmeans_iters) or kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be an int >= 1 (Lloyd iterations), got {kmeans_iters!r}")
        self.num_clusters = int(self.num_clusters)
        self.embed_fn, self.model = embed_fn, model
        self.kmeans_iters, self.normalize = int(kmeans_iters), normalize
        self.chunk_size, self.progress = check_positive_int(chunk_size, "chunk_size"), progress

    def prepare(self, indices: np.ndarray) -> Tensor:
        x, _ = embed_dataset(
            self.embed_fn, indices, model=self.model, chunk_size=self.chunk_size, progress=self.progress,
            two_sided=False,
        )
        return x

    def plan_batches(self, indices: np.ndarray, prepared: Any, rng: np.random.Generator) -> list[np.ndarray]:
        x = prepared.detach().cpu()
        if self.normalize:
            x = torch.nn.functional.normalize(x, dim=1)
        # A refresh re-plans the samples left: as many clusters as their share of the
        # data set keeps, so clusters stay about as large as at the epoch's start.
        k = min(len(indices), max(1, round(self.num_clusters * len(indices) / self.num_samples)))
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        labels = kmeans(x, k, iters=self.kmeans_iters, generator=gen).numpy()
        order = []
        for c in rng.permutation(k):
            members = indices[labels == c]
            order.append(rng.permutation(members))
        return cut_into_batches(np.concatenate(order), self.batch_size, self.drop_last)


class NoDuplicateBatchSampler(EpochBatchSampler):
    """Random batches in which no two samples share a key (e.g. the same text).

    In-batch negatives that are copies of the positive are false negatives;
    this sampler keeps them apart. The batches are otherwise random: samples
    are laid out group by group (largest group first) over the batches'
    slots in round-robin order, so that a group of size g lands in g distinct
    batches, then each batch and the batch order are shuffled.

    Parameters
    ----------
    keys : sequence of hashable
        ``keys[i]`` of sample i (texts, or ids of texts).
    batch_size : int
        Global batch size.
    drop_last, shuffle_batches, seed, refresh_every, num_replicas, rank
        As for :class:`EpochBatchSampler`.

    Raises
    ------
    ValueError
        If a key occurs more often than there are batches to put it in.

    Examples
    --------
    >>> from negbatch import NoDuplicateBatchSampler
    >>> keys = ["a", "a", "b", "c", "b", "d", "e", "f"]
    >>> batches = list(NoDuplicateBatchSampler(keys, 3, seed=0))
    >>> all(len({keys[i] for i in b}) == len(b) for b in batches)
    True
    """

    def __init__(
        self,
        keys: Sequence[Hashable],
        batch_size: int,
        *,
        drop_last: bool = False,
        shuffle_batches: bool = True,
        seed: int = 0,
        refresh_every: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        """Set up the sampler; see Parameters in ``help(NoDuplicateBatchSampler)``."""
        if isinstance(keys, (str, bytes)) or not hasattr(keys, "__len__"):
            raise TypeError("keys must be a sequence with one hashable key per sample")
        super().__init__(
            len(keys), batch_size, drop_last=drop_last, shuffle_batches=shuffle_batches, seed=seed,
            refresh_every=refresh_every, num_replicas=num_replicas, rank=rank,
        )
        table: dict[Hashable, int] = {}
        try:
            codes = np.array([table.setdefault(k, len(table)) for k in keys], dtype=np.int64)
        except TypeError as exc:
            raise TypeError(f"every key must be hashable: {exc}") from exc
        self.codes = codes
        worst, count = Counter(codes.tolist()).most_common(1)[0]
        # A group laid over consecutive round-robin slots lands in distinct
        # batches if it is no longer than the number of batches (one fewer
        # when a short tail batch is kept).
        short_tail = not drop_last and len(keys) % batch_size != 0
        limit = len(self) - 1 if short_tail else len(self)
        if count > max(limit, 1):
            raise ValueError(
                f"key {keys[int(np.flatnonzero(codes == worst)[0])]!r} occurs {count} times but at most {limit} "
                f"copies can be kept apart in an epoch of {len(self)} batches; deduplicate the data or use "
                f"a smaller batch_size"
            )

    def plan_batches(self, indices: np.ndarray, prepared: Any, rng: np.random.Generator) -> list[np.ndarray]:
        idx = rng.permutation(indices)
        n_full = len(idx) // self.batch_size
        tail = len(idx) - n_full * self.batch_size
        if self.drop_last and tail:
            idx = idx[: n_full * self.batch_size]  # a random subset is dropped
            tail = 0
        sizes = [self.batch_size] * n_full + ([tail] if tail else [])
        nb = len(sizes)
        # Slots in round-robin order: row s visits every batch with room for an s-th member.
        slots = [(b, s) for s in range(self.batch_size) for b in range(nb) if s < sizes[b]]
        codes = self.codes[idx]
        groups: dict[int, list[int]] = {}
        for i, c in zip(idx.tolist(), codes.tolist()):
            groups.setdefault(c, []).append(i)
        # largest groups first, ties in the (random) order of appearance
        ordered = sorted(groups.values(), key=len, reverse=True)
        flat = [i for g in ordered for i in g]
        batches: list[list[int]] = [[] for _ in range(nb)]
        for (b, _), i in zip(slots, flat):
            batches[b].append(i)
        out = [rng.permutation(np.asarray(b, dtype=np.int64)) for b in batches]
        for b in out:
            if len(np.unique(self.codes[b])) != len(b):  # cannot happen when the count check passed
                raise RuntimeError("internal error: a batch holds a duplicate key")
        return out

    def _padding(self, batch: np.ndarray, count: int) -> np.ndarray:
        # Keys, not only samples, stay distinct in a padded tail (every batch has
        # batch_size >= num_replicas distinct keys, so the plan holds enough).
        pool = np.concatenate(self._plan)  # type: ignore[arg-type]
        pool = pool[~np.isin(self.codes[pool], self.codes[batch])]
        _, first = np.unique(self.codes[pool], return_index=True)
        return pool[np.sort(first)][:count]
