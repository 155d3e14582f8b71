"""Which candidates each anchor is contrasted with: all of them, or K sampled.

Every loss in negbatch reduces to the same picture: ``n`` anchors, a bank of
``m`` candidate embeddings, for each anchor the column of its positive, and a
set of columns that must never be negatives (the anchor itself, masked false
negatives). A :class:`NegativeSelection` records which columns each anchor
sees; :func:`selection_logits` turns a selection into a matrix of logits whose
invalid entries are ``-inf``.

Two layouts come out of :func:`select_negatives`:

* dense (``negatives="all"``): logits are the full ``n x m`` matrix with the
  excluded columns set to ``-inf``; the positive sits at its own column;
* sampled (``negatives=K``): logits are ``n x (1 + K)``: column 0 is the
  positive, columns ``1..K`` are K candidates drawn uniformly without
  replacement from the anchor's own valid candidates, independently per anchor.

The sampled logits are computed by a gather-free sparse product
(:class:`_SampledDot`) whose cost is ``O(n K d)`` instead of ``O(n m d)``, which
is what makes a small K actually cheaper than the full loss; where K is a
larger share of the bank (:func:`sparse_pays`), by one dense product read at
the selected entries, which is then cheaper.

Sampling is world-size invariant: random numbers are drawn for every *global*
anchor row and each process keeps the rows it owns (``row_index``). With the
same seed, a 2-process run therefore samples exactly the negatives a single
process would sample for the concatenated batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._autocast import autocast_active
from ._checks import Negatives, OnShortage, is_int, refuse_second_order

__all__ = [
    "Negatives",
    "NegativeSelection",
    "select_negatives",
    "selection_logits",
    "sample_uniform_ranks",
    "same_id_mask",
    "validate_negatives",
    "ShortageError",
]


class ShortageError(ValueError):
    """An anchor has fewer valid candidates than ``negatives=K`` under
    ``on_shortage="raise"``. A ValueError; its own class so that a loss can
    add what masked the candidates (its filter, a queue still filling)."""


def validate_negatives(negatives: object, name: str = "negatives") -> Negatives:
    """Return ``negatives`` if it is ``"all"`` or a positive int (numpy's
    too, returned as a Python int), else raise."""
    if isinstance(negatives, str):
        if negatives != "all":
            raise ValueError(f"{name} must be 'all' or a positive int, got {negatives!r}")
        return "all"
    if not is_int(negatives):
        raise TypeError(f"{name} must be 'all' or a positive int, got {type(negatives).__name__}")
    if negatives < 1:
        raise ValueError(f"{name} must be >= 1 (or 'all'), got {negatives}")
    return int(negatives)


def same_id_mask(row_ids: Tensor, column_ids: Tensor) -> Tensor:
    """Boolean mask, True where a row and a column share an id.

    Use it to mark known false negatives: pass sample ids (two crops of one
    image) or class labels (supervised contrastive setting) and give the result
    as ``mask`` to a loss.

    Examples
    --------
    >>> from negbatch import same_id_mask
    >>> import torch
    >>> same_id_mask(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 2, 0]))
    tensor([[ True, False, False,  True],
            [False,  True, False, False],
            [ True, False, False,  True]])
    """
    if row_ids.dim() != 1 or column_ids.dim() != 1:
        raise ValueError(
            f"row_ids and column_ids must be 1-d, got shapes {tuple(row_ids.shape)} "
            f"and {tuple(column_ids.shape)}"
        )
    return row_ids[:, None] == column_ids[None, :]


@dataclass
class NegativeSelection:
    """The candidates each anchor is contrasted with.

    Attributes
    ----------
    positive_index : Tensor (n,)
        Column of each anchor's positive in the candidate bank.
    allowed : Tensor (n, m) bool or None
        Dense layout only: True where the column takes part in the anchor's
        softmax (the positives and every valid negative).
    index : Tensor (n, P + K) long or None
        Sampled layout only: bank column of the positives (the first P
        slots, slot 0 the paired positive) and of the K sampled negatives.
    valid : Tensor (n, P + K) bool or None
        Sampled layout only: False for slots left empty (an anchor with fewer
        than P positives, or fewer than K valid candidates under
        ``on_shortage="use_all"``).
    positive_mask : Tensor (n, m) bool or None
        Dense layout with several positives per anchor: every positive column
        (the paired one included). None: the paired positive is the only one.
    num_positive_slots : int
        Sampled layout: P, the slots before the negatives (1: the paired
        positive only).
    self_index : Tensor (n,) long or None
        The anchor's own column (-1 where it has none), as given.
    only_self_excluded : bool
        Dense layout: ``allowed`` is False at the ``self_index`` columns only,
        so a kernel may fill those n entries instead of scanning the mask.

    Examples
    --------
    >>> import torch
    >>> from negbatch import select_negatives
    >>> selection = select_negatives(torch.tensor([1, 0]), 5, 2, generator=torch.Generator().manual_seed(0))
    >>> selection.is_dense, tuple(selection.index.shape), selection.num_positive_slots
    (False, (2, 3), 1)
    """

    positive_index: Tensor
    allowed: Tensor | None = None
    index: Tensor | None = None
    valid: Tensor | None = None
    positive_mask: Tensor | None = None
    num_positive_slots: int = 1
    self_index: Tensor | None = None
    only_self_excluded: bool = False

    @property
    def is_dense(self) -> bool:
        return self.allowed is not None

    @property
    def single_positive(self) -> bool:
        """Whether the paired positive is each anchor's only positive."""
        return self.positive_mask is None if self.is_dense else self.num_positive_slots == 1

    @property
    def positive_column(self) -> Tensor:
        """Column of the (paired) positive in the logits of :func:`selection_logits`."""
        if self.is_dense:
            return self.positive_index
        return torch.zeros_like(self.positive_index)

    def positive_slots(self) -> Tensor | None:
        """Boolean mask over the logits' columns, True on every positive; None
        when the paired positive is the only one (``positive_column``)."""
        if self.single_positive:
            return None
        if self.is_dense:
            return self.positive_mask
        slots = torch.zeros_like(self.valid)
        slots[:, : self.num_positive_slots] = self.valid[:, : self.num_positive_slots]
        return slots

    def negative_mask(self) -> Tensor:
        """Boolean mask over the logits' columns, True on the negatives."""
        if self.is_dense:
            if self.positive_mask is not None:
                return self.allowed & ~self.positive_mask
            neg = self.allowed.clone()
            neg.scatter_(1, self.positive_index[:, None], False)
            return neg
        neg = self.valid.clone()
        neg[:, : self.num_positive_slots] = False
        return neg


