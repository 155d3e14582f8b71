"""A queue of past embeddings as extra negatives (MoCo's queue, a memory bank).

He et al. ("Momentum Contrast for Unsupervised Visual Representation
Learning", 2020) decouple the number of negatives from the batch: the keys of
the last batches wait in a fixed-size first-in-first-out queue and every
query is contrasted with them too (65,536 keys at a batch of 256). Wu et al.
(2018) kept one entry per data-set sample instead (a memory bank); PML's
CrossBatchMemory and lightly's ``memory_bank_size`` are such queues.

:class:`NegativeQueue` is the state; a loss built with ``queue_size=N``
(:class:`negbatch.InfoNCE`, :class:`negbatch.DCL`) owns one and

1. appends the queue's entries to each direction's candidate bank, never an
   anchor's own entries (the same data-set index) and, with labels, masking
   (or, with ``positives="mask"``, adding as positives) the same-label ones;
2. computes its loss (``negatives=K`` samples from batch and queue alike);
3. enqueues the batch's embeddings, detached, *after* the loss: the
   entries of this step are negatives from the next step on. Under
   ``torch.distributed`` it enqueues the batch of every rank, so that every
   rank's queue is the same; a call that one rank refuses (NaN, an
   anchor short of K) is refused by every rank before this step, so that
   the queues stay the same. Rows holding NaN or inf are left out (with a
   warning), also when the loss's own ``check_finite`` is off: one such row
   would make the loss of every later call NaN until it leaves the queue.

The queue's entries are the candidates of the direction they were taken
from: for ``two_view`` both views of every sample (2B entries per step);
for ``query_document`` the documents (B per step; without their hard
negatives) and, with ``symmetric``, the queries for the document-to-query
direction.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .._checks import all_finite, is_int

__all__ = ["NegativeQueue"]


class NegativeQueue(nn.Module):
    """Fixed-size FIFO queues of detached embeddings with their data-set
    indices and labels, one queue per anchor direction.

    Parameters
    ----------
    size : int
        Entries per queue; once full, each enqueue overwrites the oldest.
    roles : int, default 1
        Number of queues (one per direction of the loss that owns them).

    State
    -----
    ``embeddings`` (roles, size, d), ``indices`` (roles, size) long,
    ``labels`` (roles, size) long, ``labelled`` (roles, size) bool (whether
    the entry came with a label), ``pointer`` (roles,) long (the next slot to
    write) and ``filled`` (roles,) long (entries held). The width d and the
    dtype are taken from the first enqueue, the dtype at least float32:
    half-precision entries (under ``torch.autocast``, from a bfloat16 model)
    are stored in float32, exactly, so that a first call under autocast does
    not round every later full-precision entry to bfloat16 (float64 entries
    keep float64). ``load_state_dict`` adopts the saved width and dtype (at
    least float32 again), so a fresh queue loads any checkpoint
    (``torch.load`` with ``weights_only=True`` reads it: every entry is a
    tensor). Later entries are cast to the queue's dtype: a call in another
    precision than the first (a float32 sanity check before autocast
    training, a bfloat16 checkpoint evaluated in float32) is stored, not
    refused; ``.double()`` (or ``.half()``) on the loss converts a filled
    queue.

    Rows holding NaN or inf are never stored: :meth:`enqueue` leaves them
    out and warns, and ``dropped`` counts them (since the queue was built;
    not saved with the state).

    Examples
    --------
    >>> import torch
    >>> from negbatch.losses import NegativeQueue
    >>> q = NegativeQueue(3)
    >>> q.enqueue(0, torch.eye(2), torch.tensor([7, 8]))
    >>> q.enqueue(0, torch.ones(2, 2), torch.tensor([9, 10]))   # 4 entries into 3 slots: 7 leaves
    >>> q.entries(0)[1].tolist()   # slot order: 10 overwrote 7
    [10, 8, 9]
    """

    embeddings: Tensor
    indices: Tensor
    labels: Tensor
    labelled: Tensor
    pointer: Tensor
    filled: Tensor

    def __init__(self, size: int, roles: int = 1) -> None:
        super().__init__()
        if not is_int(size) or size < 1:
            raise ValueError(f"size must be a positive int (entries kept per queue; the losses' queue_size), got {size!r}")
        if not is_int(roles) or roles < 1:
            raise ValueError(f"roles must be a positive int, got {roles!r}")
        size, roles = int(size), int(roles)
        self.size = size
        self.register_buffer("embeddings", torch.zeros(roles, size, 0))
        self.register_buffer("indices", torch.full((roles, size), -1, dtype=torch.long))
        self.register_buffer("labels", torch.zeros(roles, size, dtype=torch.long))
        self.register_buffer("labelled", torch.zeros(roles, size, dtype=torch.bool))
        self.register_buffer("pointer", torch.zeros(roles, dtype=torch.long))
        self.register_buffer("filled", torch.zeros(roles, dtype=torch.long))
        #: Rows that :meth:`enqueue` left out because they held NaN or inf.
        self.dropped = 0

    @property
    def roles(self) -> int:
        return self.indices.shape[0]

    def extra_repr(self) -> str:
        return f"size={self.size}, roles={self.roles}, filled={self.filled.tolist()}"

    def __len__(self) -> int:
        """Entries held by the first queue."""
        return int(self.filled[0])

    def _role(self, role: object) -> int:
        """``role`` checked: a negative int would index another queue from the end."""
        if not is_int(role) or not 0 <= role < self.roles:
            raise ValueError(f"role must be an int in [0, {self.roles}) (this queue holds {self.roles}), got {role!r}")
        return int(role)

    def entries(self, role: int) -> tuple[Tensor, Tensor]:
        """The filled slots of queue ``role``: embeddings (Q, d) and data-set
        indices (Q,) (slot order; the oldest entry is at ``pointer`` once the
        queue is full)."""
        q = int(self.filled[self._role(role)])
        return self.embeddings[role, :q], self.indices[role, :q]

    def entry_labels(self, role: int) -> tuple[Tensor, Tensor] | None:
        """Labels (Q,) of the filled slots of queue ``role`` and whether each
        entry has one (Q,) bool; None when no entry has a label."""
        q = int(self.filled[self._role(role)])
        if not bool(self.labelled[role, :q].any()):
            return None
        return self.labels[role, :q], self.labelled[role, :q]

    @torch.no_grad()
    def enqueue(self, role: int, embeddings: Tensor, indices: Tensor, labels: Tensor | None = None) -> None:
        """Append detached ``embeddings`` (E, d) with their data-set
        ``indices`` (E,) and optional ``labels`` (E,), overwriting the oldest
        entries once the queue is full (of more than ``size`` rows, only the
        last ``size`` are kept). Rows holding NaN or inf are left out, with a
        warning (counted in ``dropped``)."""
        self._role(role)
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
            got = f"shape {tuple(embeddings.shape)}, dtype {embeddings.dtype}" if isinstance(embeddings, Tensor) \
                else type(embeddings).__name__
            raise ValueError(f"embeddings must be a 2-d floating-point tensor (E, d), one row per entry, got {got}")
        for name, value in (("indices", indices), ("labels", labels)):
            if value is not None and (not isinstance(value, Tensor) or value.is_floating_point() or value.is_complex()
                                      or value.dtype == torch.bool):
                got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(f"{name} must be an integer tensor (torch.long), one per embedding, got {got}")
        embeddings = embeddings.detach()
        e, d = embeddings.shape
        if indices.shape != (e,) or (labels is not None and labels.shape != (e,)):
            raise ValueError(f"indices (and labels) must have shape ({e},), one per embedding")
        self.check_width(d)
        if self.embeddings.shape[2] != d:
            # The first entries decide the width and the dtype (at least float32).
            self._allocate((self.roles, self.size, d), embeddings.dtype)
        if not all_finite(embeddings):
            embeddings, indices, labels = self._finite_rows(embeddings, indices, labels)
            e = embeddings.shape[0]
        if e > self.size:
            embeddings, indices = embeddings[-self.size :], indices[-self.size :]
            labels = labels[-self.size :] if labels is not None else None
            e = self.size
        start = int(self.pointer[role])
        slots = (torch.arange(e, device=self.indices.device) + start) % self.size
        # Cast to the queue's dtype: the precision may change between calls
        # (autocast on or off); index_put would refuse the mismatch.
        self.embeddings[role, slots] = embeddings.to(device=self.embeddings.device, dtype=self.embeddings.dtype)
        self.indices[role, slots] = indices.to(device=self.indices.device, dtype=torch.long)
        if labels is not None:
            self.labels[role, slots] = labels.to(device=self.indices.device, dtype=torch.long)
        self.labelled[role, slots] = labels is not None
        self.pointer[role] = (start + e) % self.size
        self.filled[role] = min(self.size, int(self.filled[role]) + e)

    def _finite_rows(self, embeddings: Tensor, indices: Tensor,
                     labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The rows of ``embeddings`` without NaN or inf, with their indices and labels.

        Left out rather than refused: a loss built with ``check_finite=False``
        (an fp16 loop whose GradScaler skips the steps that overflow) returns
        this call's NaN loss and goes on; a queued NaN row would turn the loss
        of every later step NaN, each skipped in turn, until ``size`` entries
        had pushed it out. Raising here would stop the very loop that chose to
        let the scaler handle overflows.
        """
        keep = torch.isfinite(embeddings).all(dim=1)
        left_out = int((~keep).sum())
        if not left_out:  # finite rows whose sum overflowed (all_finite's slow path)
            return embeddings, indices, labels
        self.dropped += left_out
        warnings.warn(
            f"NegativeQueue: left out {left_out} of {embeddings.shape[0]} rows holding NaN or inf (the queue keeps "
            "finite entries only); check the encoder's output (learning rate too high, fp16 overflow)",
            RuntimeWarning, stacklevel=3,
        )
        kept_labels = None if labels is None else labels[keep.to(labels.device)]
        return embeddings[keep], indices[keep.to(indices.device)], kept_labels

    def fits(self, d: int) -> bool:
        """Whether entries of width ``d`` can join the queue's (an empty queue takes any width)."""
        return self.embeddings.shape[2] == d or not int(self.filled.sum())  # the shape first: no tensor op per call

    def check_width(self, d: int, where: str = "") -> None:
        """Raise if the queue holds entries of another width than ``d``
        (``where``: whose they are, e.g. ``" on rank 1"``)."""
        if not self.fits(d):
            raise ValueError(
                f"the queue holds embeddings of width {self.embeddings.shape[2]}, got width {d}{where}: the encoder's "
                "output width changed; call reset() on the queue (loss.queue.reset()) to start it afresh"
            )

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        # At least float32: a first call under autocast fixed bfloat16 for
        # good, and every later float32 entry was rounded to it (and the
        # dtype depended on which call came first). Half-precision entries
        # are exact in float32.
        dtype = torch.promote_types(dtype, torch.float32)
        # Never an inference tensor, even when the first call runs under
        # torch.inference_mode() (an evaluation pass, a sanity check): later
        # enqueues outside that mode could not write into it.
        with torch.inference_mode(False):
            self.embeddings = torch.zeros(shape, dtype=dtype, device=self.indices.device)

    def reset(self) -> None:
        """Empty every queue."""
        with torch.no_grad():
            self.indices.fill_(-1)
            self.labelled.fill_(False)
            self.pointer.zero_()
            self.filled.zero_()

    def _refusal(self, state_dict, prefix: str) -> str:
        """Why a saved state is refused (empty: it is not): a queue of
        another size or number of roles, refused before anything is copied
        (torch would copy the matching pointer and fill count and leave this
        queue inconsistent; see :meth:`negbatch.losses._layout.BankLoss.load_state_dict`)."""
        saved = state_dict.get(prefix + "indices")
        if not isinstance(saved, Tensor) or tuple(saved.shape) == tuple(self.indices.shape):
            return ""
        hints = []
        if saved.shape[-1] != self.size:
            hints.append(f"queue_size={saved.shape[-1]}")
        if saved.shape[0] != self.roles:
            # One queue per anchor role: two_view and one-directional
            # query_document keep 1, symmetric query_document 2.
            hints.append("form='query_document', symmetric=True" if saved.shape[0] == 2
                         else "form='two_view' or symmetric=False")
        return (f"{prefix}indices: the checkpoint's queue holds {tuple(saved.shape)} (roles, size) entries, this one "
                f"{tuple(self.indices.shape)}; build the loss with {', '.join(hints)} to load it")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        refused = self._refusal(state_dict, prefix)
        if refused:
            error_msgs.append(refused)
            return
        # The width of the entries is known once the first batch arrives: take
        # the saved one, so that a fresh queue loads a checkpoint.
        saved = state_dict.get(prefix + "embeddings")
        if (isinstance(saved, Tensor) and saved.dim() == 3 and saved.shape != self.embeddings.shape
                and tuple(saved.shape[:2]) == (self.roles, self.size)):
            self._allocate(tuple(saved.shape), saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
