"""negbatch's losses in sentence-transformers' loss protocol, optionally cached.

sentence-transformers gives a loss the tokenized text columns of a batch
(anchor, positive, then any number of negative columns) and the ``label``
column. :class:`NegbatchLoss` embeds every column with the model and calls the
wrapped loss by its kind:

* :class:`negbatch.InfoNCE` with ``form="query_document"``:
  ``loss(anchor, positive, hard_negatives=(B, H, d))``, the negative columns
  stacked (none: in-batch negatives only); ``negatives="all"`` or K sampled,
  ``symmetric`` as configured. ``form="two_view"``: exactly two columns.
* :class:`negbatch.ReLIC`: exactly two columns (it contrasts two views).
* :class:`negbatch.GlobalInfoNCE`: ``loss(anchor, positive, indices,
  hard_negatives=...)``, where ``indices`` is each row's data-set index, read
  from the ``label`` column (see :func:`with_index_column`); the per-sample
  state is keyed by it. In evaluation (the model in eval mode, or no autograd)
  the plain minibatch estimate is returned and the state is left alone.
* any other module: ``loss(anchor, positive[, hard_negatives])``
  (:func:`pair_loss_call`), or pass
  ``loss_call(loss, anchor, positive, hard, labels)``.

``cached=True`` (or ``chunk_size=N``) runs the step through
:class:`negbatch.GradCache`: every column is embedded chunk by chunk without a
graph, the loss is computed on the detached embeddings, and when the trainer
back-propagates the loss, a hook re-embeds each chunk with a graph and
back-propagates the embeddings' gradients into the model. The gradient is the
full batch's (exact), whatever the trainer scales the loss by (gradient
accumulation, a mixed-precision scaler): the scale reaches the embeddings'
gradients through autograd itself.

This module needs only torch; sentence-transformers calls it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..._checks import is_int
from ...gradcache import GradCache
from ...losses._softmax import SoftmaxLoss
from ...losses.global_nce import GlobalInfoNCE
from ...losses.relic import ReLIC

__all__ = ["NegbatchLoss", "with_index_column", "trim_padding", "INDEX_COLUMN",
           "LossCall", "pair_loss_call", "indexed_loss_call"]

LossCall = Callable[[nn.Module, Tensor, Tensor, "Tensor | None", Tensor], Tensor]


def pair_loss_call(loss: nn.Module, queries: Tensor, documents: Tensor, hard_negatives: Tensor | None,
                   indices: Tensor) -> Tensor:
    """``loss(queries, documents[, hard_negatives])``; ``indices`` is not used."""
    if hard_negatives is None:
        return loss(queries, documents)
    return loss(queries, documents, hard_negatives)


def indexed_loss_call(loss: nn.Module, queries: Tensor, documents: Tensor, hard_negatives: Tensor | None,
                      indices: Tensor) -> Tensor:
    """``loss(queries, documents, indices)``: for losses that keep state per data-set sample."""
    if hard_negatives is not None:
        raise ValueError("indexed_loss_call takes no hard negatives; use pairs without them")
    return loss(queries, documents, indices)

#: The columns sentence-transformers reads as labels: it hands a loss only its text
#: columns and one of these; every other column is tokenized as text.
LABEL_COLUMNS = ("label", "labels", "score", "scores")

#: The column that carries each row's data-set index to the loss.
INDEX_COLUMN = "label"

#: Rows per chunk when ``cached=True`` is given without ``chunk_size`` (as CachedMNRL's default).
DEFAULT_CHUNK_SIZE = 32


def with_index_column(dataset: Any, name: str = INDEX_COLUMN) -> Any:
    """The data set with a column ``name`` holding each row's index ``0 .. N-1``.

    A ``DatasetDict`` (sentence-transformers' multi-dataset training) is
    numbered across its splits, one after the other: the first split's rows
    get ``0 .. N_1-1``, the next split's ``N_1 .. N_1+N_2-1``, and so on, so
    that one loss serving every split (``num_samples`` = all rows) never
    gives two rows one state; numbering each split from 0 would.

    ``name`` must be a column sentence-transformers passes to the loss as its
    labels (``label``, ``labels``, ``score`` or ``scores``); any other column
    would be tokenized as text.

    :class:`negbatch.GlobalInfoNCE` keeps one normaliser per training row and
    finds a batch's rows by these indices; sentence-transformers passes the
    ``label`` column to the loss, so that is where they go.

    Examples
    --------
    >>> from datasets import Dataset  # doctest: +SKIP
    >>> data = with_index_column(Dataset.from_dict({"anchor": ["a", "b"], "positive": ["c", "d"]}))  # doctest: +SKIP
    >>> data["label"]  # doctest: +SKIP
    [0, 1]
    """
    if _is_dataset_dict(dataset):
        start, numbered = 0, {}
        for split, rows in dataset.items():
            numbered[split] = _add_index_column(rows, name, start, f"dataset[{split!r}]")
            start += len(rows)
        return type(dataset)(numbered)
    return _add_index_column(dataset, name, 0, "dataset")


def _is_dataset_dict(dataset: Any) -> bool:
    """A datasets.DatasetDict (or IterableDatasetDict-like mapping of splits), without importing datasets."""
    return isinstance(dataset, Mapping) and bool(dataset) and all(
        hasattr(split, "add_column") for split in dataset.values())


def _add_index_column(dataset: Any, name: str, start: int, what: str) -> Any:
    columns = getattr(dataset, "column_names", None)
    if columns is None or not hasattr(dataset, "add_column"):
        raise TypeError(f"{what} must be a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")
    if name not in LABEL_COLUMNS:
        # The trainer would tokenize a column of any other name as text and fail on its ints.
        raise ValueError(
            f"name={name!r}: sentence-transformers passes the loss only a label column "
            f"({', '.join(map(repr, LABEL_COLUMNS))}) and tokenizes every other column as text, so the "
            f"index column must be one of these; keep the default {INDEX_COLUMN!r}"
        )
    taken = [c for c in (*LABEL_COLUMNS, name) if c in columns]
    if taken:
        raise ValueError(
            f"{what} already has a {taken[0]!r} column; sentence-transformers passes one label column "
            f"({', '.join(LABEL_COLUMNS)}) to the loss and tokenizes every other column as "
            f"text, so the data-set index ({name!r}) must be the only one: rename or remove {taken[0]!r} first"
        )
    return dataset.add_column(name, list(range(start, start + len(dataset))))


def _sentence_embedding(output: Any) -> Tensor:
    return output["sentence_embedding"]


def _rows(features: Mapping[str, Any], start: int, stop: int, n: int) -> dict[str, Any]:
    """Rows ``start:stop`` of a tokenizer dict; entries that are not (n, ...) tensors stay whole."""
    return {k: v[start:stop] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in features.items()}


def trim_padding(features: Mapping[str, Any]) -> Mapping[str, Any]:
    """The features without the trailing columns that no row attends to.

    Every tensor of at least two dimensions whose second dimension is the
    ``attention_mask``'s width is cut to the last column any row attends to;
    everything else is kept. Features without a 2-d ``attention_mask`` (or
    without a column to drop) come back as they are.

    Examples
    --------
    >>> f = {"input_ids": torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]]),
    ...      "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]), "modality": "text"}
    >>> {k: tuple(v.shape) if isinstance(v, Tensor) else v for k, v in trim_padding(f).items()}
    {'input_ids': (2, 2), 'attention_mask': (2, 2), 'modality': 'text'}
    """
    mask = features.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return features
    width = mask.shape[1]
    attended = torch.nonzero(mask.bool().any(dim=0))
    if attended.numel() == 0:
        return features
    keep = int(attended.max()) + 1
    if keep == width:
        return features
    return {k: v[:, :keep] if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == width else v
            for k, v in features.items()}


def _trim_first_argument(module: nn.Module, args: tuple, kwargs: dict):
    if args and isinstance(args[0], Mapping):
        return (trim_padding(args[0]), *args[1:]), kwargs
    return None


def _batch_rows(features: Mapping[str, Any]) -> int:
    for key in ("input_ids", "attention_mask"):
        if isinstance(features.get(key), Tensor):
            return int(features[key].shape[0])
    for value in features.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("a text column's features hold no tensor; they must come from the model's tokenizer")


@contextlib.contextmanager
def _queue_set_aside(loss: SoftmaxLoss):
    """The loss without its queue (neither read nor written) for a while."""
    queue = loss.queue
    loss.queue = None
    try:
        yield
    finally:
        loss.queue = queue


class NegbatchLoss(nn.Module):
    """A negbatch loss as a sentence-transformers loss, with optional gradient caching.

    Parameters
    ----------
    model : SentenceTransformer
        The model being trained (the trainer may swap it for a wrapped copy).
    loss : nn.Module
        :class:`negbatch.InfoNCE`, :class:`negbatch.ReLIC`,
        :class:`negbatch.GlobalInfoNCE`, or any module with ``loss_call``.
        Build negbatch losses with keyword arguments, e.g.
        ``InfoNCE(temperature=0.05, form="query_document")``.
    cached : bool, default False
        Gradient caching (GradCache): memory of one chunk of rows whatever the
        batch size, the gradient of the whole batch.
    chunk_size : int, optional
        Rows per chunk of every column; giving it implies ``cached=True``.
        Default 32.
    trim_padding : bool, default True
        Cached only: each chunk is embedded without the trailing columns that
        none of its rows attends to (``attention_mask`` 0), as CachedMNRL
        does: a chunk of short texts is not computed at the width of the
        batch's longest. Exact (up to rounding) for encoders whose outputs for
        the real tokens do not depend on padding after them, such as BERT-style
        models with an attention mask; pass False otherwise.
    loss_call : callable, optional
        ``loss_call(loss, anchor, positive, hard_negatives_or_None, labels)``
        for losses other than the three above, e.g.
        :func:`indexed_loss_call`; default for them :func:`pair_loss_call`.

    Notes
    -----
    The number of negative columns may be anything (0, 1, H): they become
    ``hard_negatives`` of shape (B, H, d), one row per anchor. ``labels`` is
    the ``label`` column (None without one).

    With ``track_false_negatives`` on (set by
    :class:`~negbatch.integrations.sentence_transformers.NegbatchDiagnostics`),
    :attr:`last_false_negatives` holds ``(false, total)`` after each call: how
    many of the batch's candidate negatives have the anchor's label, and how
    many candidates there are.

    Examples
    --------
    >>> from negbatch import InfoNCE
    >>> from negbatch.integrations.sentence_transformers import NegbatchLoss
    >>> from negbatch.models.text import load_minilm  # doctest: +SKIP
    >>> model = load_minilm("cpu")  # doctest: +SKIP
    >>> loss = NegbatchLoss(model, InfoNCE(temperature=0.05, form="query_document"), chunk_size=16)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        *,
        cached: bool = False,
        chunk_size: int | None = None,
        trim_padding: bool = True,
        loss_call: LossCall | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(loss, nn.Module):
            raise TypeError(f"loss must be a torch.nn.Module (a negbatch loss), got {type(loss).__name__}")
        if loss_call is not None and not callable(loss_call):
            raise TypeError("loss_call must be callable: loss_call(loss, anchor, positive, hard_negatives, labels)")
        # A user's loss_call decides what the columns mean; without one, a two-view loss takes exactly two.
        self._own_call = loss_call is not None
        if loss_call is None and not isinstance(loss, (SoftmaxLoss, ReLIC, GlobalInfoNCE)):
            loss_call = pair_loss_call  # loss(anchor, positive[, hard_negatives]), e.g. SigLIP
        if not isinstance(cached, bool):
            raise TypeError(f"cached must be True or False, got {cached!r}")
        if not isinstance(trim_padding, bool):
            raise TypeError(f"trim_padding must be True or False, got {trim_padding!r}")
        if chunk_size is not None:
            if not is_int(chunk_size) or chunk_size < 1:
                raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
            cached = True
        self.model = model
        self.loss = loss
        self.loss_call = loss_call
        self.cached = cached
        self.chunk_size = int(chunk_size) if chunk_size is not None else DEFAULT_CHUNK_SIZE
        self.trim_padding = trim_padding
        # sentence-transformers asks this of a loss that back-propagates inside a hook.
        self.uses_gradient_cache = cached
        #: Set by NegbatchDiagnostics: count the false negatives of every batch.
        self.track_false_negatives = False
        self.last_false_negatives: tuple[int, int] | None = None
        #: Keys whose equality makes a candidate a false negative (set by NegbatchDiagnostics).
        self.false_negative_keys: Tensor | None = None

    # ------------------------------------------------------------------ protocol

    @property
    def calculate_loss(self):
        # sentence-transformers' wrappers of gradient-caching losses (MatryoshkaLoss) look this up on a
        # loss with uses_gradient_cache and decorate it; a cached NegbatchLoss back-propagates its chunks
        # from a hook instead, so a wrapper would fail far from here (or be silently ignored): say so.
        if self.cached:
            raise TypeError(
                "a cached NegbatchLoss cannot be wrapped by MatryoshkaLoss (or another wrapper of sentence-"
                "transformers' Cached... losses): use NegbatchLoss(..., cached=False) inside MatryoshkaLoss, "
                "or CachedMultipleNegativesRankingLoss for Matryoshka with caching"
            )
        raise AttributeError("calculate_loss")

    def forward(self, sentence_features: Iterable[Mapping[str, Any]], labels: Tensor | None) -> Tensor:
        features = [dict(f) for f in sentence_features]
        if len(features) < 2:
            raise ValueError(
                f"the data set needs an anchor and a positive column (then optional negative columns), got "
                f"{len(features)} text column(s)"
            )
        self._check_columns(len(features))
        if self.track_false_negatives and torch.is_grad_enabled() and self._training():
            self.last_false_negatives = self._false_negatives(features, labels)
        if not torch.is_grad_enabled():
            return self._loss_on(self._embed_without_graph(features), labels)
        if not self.cached:
            return self._loss_on([self.model(f)["sentence_embedding"] for f in features], labels)
        return self._cached_forward(features, labels)

    def get_config_dict(self) -> dict[str, Any]:
        # sentence-transformers writes this into the model card.
        config: dict[str, Any] = {"loss": repr(self.loss), "cached": self.cached}
        if self.cached:
            config["chunk_size"] = self.chunk_size
        if self.loss_call is not None:
            config["loss_call"] = getattr(self.loss_call, "__name__", repr(self.loss_call))
        return config

    # ------------------------------------------------------------------ the loss

    def _check_columns(self, n: int) -> None:
        if self._own_call:
            return
        two_views = isinstance(self.loss, ReLIC) or getattr(self.loss, "form", None) == "two_view"
        if two_views and n != 2:
            relic = isinstance(self.loss, ReLIC)  # the one without a query_document form
            name = type(self.loss).__name__ + ("" if relic else "(form='two_view')")
            fix = ("InfoNCE or GlobalInfoNCE with form='query_document'" if relic
                   else f"{type(self.loss).__name__}(form='query_document')")
            raise ValueError(
                f"{name} contrasts two views of each row: the data set needs exactly 2 text columns, got {n}; for "
                f"negative columns use {fix}"
            )

    def _indices(self, labels: Tensor | None, rows: int) -> Tensor:
        loss = self.loss
        if labels is None:
            need = ("GlobalInfoNCE keeps one normaliser per training row, so it" if isinstance(loss, GlobalInfoNCE)
                    else "a loss with a queue never lets a row meet its own queued entries, so it")
            raise ValueError(
                f"{need} needs each row's data-set index: add a "
                f"{INDEX_COLUMN!r} column holding 0 .. N-1 (with_index_column(dataset) does it; sentence-"
                f"transformers passes only that column to the loss)"
            )
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != rows:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"the {INDEX_COLUMN!r} column must hold one data-set index per row ({rows}), got {shape}")
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            name = type(loss).__name__ + ("" if isinstance(loss, GlobalInfoNCE) else " with a queue")
            raise TypeError(
                f"the {INDEX_COLUMN!r} column must hold integer data-set indices for {name}, got {labels.dtype}"
                f" (is it a score or class column? {name} needs the row index there: with_index_column)"
            )
        low, high = int(labels.min()), int(labels.max())
        if not isinstance(loss, GlobalInfoNCE):
            if low < 0:
                raise ValueError(f"the {INDEX_COLUMN!r} column holds {low}: data-set indices are >= 0")
            return labels.to(torch.long)
        if low < 0 or high >= loss.num_samples:
            raise ValueError(
                f"the {INDEX_COLUMN!r} column holds indices in [{low}, {high}], outside [0, {loss.num_samples}): "
                f"GlobalInfoNCE(num_samples={loss.num_samples}) keeps state for that many rows; build it with "
                f"num_samples=len(train_dataset) and index the rows 0 .. N-1 (with_index_column)"
            )
        return labels.to(torch.long)

    def _loss_on(self, embeddings: Sequence[Tensor], labels: Tensor | None) -> Tensor:
        anchor, positive, *negatives = embeddings
        hard = torch.stack(list(negatives), dim=1) if negatives else None
        loss = self.loss
        if self.loss_call is not None:
            return self.loss_call(loss, anchor, positive, hard, labels)
        if isinstance(loss, GlobalInfoNCE):
            if not (torch.is_grad_enabled() and self._training()):
                return loss.minibatch_loss(anchor, positive, hard_negatives=hard)
            indices = self._indices(labels, anchor.shape[0]).to(loss.log_nu.device)
            return loss(anchor, positive, indices, hard_negatives=hard)
        if isinstance(loss, SoftmaxLoss) and loss.queue is not None:
            if not (torch.is_grad_enabled() and self._training()):
                # Evaluation rows are not the training rows the queue holds
                # (their indices would mask the wrong entries): their loss is
                # the in-batch one, as GlobalInfoNCE's minibatch loss is.
                with _queue_set_aside(loss):
                    return self._loss_on(embeddings, labels)
            indices = self._indices(labels, anchor.shape[0]).to(anchor.device)
            if loss.form == "query_document":
                return loss(anchor, positive, hard_negatives=hard, indices=indices)
            return loss(anchor, positive, indices=indices)
        if isinstance(loss, SoftmaxLoss) and loss.form == "query_document":
            return loss(anchor, positive, hard_negatives=hard)
        return loss(anchor, positive)

    def _training(self) -> bool:
        model = getattr(self.model, "module", self.model)  # DistributedDataParallel keeps the model here
        return bool(model.training)

    # ------------------------------------------------------------------ embedding

    @torch.no_grad()
    def _embed_without_graph(self, features: list[dict[str, Any]]) -> list[Tensor]:
        """Evaluation: no graph, so no cache is needed; cached losses still embed chunk by chunk."""
        out = []
        for f in features:
            n = _batch_rows(f)
            step = self.chunk_size if self.cached else n
            trim = trim_padding if self.cached and self.trim_padding else (lambda rows: rows)
            parts = [self.model(trim(_rows(f, s, s + step, n)))["sentence_embedding"] for s in range(0, n, step)]
            out.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        return out

    def _cached_forward(self, features: list[dict[str, Any]], labels: Tensor | None) -> Tensor:
        # Each column is one input of GradCache, given as [features] so that the model receives
        # the dict as its one positional argument (GradCache copies it for every call).
        cache = GradCache(self.model, self._loss_on, self.chunk_size, output_fn=_sentence_embedding)
        with self._trimming():
            batch = cache.forward_no_grad(*[[f] for f in features])
        leaves = [r.detach().requires_grad_(True) for r in batch.representations]
        loss = self._loss_on(leaves, labels)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("the loss must return a scalar tensor; give the wrapped loss reduction='mean'")
        if not loss.requires_grad:
            raise ValueError("the loss does not depend on the embeddings (no gradient reaches them)")

        def replay(grads: Sequence[Tensor | None]) -> None:
            # Runs inside the trainer's backward, once the embeddings' gradients are known
            # (already multiplied by whatever the trainer scaled the loss by): re-embed every
            # chunk with a graph and back-propagate them into the model.
            batch.gradients = list(grads)
            with torch.enable_grad(), self._trimming():  # autograd runs hooks with grad mode off
                cache.backward_chunks(batch)

        torch.autograd.graph.register_multi_grad_hook(leaves, replay)
        return loss

    @contextlib.contextmanager
    def _trimming(self):
        """While GradCache embeds chunks: the model (inside DistributedDataParallel, if wrapped,
        so that GradCache still sees the DDP module and synchronises once) gets each chunk's
        features without their trailing all-padding columns."""
        if not self.trim_padding:
            yield
            return
        inner = getattr(self.model, "module", self.model)
        handle = inner.register_forward_pre_hook(_trim_first_argument, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    # ------------------------------------------------------------------ diagnostics

    @torch.no_grad()
    def _false_negatives(self, features: list[dict[str, Any]], labels: Tensor | None) -> tuple[int, int]:
        """``(false, total)`` candidate negatives of the batch: another row's positive whose
        key equals the anchor row's, or a negative-column text equal to the anchor's
        positive text. Keys: ``false_negative_keys[index]`` when set (the ``label``
        column holds the indices), otherwise the positive's text (its token ids)."""
        rows = _batch_rows(features[1])
        codes: dict[tuple[int, ...], int] = {}
        texts = [torch.tensor([codes.setdefault(t, len(codes)) for t in _token_rows(f, rows)]) for f in features[1:]]
        keys = self.false_negative_keys
        if keys is not None:
            if labels is None or labels.is_floating_point() or labels.dim() != 1:
                raise ValueError(
                    f"false-negative keys are looked up by each row's data-set index: add the {INDEX_COLUMN!r} "
                    f"column (with_index_column(dataset)), or count by text without keys"
                )
            index = labels.to(device=keys.device, dtype=torch.long)
            if int(index.min()) < 0 or int(index.max()) >= keys.shape[0]:
                raise ValueError(
                    f"the {INDEX_COLUMN!r} column holds indices outside [0, {keys.shape[0]}), the number of "
                    f"false-negative keys: give one key per training row"
                )
            row_keys = keys[index].cpu()
        else:
            row_keys = texts[0]
        same = row_keys[:, None] == row_keys[None, :]
        false = int(same.sum()) - rows  # the diagonal is each anchor's own positive
        total = rows * (rows - 1)
        for column in texts[1:]:  # every anchor sees every row's hard negatives
            false += int((texts[0][:, None] == column[None, :]).sum())
            total += rows * rows
        return false, total


def _token_rows(features: Mapping[str, Any], rows: int) -> list[tuple[int, ...]]:
    """Each row's text as its token ids (padding dropped): equal texts, equal tuples."""
    ids = features.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != rows:
        return [(-1 - i,) for i in range(rows)]  # no token ids: no two rows are known equal
    mask = features.get("attention_mask")
    ids_list = ids.tolist()
    if isinstance(mask, Tensor) and mask.shape == ids.shape:
        keep = mask.bool().tolist()
        return [tuple(t for t, k in zip(row, m) if k) for row, m in zip(ids_list, keep)]
    return [tuple(row) for row in ids_list]