def _excluded_columns(
    n: int,
    m: int,
    positive_index: Tensor,
    self_index: Tensor | None,
    mask: Tensor | None,
) -> Tensor | None:
    """Dense (n, m) bool of columns that are never negatives, or None if only
    the positive and the anchor itself are excluded (the fast path)."""
    if mask is None:
        return None
    excluded = mask.clone()
    rows = torch.arange(n, device=mask.device)
    excluded[rows, positive_index] = True
    if self_index is not None:
        has_self = self_index >= 0
        excluded[rows[has_self], self_index[has_self]] = True
    return excluded


def _with_positives(
    positive_index: Tensor, self_index: Tensor | None, mask: Tensor | None, positives: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """The anchors' positives (the paired one and ``positives``, never the
    anchor itself) and the mask with them added: a positive is never a
    negative. ``(None, mask)`` without ``positives``."""
    if positives is None:
        return None, mask
    rows = torch.arange(positive_index.shape[0], device=positive_index.device)
    positive_mask = positives.clone()
    positive_mask[rows, positive_index] = True
    if self_index is not None:
        has_self = self_index >= 0
        positive_mask[rows[has_self], self_index[has_self]] = False
    return positive_mask, (positive_mask if mask is None else (mask | positive_mask))


def _population(m: int, positive_index: Tensor, self_index: Tensor | None, excluded: Tensor | None) -> Tensor:
    """Valid candidates of every anchor: the ``m`` columns less the
    ``excluded`` ones (:func:`_excluded_columns`), or, without them, less its
    positive and its own column."""
    if excluded is not None:
        return m - excluded.sum(dim=1)
    if self_index is None:
        return torch.full_like(positive_index, m - 1)
    return (self_index < 0).long().add_(m - 2)  # the anchor's own column is not a candidate


def candidate_counts(
    positive_index: Tensor,
    num_candidates: int,
    *,
    self_index: Tensor | None = None,
    mask: Tensor | None = None,
    positives: Tensor | None = None,
) -> Tensor:
    """Valid candidates of every anchor (n,) long: what ``negatives=K`` is
    compared with, and the negatives of ``negatives="all"``. The arguments are
    those of :func:`select_negatives`, unchecked."""
    _, mask = _with_positives(positive_index, self_index, mask, positives)
    excluded = _excluded_columns(positive_index.shape[0], num_candidates, positive_index, self_index, mask)
    return _population(num_candidates, positive_index, self_index, excluded)


def shortage_message(k: int, short: str, fewest: int, m: int) -> str:
    """What a :class:`ShortageError` says: ``short`` names the anchors short
    of ``k`` candidates (how many, on which rank), ``fewest`` is the smallest
    count among them, of ``m`` columns."""
    return (
        f"negatives={k} but {short} have fewer valid candidates (the fewest is {fewest} of {m} columns after "
        f"excluding the anchor, its positive and masked candidates). Lower negatives, enlarge the batch, or pass "
        f"on_shortage='use_all' to contrast such anchors with all their candidates."
    )


def sample_uniform_ranks(
    population: Tensor,
    k: int,
    raw: Tensor,
) -> Tensor:
    """Uniform K-subsets of ``range(population[i])`` for every row, by Floyd's
    algorithm, vectorised over rows.

    Parameters
    ----------
    population : Tensor (n,) long
        Size of each row's population; must be >= k.
    k : int
        Subset size.
    raw : Tensor (n, k) long
        Independent uniform integers in ``[0, 2**62)``, one per draw.

    Returns
    -------
    Tensor (n, k) long: distinct ranks per row, each subset uniform over all
    ``C(population, k)`` subsets (the order within a row is not uniform,
    which the losses do not depend on).
    """
    n = population.shape[0]
    device = population.device
    if n == 0 or k == 0:
        return torch.empty(n, k, dtype=torch.long, device=device)
    width = int(population.max())
    if device.type == "cpu":
        # The K steps are tiny vector ops: numpy's per-call cost is a fraction
        # of torch's dispatch, so the whole algorithm runs on numpy arrays.
        return torch.from_numpy(_floyd_numpy(population.numpy(), k, raw.numpy(), width))
    return _floyd_torch(population, k, raw, width)


def _floyd_torch(population: Tensor, k: int, raw: Tensor, width: int) -> Tensor:
    """:func:`sample_uniform_ranks` in torch ops (for CUDA; the same draws as
    :func:`_floyd_numpy`)."""
    n = population.shape[0]
    device = population.device
    # taken[i, r]: rank r already drawn in row i; a flat view makes the
    # membership test and the update O(n) per draw.
    taken = torch.zeros(n * width, dtype=torch.bool, device=device)
    base = torch.arange(n, device=device) * width
    # Floyd: step t draws from [0, j_t] with j_t = population - k + t, and
    # takes j_t itself when the draw collides with an earlier one. Steps are
    # rows of these (k, n) tables, so each step touches contiguous memory.
    steps = torch.arange(k, device=device)[:, None]
    top = (population - k)[None, :] + steps
    draws = raw.t() % (top + 1) + base
    top += base
    for t in range(k):
        r = torch.where(taken[draws[t]], top[t], draws[t])
        draws[t] = r
        taken[r] = True
    return (draws - base).t().contiguous()


#: :func:`_floyd_numpy` marks drawn ranks in a table of booleans of at most
#: this many (row, rank) cells (2 MiB), which then stays in the caches: a
#: larger bank's rows are drawn in blocks of rows, each with the table to
#: itself (the same draws); or see :func:`_floyd_by_comparison`.
FLOYD_TABLE_CELLS = 1 << 21


def _floyd_by_comparison(n: int, k: int, width: int) -> bool:
    """Whether :func:`_floyd_numpy` compares each draw with the row's earlier
    ones (about 0.4 K^2 ns a row) instead of marking drawn ranks in a table
    of booleans, block of rows by block of rows (about K (11 + 4700 B / n) ns
    a row for B blocks: a table's look-ups in the caches, and the K steps'
    numpy calls once per block; plus the table's page faults). Fitted on the 2-core development machine
    (2026-12-04, one thread, n = 1024-8192, width 2046-16382, K = 8-256): in
    a process whose allocator reuses freed memory the rule picks the faster
    way or one within 1.15x of it, but for n = 2048-4096, K = 64, where the
    fault term picks comparison and the table is up to 1.35x faster. A table that fits
    in one block is always taken. Against one table past the caches (before
    2026-12-04; same process, interleaved, with glibc's defaults and with
    freed memory kept): n = 4096, K = 128 and 256 take 0.69-0.77 and
    0.58-0.74 of the time, n = 8192, K = 256 0.77-0.81; n = 512-2048 and
    8192 with K = 64, 0.99-1.11 (the same way there, or one table against
    two blocks)."""
    if n * width <= FLOYD_TABLE_CELLS:
        return False
    blocks = -(-n * width // FLOYD_TABLE_CELLS)
    # The table's first touch: under glibc's defaults a fresh mapping, about 1.2 ns a cell in page
    # faults (n = 2048, K = 64: blocks 10 ms against 5 compared, where the faults are gone 3.7 against 5).
    faults = 1.2 * FLOYD_TABLE_CELLS / n  # past one block, the table is a full block
    return 0.4 * k * k < k * (11 + 4700 * blocks / n) + faults


def _floyd_numpy(population: np.ndarray, k: int, raw: np.ndarray, width: int) -> np.ndarray:
    """:func:`sample_uniform_ranks` on the CPU, in numpy (the same draws)."""
    n = population.shape[0]
    top = (population - k)[None, :] + np.arange(k, dtype=np.int64)[:, None]
    draws = raw.T % (top + 1)
    if _floyd_by_comparison(n, k, width):
        for t in range(1, k):
            step = draws[t]  # a view: written in place
            np.copyto(step, top[t], where=(draws[:t] == step).any(axis=0))
        return np.ascontiguousarray(draws.T)
    rows = max(1, FLOYD_TABLE_CELLS // max(width, 1))
    # Zeros from the allocator (calloc: under glibc a large one is mapped zero pages, touched only
    # where Floyd writes); cleared again for each further block.
    taken = np.zeros(min(n, rows) * width, dtype=bool)
    for first in range(0, n, rows):
        block = slice(first, first + rows)
        if first:
            taken[:] = False
        _floyd_table_block(draws[:, block], top[:, block], taken, width)
    return np.ascontiguousarray(draws.T)


def _floyd_table_block(draws: np.ndarray, top: np.ndarray, taken: np.ndarray, width: int) -> None:
    """Floyd's K steps for a block of rows, the columns of the (K, rows)
    views ``draws`` (the ranks written in place) and ``top``, drawn ranks
    marked in ``taken`` (all False on entry). In place throughout: a fresh array of this size is
    a fresh mapping under glibc's defaults, whose page faults cost more than
    the steps."""
    block = draws.shape[1]
    table = taken[: block * width]
    # Each row's ranks offset into its own stretch of the table.
    base = np.arange(block, dtype=np.int64) * width
    draws += base
    top += base
    for t in range(draws.shape[0]):
        step = draws[t]  # a view: written in place
        np.copyto(step, top[t], where=table[step])
        table[step] = True
    draws -= base


def _cpu_random_bits(generator: torch.Generator | None, shape: tuple[int, int]) -> np.ndarray:
    """Uniform 64-bit integers from numpy's PCG64, seeded by one draw from
    the torch ``generator``: torch's CPU generator (a Mersenne twister) takes
    about 10 ns a number, PCG64 about 1 ns."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return np.random.PCG64(seed).random_raw(shape)


def _draw_ranks(
    population: Tensor,
    k: int,
    m: int,
    row_index: Tensor | None,
    n_rows_global: int,
    generator: torch.Generator | None,
) -> Tensor:
    """K uniform distinct ranks in ``range(population[i])`` per local row.

    Random numbers are drawn for all ``n_rows_global`` rows and sliced with
    ``row_index`` (None: every row, in order), so the result does not depend
    on how rows are split across processes.
    """
    device = population.device
    gen_device = generator.device if generator is not None else device
    if 2 * k <= m:
        if gen_device.type == "cpu":
            table = _cpu_random_bits(generator, (n_rows_global, k))
            table >>= np.uint64(2)  # below 2**62: the same bits as int64
            raw = torch.from_numpy(table.view(np.int64))
        else:
            raw = torch.randint(0, 2**62, (n_rows_global, k), generator=generator, device=gen_device)
        raw = raw.to(device)
        if row_index is not None:
            raw = raw[row_index]
        return sample_uniform_ranks(population, k, raw)
    # K above half the candidates: Floyd's K sequential draws cost more than
    # random keys, of which each row keeps its K smallest.
    if gen_device.type == "cpu":
        # 64-bit keys (a tie, which would favour the earlier rank, has odds
        # of about m^2 / 2^65 per row) and numpy's selection in each row: a
        # fraction of torch's top-K on the CPU.
        keys = _cpu_random_bits(generator, (n_rows_global, m))
        if row_index is not None:
            keys = keys[row_index.cpu().numpy()]
        keys[np.arange(m)[None, :] >= population.cpu().numpy()[:, None]] = np.iinfo(np.uint64).max
        return torch.from_numpy(np.argpartition(keys, k - 1, axis=1)[:, :k]).to(device)
    keys = torch.rand(n_rows_global, m, generator=generator, device=gen_device).to(device)
    if row_index is not None:
        keys = keys[row_index]
    cols = torch.arange(m, device=device)
    keys = keys.masked_fill(cols[None, :] >= population[:, None], 2.0)
    return keys.topk(k, dim=1, largest=False).indices


def select_negatives(
    positive_index: Tensor,
    num_candidates: int,
    negatives: Negatives = "all",
    *,
    self_index: Tensor | None = None,
    mask: Tensor | None = None,
    positives: Tensor | None = None,
    generator: torch.Generator | None = None,
    on_shortage: OnShortage = "raise",
    row_index: Tensor | None = None,
    n_rows_global: int | None = None,
) -> NegativeSelection:
    """Choose the negatives of every anchor.

    Parameters
    ----------
    positive_index : Tensor (n,) long
        Bank column of each anchor's positive.
    num_candidates : int
        Number of columns ``m`` of the candidate bank.
    negatives : "all" or int
        ``"all"``: every valid candidate. ``K``: K valid candidates drawn
        uniformly without replacement, independently per anchor.
    self_index : Tensor (n,) long, optional
        Bank column holding the anchor itself (two-view form), or -1 where the
        anchor is not in the bank. Never a negative.
    mask : Tensor (n, m) bool, optional
        True marks known false negatives; never a negative. The positive is
        kept even where the mask is True.
    positives : Tensor (n, m) bool, optional
        True marks further positives of the anchor (same-label candidates,
        SupCon): never negatives, and all of them are kept (after the paired
        positive, in the first slots of a sampled selection). The anchor's own
        column is never a positive; a column both in ``mask`` and here is a
        positive.
    generator : torch.Generator, optional
        Source of randomness for sampled negatives (reproducible draws).
    on_shortage : {"raise", "use_all"}
        What to do when an anchor has fewer than K valid candidates:
        ``"raise"`` (default) raises a ValueError; ``"use_all"`` contrasts
        such an anchor with all its valid candidates (fewer than K).
    row_index, n_rows_global : optional
        Global row id of each local anchor and the global number of rows;
        used by the distributed losses so that sampling does not depend on
        the world size. Default: local rows are the global rows.

    Raises
    ------
    ValueError, TypeError
        Naming the argument: an index out of its range or of the wrong
        length or dtype, a mask that is not bool, ``negatives`` not "all" or
        a positive int, K above an anchor's candidates (with
        ``on_shortage="raise"``).

    Examples
    --------
    Two views of 2 samples in one bank of 4 columns: row i's positive is the
    other view, its own column is never a candidate.

    >>> import torch
    >>> from negbatch import select_negatives
    >>> positive, itself = torch.tensor([2, 3, 0, 1]), torch.tensor([0, 1, 2, 3])
    >>> select_negatives(positive, 4, self_index=itself).allowed.int().tolist()
    [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]]
    >>> sampled = select_negatives(positive, 4, 1, self_index=itself, generator=torch.Generator().manual_seed(0))
    >>> sampled.index[:, 0].tolist()  # slot 0: the positive; slot 1: one drawn negative
    [2, 3, 0, 1]
    >>> bool(((sampled.index[:, 1] != positive) & (sampled.index[:, 1] != itself)).all())
    True
    """
    num_candidates, n_rows_global = _check_selection_inputs(positive_index, num_candidates, self_index, mask,
                                                            positives, row_index, n_rows_global)
    return _select(positive_index, num_candidates, negatives, self_index=self_index, mask=mask, positives=positives,
                   generator=generator, on_shortage=on_shortage, row_index=row_index, n_rows_global=n_rows_global)


def _check_selection_inputs(positive_index, m, self_index, mask, positives, row_index,
                            n_rows_global) -> tuple[int, int | None]:
    """The index arguments of :func:`select_negatives`, each named when wrong (the losses build
    theirs valid and call :func:`_select` directly: these checks cost a pass each); returns
    ``num_candidates`` and ``n_rows_global`` as Python ints (numpy's are taken)."""
    if not isinstance(positive_index, Tensor) or positive_index.dim() != 1 or positive_index.is_floating_point() \
            or positive_index.dtype == torch.bool:
        raise TypeError(f"positive_index must be a 1-d integer tensor, one bank column per anchor, got "
                        f"{getattr(positive_index, 'dtype', type(positive_index).__name__)} "
                        f"{tuple(getattr(positive_index, 'shape', ()))}")
    n = positive_index.shape[0]
    if not is_int(m) or m < 1:
        raise ValueError(f"num_candidates must be a positive int (the bank's columns), got {m!r}")

    def in_range(t: Tensor, name: str, low: int, high: int, what: str) -> None:
        if not isinstance(t, Tensor) or t.shape != (n,) or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of shape ({n},), one per anchor, got "
                             f"{tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', type(t).__name__)}")
        if n and (int(t.min()) < low or int(t.max()) >= high):
            raise ValueError(f"{name} must hold {what} in [{low}, {high}), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")

    in_range(positive_index, "positive_index", 0, m, "bank columns")
    if self_index is not None:
        in_range(self_index, "self_index", -1, m, "bank columns (-1: the anchor is not in the bank)")
    for name, given in (("mask", mask), ("positives", positives)):
        if given is not None and (not isinstance(given, Tensor) or given.dtype != torch.bool):
            raise TypeError(f"{name} must be a bool tensor (True: {name == 'mask' and 'never a negative' or 'a positive'})"
                            f", got {getattr(given, 'dtype', type(given).__name__)}")
    if row_index is not None:
        if not is_int(n_rows_global):
            raise ValueError("n_rows_global (an int, the rows of every process) is required when row_index is given")
        n_rows_global = int(n_rows_global)
        in_range(row_index, "row_index", 0, n_rows_global, "global rows")
    return int(m), n_rows_global


def _select(
    positive_index: Tensor,
    num_candidates: int,
    negatives: Negatives = "all",
    *,
    self_index: Tensor | None = None,
    mask: Tensor | None = None,
    positives: Tensor | None = None,
    generator: torch.Generator | None = None,
    on_shortage: OnShortage = "raise",
    row_index: Tensor | None = None,
    n_rows_global: int | None = None,
) -> NegativeSelection:
    """:func:`select_negatives` without the checks of its index arguments."""
    negatives = validate_negatives(negatives)
    if on_shortage not in ("raise", "use_all"):
        raise ValueError(f"on_shortage must be 'raise' or 'use_all', got {on_shortage!r}")
    n = positive_index.shape[0]
    m = num_candidates
    for name, given in (("mask", mask), ("positives", positives)):
        if given is not None and tuple(given.shape) != (n, m):
            raise ValueError(f"{name} must have shape (anchors, candidates) = ({n}, {m}), got {tuple(given.shape)}")
    device = positive_index.device
    rows = torch.arange(n, device=device)
    positive_mask, mask = _with_positives(positive_index, self_index, mask, positives)
    excluded = _excluded_columns(n, m, positive_index, self_index, mask)
    if negatives == "all":
        plain = excluded is None
        if plain:
            allowed = torch.ones(n, m, dtype=torch.bool, device=device)
            if self_index is not None:
                has_self = self_index >= 0
                allowed[rows[has_self], self_index[has_self]] = False
                allowed[rows, positive_index] = True
        else:
            allowed = ~excluded
            if positive_mask is not None:
                allowed |= positive_mask
            allowed[rows, positive_index] = True
        return NegativeSelection(positive_index=positive_index, allowed=allowed, positive_mask=positive_mask,
                                 self_index=self_index, only_self_excluded=plain)

    k = negatives
    population = _population(m, positive_index, self_index, excluded)
    if excluded is None and self_index is None:
        # Every anchor has the m - 1 columns besides its positive: the counts
        # need no pass over the rows.
        any_short = k > m - 1
        short = population < k if any_short else None
    else:
        short = population < k
        any_short = bool(short.any())
    if any_short and on_shortage == "raise":
        raise ShortageError(shortage_message(k, f"{int(short.sum())} anchor(s)", int(population.min()), m))
    dense = dict(self_index=self_index, mask=mask if positives is None else (mask & ~positive_mask), positives=positives)
    if k >= m:
        # Every anchor is short (it has at most m - 1 candidates), on every rank: the
        # loss over all valid candidates, computed densely (a sampled row cannot hold
        # more entries than the bank has columns).
        return _select(positive_index, m, "all", **dense)
    if excluded is None and not any_short and (m - 1 if short is None else int(population.max())) == k:
        # K equals the candidate count: the standard loss, computed densely.
        return _select(positive_index, m, "all", self_index=self_index, on_shortage=on_shortage)

    if row_index is None:
        n_rows_global = n
    elif n_rows_global is None:
        raise ValueError("n_rows_global is required when row_index is given")
    valid = torch.ones(n, 1 + k, dtype=torch.bool, device=device)
    ranks = _draw_ranks(population.clamp(min=k), k, m, row_index, n_rows_global, generator)
    if any_short:
        # Anchors short of candidates take ranks 0..population-1, i.e. all of them.
        ranks = torch.where(short[:, None], torch.arange(k, device=device).expand(n, k), ranks)
        valid[:, 1:] = ranks < population[:, None]
        ranks = torch.where(valid[:, 1:], ranks, torch.zeros_like(ranks))

    if excluded is None:
        # The rank-th candidate skipping the (at most two) excluded columns:
        # adding a comparison adds one past each.
        low, high = positive_index, None
        if self_index is not None:
            has_self = self_index >= 0
            low = torch.where(has_self, torch.minimum(positive_index, self_index), positive_index)
            high = torch.where(has_self, torch.maximum(positive_index, self_index), m)  # m: never reached
        if device.type == "cpu" and not any_short:
            # These few passes over small arrays cost a fraction of torch's
            # per-call overhead in numpy (the same arithmetic).
            index = np.empty((n, 1 + k), dtype=np.int64)
            index[:, 0] = positive_index.numpy()
            index[:, 1:] = _skip_excluded(ranks.numpy(), low.numpy(), None if high is None else high.numpy())
            return NegativeSelection(positive_index=positive_index, index=torch.from_numpy(index), valid=valid,
                                     self_index=self_index)
        cols = _skip_excluded(ranks, low, high)
    else:
        # The rank-th allowed column: search the running count of allowed columns.
        counts = (~excluded).to(torch.int32).cumsum(dim=1)
        cols = torch.searchsorted(counts, (ranks + 1).to(torch.int32))
    if any_short:
        cols = torch.where(valid[:, 1:], cols, torch.zeros_like(cols))
    if positive_mask is None:
        index = torch.cat([positive_index[:, None], cols], dim=1)
        return NegativeSelection(positive_index=positive_index, index=index, valid=valid, self_index=self_index)
    # Several positives: every one of them, the paired one first, padded to the
    # largest count; then the K negatives.
    others = positive_mask.clone()
    others[rows, positive_index] = False
    count = others.sum(dim=1)
    slots = int(count.max()) if n else 0
    order = torch.sort(others.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :slots]
    extra_valid = torch.arange(slots, device=device)[None, :] < count[:, None]
    order = torch.where(extra_valid, order, torch.zeros_like(order))
    index = torch.cat([positive_index[:, None], order, cols], dim=1)
    valid = torch.cat([valid[:, :1], extra_valid, valid[:, 1:]], dim=1)
    return NegativeSelection(positive_index=positive_index, index=index, valid=valid, num_positive_slots=1 + slots,
                             self_index=self_index)


def _skip_excluded(ranks, low, high):
    """Bank column of the ``ranks``-th candidate of every row, skipping the
    columns ``low`` and ``high`` (None: only ``low``), ``low < high``; numpy
    arrays or tensors alike."""
    cols = ranks + (ranks >= low[:, None])
    if high is not None:
        cols += cols >= high[:, None]
    return cols


def _csr(index: Tensor, values: Tensor, num_columns: int) -> Tensor:
    """Row-major sparse (n, num_columns) matrix with K entries per row."""
    n, k = index.shape
    crow = torch.arange(0, n * k + 1, k, device=index.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            crow, index.reshape(-1), values.reshape(-1), (n, num_columns), check_invariants=False
        )


def _csr_transposed(index: Tensor, values: Tensor, num_columns: int) -> Tensor:
    """The transpose of :func:`_csr` as a row-major (num_columns, n) matrix."""
    n, k = index.shape
    flat = index.reshape(-1)
    if index.device.type == "cpu" and num_columns <= 1 << 16:
        # numpy's stable sort of 16-bit keys is a radix sort: about a tenth
        # of torch's sort of the same keys (2026-12-02, 8,000-66,000 entries).
        columns = flat.numpy()
        order_np = np.argsort(columns.astype(np.uint16 if num_columns > 1 << 15 else np.int16), kind="stable")
        order, rows = torch.from_numpy(order_np), torch.from_numpy(order_np // k)
        crow_np = np.zeros(num_columns + 1, dtype=np.int64)
        np.cumsum(np.bincount(columns, minlength=num_columns), out=crow_np[1:])
        crow = torch.from_numpy(crow_np)
    else:
        # int32 keys sort about twice as fast, and a bank never has 2**31 rows.
        order = torch.argsort(flat.to(torch.int32), stable=True)
        rows = order // k
        crow = torch.zeros(num_columns + 1, dtype=torch.long, device=index.device)
        crow[1:] = torch.bincount(flat, minlength=num_columns).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(
            crow, rows, values.reshape(-1)[order], (num_columns, n), check_invariants=False
        )


#: The sparse sampled products pay when the bank has at least this many
#: columns per selected entry of a row (``m >= SPARSE_MIN_RATIO * (P + K)``):
#: each sparse multiply-add costs about ten dense ones on a CPU (measured,
#: bench/bench_losses.py), so below the ratio one dense product over the whole
#: bank, read at the selected entries, is cheaper.
SPARSE_MIN_RATIO = 10


def sparse_pays(num_columns: int, slots: int) -> bool:
    """Whether :class:`_SampledDot` takes the sparse products for a bank of
    ``num_columns`` columns and ``slots`` selected entries per row (the rule
    on sizes; the values are the same either way up to rounding)."""
    return num_columns >= SPARSE_MIN_RATIO * slots


#: Up to this many (anchor, column) cells, the dense backward of a sampled
#: two-view call scatters the gradient's transpose in and runs one product
#: where it ran two. Past them the transpose's scattered writes miss the
#: caches: measured on the 2-core development machine (2026-12-04, one
#: thread, d = 128, the two ways' backward alone), 1.21 against 1.87 ms at
#: 2B = 512, K = 128; 29 against 37 ms and 46 against 49 ms at 2B = 2048,
#: K = 256 and 1024; 167 against 153 ms at 2B = 4096, K = 512.
TRANSPOSED_SCATTER_CELLS = 1 << 22


class _SampledDot(torch.autograd.Function):
    """``out[i, k] = <anchors[i], bank[index[i, k]]>`` for the selected entries.

    Sparse (most of the bank unselected, see :func:`sparse_pays`): a sampled
    dense-dense product (SDDMM) at the n*K selected entries; the backward
    multiplies the sparse (n, m) gradient with the bank and its transpose
    with the anchors. Each costs O(n K d), and nothing of size n*K*d is
    materialised (gathering K embeddings per anchor is 5-20x slower than the
    full loss on a CPU). Dense (a larger share of the bank selected): one
    (n, m) product read at the entries, and in the backward the gradient
    scattered into an (n, m) matrix for two dense products. Half-precision
    tensors, which the sparse kernels do not support, fall back to an
    explicit gather.
    """

    @staticmethod
    def forward(ctx, anchors: Tensor, bank: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        n, k = index.shape
        ctx.save_for_backward(anchors, bank, index)
        ctx.sparse = sparse_pays(bank.shape[0], k)
        # Two views in one bank: the anchors are the bank, and the backward's
        # two dense products are one (see backward) while the scattered
        # transpose's writes stay within the caches.
        ctx.anchors_are_bank = anchors is bank and n * bank.shape[0] <= TRANSPOSED_SCATTER_CELLS
        if anchors.dtype in (torch.float32, torch.float64):
            if not ctx.sparse:
                # The product's buffer is kept for the backward's (n, m)
                # gradient: writing into memory just used is cheaper than
                # into a fresh allocation (not when autocast made it half
                # precision: the backward, outside autocast, needs the inputs').
                product = anchors @ bank.t()
                ctx.buffer = product if product.dtype == anchors.dtype else None
                return product.gather(1, index)
            pattern = _csr(index, anchors.new_zeros(n * k), bank.shape[0])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                product = torch.sparse.sampled_addmm(pattern, anchors, bank.t(), beta=0.0)
            return product.values().view(n, k)
        picked = bank.index_select(0, index.reshape(-1)).view(n, k, -1)
        return torch.bmm(picked, anchors.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.sparse:  # the sparse products keep no graph; the dense ones and the gather do
            refuse_second_order(ctx)
        anchors, bank, index = ctx.saved_tensors
        # In the inputs' dtype: under autocast the forward's output (so its gradient) is half.
        grad = grad.to(anchors.dtype).contiguous()
        grad_anchors = grad_bank = None
        if anchors.dtype not in (torch.float32, torch.float64):
            picked = bank.index_select(0, index.reshape(-1)).view(*index.shape, -1)
            if ctx.needs_input_grad[0]:
                grad_anchors = torch.bmm(grad.unsqueeze(1), picked).squeeze(1)
            if ctx.needs_input_grad[1]:
                contrib = (grad.unsqueeze(-1) * anchors.unsqueeze(1)).reshape(-1, anchors.shape[1])
                grad_bank = torch.zeros_like(bank).index_add_(0, index.reshape(-1), contrib)
            return grad_anchors, grad_bank, None
        if not ctx.sparse:
            full = ctx.buffer if ctx.buffer is not None else anchors.new_empty(index.shape[0], bank.shape[0])
            ctx.buffer = None  # a second backward (retain_graph) allocates its own
            full.zero_().scatter_add_(1, index, grad)
            if ctx.anchors_are_bank:
                # full @ bank + full^T @ anchors is (full + full^T) @ bank: the
                # transpose's n*K entries scattered in (full[index[i, k], i],
                # through the transposed view) cost a fraction of a product.
                full.t().scatter_add_(1, index, grad)
                return full @ bank, None, None
            if ctx.needs_input_grad[0]:
                grad_anchors = full @ bank
            if ctx.needs_input_grad[1]:
                grad_bank = full.t() @ anchors
            return grad_anchors, grad_bank, None
        if ctx.needs_input_grad[0]:
            grad_anchors = _csr(index, grad, bank.shape[0]) @ bank
        if ctx.needs_input_grad[1]:
            grad_bank = _csr_transposed(index, grad, bank.shape[0]) @ anchors
        return grad_anchors, grad_bank, None


def selection_logits(
    anchors: Tensor, bank: Tensor, selection: NegativeSelection, temperature: float
) -> Tensor:
    """Logits of every anchor against its selected candidates.

    Parameters
    ----------
    anchors : Tensor (n, d)
    bank : Tensor (m, d)
        Used as given (normalise them first for cosine similarities).
    selection : NegativeSelection
        From :func:`select_negatives` for these n anchors and m columns.
    temperature : float
        The logits are ``anchors @ bank.T / temperature``.

    Returns
    -------
    A dense ``(n, m)`` matrix or a sampled ``(n, 1 + K)`` matrix (see
    :class:`NegativeSelection`); entries that are not candidates are ``-inf``.
    The positive's column is ``selection.positive_column``. Under autocast
    the product runs in half precision and the logits are returned in float32
    (as autocast's own cross-entropy computes), so the losses' per-anchor
    arithmetic and their value are float32.

    Examples
    --------
    >>> import torch
    >>> from negbatch import select_negatives, selection_logits
    >>> z = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    >>> positive, itself = torch.tensor([2, 3, 0, 1]), torch.tensor([0, 1, 2, 3])
    >>> dense = selection_logits(z, z, select_negatives(positive, 4, self_index=itself), 0.5)
    >>> dense.shape, int(dense.isinf().sum())  # each anchor's own column is out
    (torch.Size([4, 4]), 4)
    >>> selection_logits(z, z, select_negatives(positive, 4, 1, self_index=itself), 0.5).shape  # K = 1
    torch.Size([4, 2])
    """
    logits = _logits(anchors, bank, selection, temperature)
    if logits.dtype in (torch.float16, torch.bfloat16) and autocast_active(logits.device):
        logits = logits.float()
    return logits


def _logits(anchors: Tensor, bank: Tensor, selection: NegativeSelection, temperature: float) -> Tensor:
    if selection.is_dense:
        # The scale folded into the product, the exclusions filled in place:
        # no pass over the logits besides the product's own.
        logits = torch.addmm(anchors.new_zeros(()), anchors, bank.t(), beta=0.0, alpha=1.0 / temperature)
        if not selection.only_self_excluded:
            return logits.masked_fill_(~selection.allowed, float("-inf"))
        if selection.self_index is not None:
            has_self = selection.self_index >= 0
            rows = torch.arange(logits.shape[0], device=logits.device)[has_self]
            logits[rows, selection.self_index[has_self]] = float("-inf")
        return logits
    logits = _SampledDot.apply(anchors, bank, selection.index) / temperature
    if bool(selection.valid.all()):
        return logits
    return logits.masked_fill(~selection.valid, float("-inf"))
