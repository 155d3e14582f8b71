"""Global contrastive batch sampling (GCBS; Sachidananda, Yang, Zhu, ICML 2023).

Before each epoch the whole data set is embedded on both sides (anchors X,
positives Y). The entries of ``X Yᵀ`` above its q-quantile form a sparse
graph; reverse Cuthill-McKee on ``A + Aᵀ`` orders the samples so that the
graph's edges lie close to the diagonal (small bandwidth); consecutive chunks
of that order are the batches, so an anchor's most similar samples tend to be
its in-batch negatives.

The paper's pseudocode builds the dense N x N matrix. Here the products are
computed block by block and the threshold is found exactly by a streamed
selection: the ``k`` largest entries (``k`` such that they are exactly the
entries above ``numpy.quantile(XYᵀ, q)``) are kept in a buffer that is pruned
to a running threshold. A sampled estimate of the quantile, deliberately set
low, seeds the running threshold so that the buffer stays near ``k`` entries;
if the estimate ever turns out too high, the pass is repeated without it, so
the result is exact either way. Memory: O(k + block²) = O(N · avg degree +
block²).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import reverse_cuthill_mckee
from torch import Tensor

from .._checks import check_flag, check_positive_int, check_seed, is_real
from .embedding import EmbedFn, embed_dataset
from .epoch_sampler import EpochBatchSampler, cut_into_batches

__all__ = ["num_kept_entries", "similarity_graph", "gcbs_order", "GCBSampler"]


def _check_q(q: float) -> float:
    if not is_real(q) or not (0.0 < float(q) < 1.0):
        raise ValueError(f"q must be a float strictly between 0 and 1 (the paper uses 0.999), got {q!r}")
    return float(q)


def _check_sides(x: Tensor, y: Tensor) -> None:
    for name, t in (("X", x), ("Y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-d floating-point tensor, got shape {tuple(t.shape)}, {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf; check the model that produced the embeddings")
    if x.shape != y.shape:
        raise ValueError(f"X and Y must have the same shape (N, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples, got {x.shape[0]}")


def num_kept_entries(n_entries: int, q: float) -> int:
    """How many of ``n_entries`` values lie strictly above their q-quantile
    (numpy's default linear interpolation, distinct values)."""
    q = _check_q(q)
    return int(n_entries - 1 - math.floor(q * (n_entries - 1)))


def _sampled_floor(x: Tensor, y: Tensor, k: int, generator: torch.Generator, samples: int) -> float:
    """A value below the k-th largest entry of XYᵀ with high probability.

    The entries of ``R`` random rows (``R >= 256``, ``R·N >= samples``, one product)
    are a sample in which the entries above the true threshold number about
    ``mean = R·N·k/N²``. Rows are not independent entries (clustered data
    have rows of very different degree), so the estimate takes the sample's
    ``1.5·mean + 10·sqrt(mean) + 50``-th largest value, well below the
    threshold; a floor that is nonetheless too high is detected by the caller,
    which then repeats the pass without it.
    """
    n = x.shape[0]
    rows = min(n, max(256, -(-samples // n)))
    pick = torch.randperm(n, generator=generator)[:rows].to(x.device)
    vals = (x[pick] @ y.T).reshape(-1)
    mean = vals.numel() * k / (n * n)
    rank = int(1.5 * mean + 10 * math.sqrt(mean) + 50)
    if rank >= vals.numel():
        return -math.inf
    return float(torch.topk(vals, rank).values[-1])


def _hits(s: Tensor, thr: float, strict: bool = False) -> tuple[Tensor, Tensor]:
    """Row and column of the entries of ``s`` that are >= thr (> thr if ``strict``)."""
    if s.device.type == "cpu":  # numpy's scan is several times faster than torch's nonzero here
        a = s.numpy()
        flat = torch.from_numpy(np.flatnonzero(a > thr if strict else a >= thr))
        return flat // s.shape[1], flat % s.shape[1]
    hit = (s > thr if strict else s >= thr).nonzero()
    return hit[:, 0], hit[:, 1]


class _LargestEntries:
    """The k largest of streamed (value, row, column) entries, as the dense
    pseudocode's ``S > quantile`` keeps them: held in pieces and pruned to
    the running k-th largest whenever more than ``2k + slack`` are held.

    A value tied across the k-th and (k+1)-th largest is the quantile itself,
    which ``S > t`` leaves out: every entry of that value is dropped (fewer
    than k are then kept), and later entries must exceed it. Were they kept,
    a collapsed encoder (all of ``XYᵀ`` one value) would hold all N² entries;
    dropped, memory stays O(k + slack) whatever the ties."""

    def __init__(self, k: int, floor: float = -math.inf, slack: int = 0) -> None:
        self.k, self.threshold, self.slack = k, floor, slack
        #: Whether an entry must exceed ``threshold`` (a tied value was dropped) or only reach it.
        self.strict = False
        self.vals: list[Tensor] = []
        self.rows: list[Tensor] = []
        self.cols: list[Tensor] = []
        self.held = 0

    def hits(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """Row and column of the entries of ``s`` that may still be kept."""
        return _hits(s, self.threshold, self.strict)

    def add(self, vals: Tensor, rows: Tensor, cols: Tensor) -> None:
        """Hold the entries that may still be kept (the callers pass those of
        :meth:`hits`; others are screened here, so a dropped tie stays dropped)."""
        if vals.numel() and self.threshold > -math.inf:
            keep = vals > self.threshold if self.strict else vals >= self.threshold
            if not bool(keep.all()):
                vals, rows, cols = vals[keep], rows[keep], cols[keep]
        if vals.numel():
            self.vals.append(vals.cpu())
            self.rows.append(rows.to(torch.int32).cpu())
            self.cols.append(cols.to(torch.int32).cpu())
            self.held += vals.numel()
        if self.held > 2 * self.k + self.slack:
            self.prune()

    def prune(self) -> None:
        """Keep the k largest held, less a value tied across the k-th and
        (k+1)-th (call with more than k held)."""
        # Piece by piece: concatenating the rows and columns too would double
        # the held entries' memory at the peak.
        v = torch.cat(self.vals).numpy()
        v.partition((v.size - self.k - 1, v.size - self.k))  # in place on our own copy
        kth, after = float(v[v.size - self.k]), float(v[v.size - self.k - 1])  # the k-th and (k+1)-th largest
        del v
        tied = kth == after
        for p in range(len(self.vals)):
            keep = self.vals[p] > kth if tied else self.vals[p] >= kth
            self.vals[p], self.rows[p], self.cols[p] = self.vals[p][keep], self.rows[p][keep], self.cols[p][keep]
        self.held = sum(v.numel() for v in self.vals)
        if tied:
            self.threshold, self.strict = kth, True
        elif kth > self.threshold:  # a later entry equal to kth still ties with it: admitted
            self.threshold, self.strict = kth, False

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """(values, rows, cols) of the kept entries: the k largest, less a
        value tied across the k-th and (k+1)-th (all of them if at most k)."""
        if self.held > self.k:
            self.prune()
        if not self.vals:
            empty = torch.empty(0, dtype=torch.int32)
            return torch.empty(0), empty, empty
        return torch.cat(self.vals), torch.cat(self.rows), torch.cat(self.cols)


def _streamed_top(x: Tensor, y: Tensor, k: int, block: int, floor: float):
    """The k largest entries of XYᵀ as ``S > quantile`` keeps them (see
    :class:`_LargestEntries`), given a floor below the k-th largest.

    Returns (values, rows, cols) or None if fewer than k entries reach ``floor``.
    """
    n = x.shape[0]
    top = _LargestEntries(k, floor, slack=block * block)
    # One product buffer for every block: a fresh block² allocation per block
    # fragments the heap around the small held pieces and inflates the peak.
    buffer = torch.empty(min(block, n) ** 2, dtype=torch.promote_types(x.dtype, y.dtype), device=x.device)
    for i in range(0, n, block):
        xi = x[i : i + block]
        for j in range(0, n, block):
            yj = y[j : j + block]
            s = torch.mm(xi, yj.T, out=buffer[: xi.shape[0] * yj.shape[0]].view(xi.shape[0], yj.shape[0]))
            r, c = top.hits(s)
            top.add(s[r, c], r + i, c + j)
    # A dropped tie means more than k entries reached it, so the floor was below the k-th largest.
    if top.held < k and not top.strict:
        return None
    return top.result()


def _faiss_top(x: Tensor, y: Tensor, k: int, neighbours: int, nprobe: int, seed: int, block: int = 8192):
    """Approximate: each anchor's ``neighbours`` best positives from a faiss
    inverted-file index (``4·sqrt(N)`` lists, ``nprobe`` searched), then the k
    largest of those candidates (anchors searched ``block`` at a time)."""
    import faiss  # optional dependency

    xn = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    yn = np.ascontiguousarray(y.cpu().numpy(), dtype=np.float32)
    n, d = yn.shape
    nlist = max(1, min(n // 39, int(4 * math.sqrt(n))))  # faiss wants >= 39 training points per list
    quantiser = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantiser, d, nlist, faiss.METRIC_INNER_PRODUCT)
    train = np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)
    index.train(yn[np.sort(train)])
    index.add(yn)
    index.nprobe = min(nlist, nprobe)
    top = _LargestEntries(k, slack=block * neighbours)
    for i in range(0, n, block):
        sims, cols = index.search(xn[i : i + block], neighbours)
        reach = sims > top.threshold if top.strict else sims >= top.threshold
        found = (cols >= 0) & reach  # -1: fewer than ``neighbours`` in the probed lists
        rows = np.broadcast_to(np.arange(i, i + sims.shape[0], dtype=np.int32)[:, None], sims.shape)
        top.add(torch.from_numpy(sims[found]), torch.from_numpy(rows[found]), torch.from_numpy(cols[found]))
    return top.result()


def similarity_graph(
    x: Tensor,
    y: Tensor,
    q: float = 0.999,
    *,
    block_size: int = 4096,
    method: str = "exact",
    normalize: bool = True,
    estimate_samples: int = 1_000_000,
    ann_neighbours: int | None = None,
    ann_nprobe: int = 16,
    seed: int = 0,
) -> sp.csr_matrix:
    """The entries of ``X Yᵀ`` above its q-quantile, as a sparse N x N graph.

    Parameters
    ----------
    x, y : Tensor
        Anchor and positive embeddings, ``(N, d)`` each; row i of ``y`` is the
        positive of row i of ``x``. Any device; products run there.
    q : float
        Quantile in (0, 1); the paper's default keeps the top 0.1 %.
    block_size : int
        Side of the square blocks of ``X Yᵀ`` computed at once.
    method : {"exact", "faiss"}
        ``"exact"``: blockwise products and an exact streamed threshold, the
        same graph as the dense pseudocode's ``S > quantile``, ties included.
        ``"faiss"``: approximate, for corpora of millions; needs faiss.
    normalize : bool
        L2-normalise the rows first (cosine similarities).
    estimate_samples : int
        Sampled entries used to seed the running threshold (exact method).
    ann_neighbours : int, optional
        Candidates per anchor for ``"faiss"``; default ``4·k/N + 8`` (four
        times the average degree): rows with more edges than that lose some.
    ann_nprobe : int
        Inverted lists searched per anchor for ``"faiss"`` (recall vs time).
    seed : int
        Seed of the sampled estimate (does not change the exact result) and
        of faiss's training subsample.

    Returns
    -------
    scipy.sparse.csr_matrix
        Boolean, shape (N, N); (i, j) stored iff ``x_i·y_j`` is kept.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(300, 8, dtype=torch.float64)
    >>> g = similarity_graph(x, x + 0.1 * torch.randn_like(x), q=0.99, block_size=64)
    >>> g.nnz == num_kept_entries(300 * 300, 0.99)
    True
    """
    q = _check_q(q)
    _check_sides(x, y)
    block_size = check_positive_int(block_size, "block_size")
    seed = check_seed(seed)
    if method not in ("exact", "faiss"):
        raise ValueError(f"method must be 'exact' or 'faiss', got {method!r}")
    # Half-precision embeddings (a model under autocast) are compared in float32:
    # numpy, which selects the kept entries, has no bfloat16.
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.detach().to(dtype), y.detach().to(dtype)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
        y = torch.nn.functional.normalize(y, dim=1)
    n = x.shape[0]
    k = num_kept_entries(n * n, q)
    if method == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError as exc:
            raise ImportError("method='faiss' needs faiss: pip install faiss-cpu (or use method='exact')") from exc
        neighbours = ann_neighbours or min(n, 4 * math.ceil(k / n) + 8)
        v, r, c = _faiss_top(x, y, k, int(neighbours), ann_nprobe, seed)
    else:
        gen = torch.Generator().manual_seed(seed)
        found = _streamed_top(x, y, k, block_size, _sampled_floor(x, y, k, gen, estimate_samples))
        if found is None:  # the estimate was above the threshold: redo exactly without it
            found = _streamed_top(x, y, k, block_size, -math.inf)
        v, r, c = found
    data = np.ones(v.numel(), dtype=bool)
    graph = sp.coo_matrix((data, (r.numpy(), c.numpy())), shape=(n, n)).tocsr()
    graph.sum_duplicates()
    return graph


def gcbs_order(x: Tensor, y: Tensor, q: float = 0.999, **graph_kwargs: Any) -> np.ndarray:
    """The GCBS permutation: reverse Cuthill-McKee on the thresholded graph.

    Parameters
    ----------
    x, y : Tensor
        ``(N, d)`` anchor and positive embeddings.
    q : float
        Quantile of ``X Yᵀ`` above which entries become edges.
    **graph_kwargs
        Passed to :func:`similarity_graph` (block_size, method, normalize, ...).

    Returns
    -------
    numpy.ndarray
        A permutation of ``0 .. N-1``; consecutive chunks are the batches.

    Examples
    --------
    >>> from negbatch import gcbs_order
    >>> import torch
    >>> x = torch.randn(100, 4)
    >>> sorted(gcbs_order(x, x, q=0.99).tolist()) == list(range(100))
    True
    """
    graph = similarity_graph(x, y, q, **graph_kwargs)
    sym = (graph + graph.T).tocsr()
    sym.sort_indices()
    return np.asarray(reverse_cuthill_mckee(sym, symmetric_mode=True), dtype=np.int64)


class GCBSampler(EpochBatchSampler):
    """Global contrastive batch sampler: batches are consecutive chunks of the
    GCBS order, recomputed from the current model before every epoch.

    Use it as a DataLoader's ``batch_sampler``. Under torch.distributed every
    rank embeds a share of the data, rank 0 computes the order and broadcasts
    it, and each rank yields its ``batch_size / world_size`` share of every
    global batch.

    Parameters
    ----------
    embed_fn : callable
        ``embed_fn(indices) -> (X, Y)``: anchor and positive embeddings of the
        samples ``indices`` (1-d int64 tensor), shapes ``(len(indices), d)``.
        Called in chunks under ``torch.no_grad()`` with ``model`` in eval mode.
        For two-view image data, return the embeddings of two views (or of the
        un-augmented image twice).
    num_samples : int
        Size of the data set.
    batch_size : int
        Global batch size.
    model : torch.nn.Module, optional
        Put in eval mode while embedding; its mode is restored afterwards.
    q : float
        Quantile threshold of the similarity graph (paper: 0.999).
    chunk_size : int
        Samples per ``embed_fn`` call.
    block_size : int
        Side of the blocks of ``X Yᵀ``.
    method : {"exact", "faiss"}
        See :func:`similarity_graph`.
    normalize : bool
        Cosine similarities (L2-normalise the embeddings).
    progress : bool
        Progress bar while embedding (needs tqdm).
    drop_last, shuffle_batches, seed, refresh_every, num_replicas, rank
        See :class:`~negbatch.sampling.epoch_sampler.EpochBatchSampler`.

    Examples
    --------
    >>> from negbatch import GCBSampler
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> data = torch.randn(64, 8)
    >>> model = torch.nn.Linear(8, 4)
    >>> sampler = GCBSampler(lambda i: (model(data[i]), model(data[i])), 64, 16, model=model, q=0.9)
    >>> loader = DataLoader(TensorDataset(data), batch_sampler=sampler)
    >>> [len(b[0]) for b in loader]
    [16, 16, 16, 16]
    """

    def __init__(
        self,
        embed_fn: EmbedFn,
        num_samples: int,
        batch_size: int,
        *,
        model: torch.nn.Module | None = None,
        q: float = 0.999,
        chunk_size: int = 1024,
        block_size: int = 4096,
        method: str = "exact",
        normalize: bool = True,
        progress: bool = False,
        drop_last: bool = False,
        shuffle_batches: bool = True,
        seed: int = 0,
        refresh_every: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        """Set up the sampler; see Parameters in ``help(GCBSampler)``."""
        super().__init__(
            num_samples, batch_size, drop_last=drop_last, shuffle_batches=shuffle_batches, seed=seed,
            refresh_every=refresh_every, num_replicas=num_replicas, rank=rank,
        )
        if not callable(embed_fn):
            raise TypeError(f"embed_fn must be callable as embed_fn(indices) -> (X, Y), got {type(embed_fn).__name__}")
        if method not in ("exact", "faiss"):
            raise ValueError(f"method must be 'exact' or 'faiss', got {method!r}")
        self.embed_fn = embed_fn
        self.model = model
        self.q = _check_q(q)
        # Checked here, not after the first pass over the data set has embedded it.
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.block_size = check_positive_int(block_size, "block_size")
        if method == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError as exc:
                raise ImportError("method='faiss' needs faiss: pip install faiss-cpu (or use method='exact')") from exc
        self.method = method
        self.normalize = check_flag(normalize, "normalize")
        self.progress = check_flag(progress, "progress")

    def embed(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        """Both sides of ``indices`` with the current model (every rank)."""
        return embed_dataset(
            self.embed_fn, indices, model=self.model, chunk_size=self.chunk_size, progress=self.progress
        )

    def prepare(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        return self.embed(indices)

    def order(self, x: Tensor, y: Tensor) -> np.ndarray:
        """Positions into ``x``/``y`` in GCBS order."""
        return gcbs_order(
            x, y, self.q, block_size=self.block_size, method=self.method, normalize=self.normalize,
            seed=self.seed,
        )

    def plan_batches(self, indices: np.ndarray, prepared: Any, rng: np.random.Generator) -> list[np.ndarray]:
        x, y = prepared
        if len(indices) < 2:
            return [indices]
        return cut_into_batches(indices[self.order(x, y)], self.batch_size, self.drop_last, rng)
