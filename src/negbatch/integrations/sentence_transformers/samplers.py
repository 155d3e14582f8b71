"""negbatch's batch samplers as sentence-transformers batch samplers.

``SentenceTransformerTrainingArguments(batch_sampler=...)`` accepts a
function ``(dataset, batch_size, drop_last, valid_label_columns, generator,
seed) -> DefaultBatchSampler``. Each class here is such a function (build it
once, with its options) and a ``TrainerCallback`` (pass the same object in
``callbacks=[...]``). The class itself is not: sentence-transformers would build
a class given there from the data set and the batch size, and it is refused
with the object to pass instead.

* :class:`GCBSBatches`: global contrastive batch sampling (Sachidananda et
  al. 2023). Before each epoch the training set's anchor and positive columns
  are embedded with the model being trained (in eval mode, without a graph),
  and the batches are consecutive runs of the GCBS order; ``refresh_every=n``
  re-embeds and re-plans the rows not yet seen after every n batches.
* :class:`HardNegativeBatches`: k-means on the anchors' embeddings, batches
  filled one cluster at a time (near neighbours as in-batch negatives).
* :class:`NoDuplicateBatches`: random batches in which no two rows share a
  key (by default the positive column's text), so no copy of a positive is
  another anchor's negative.
* :class:`RandomBatches`: a random permutation per epoch (the baseline,
  seeded like the others).

**Prompts, routes, max_length.** The model-based samplers embed the texts as
the trainer's data collator presents them to the model: each column of each
data set with the prompt the trainer's ``prompts`` give it (:func:`column_prompt`),
the task its ``router_mapping`` gives it (:func:`column_task`: a ``Router``
sends queries and documents through other modules) and the collator's
``max_length`` for that task (:func:`column_preprocess_kwargs`). The callback
reads them from the trainer; without it the texts are embedded bare.

**Epochs.** The trainer calls ``set_epoch`` before each epoch; the plan of an
epoch depends on the seed and the epoch (and, for the first two, the model
at the epoch's start).

**Several processes.** A batch is the *global* batch: ``per_device_train_batch_size``
times the number of processes. Every process embeds its share of the data,
process 0 plans and broadcasts the plan, and the sampler yields each global
batch as one share per process, in process order, so that accelerate's
sharding (one batch per process in turn) hands process r its share r. Keep
accelerate's default ``split_batches=False``.

**Resuming.** The trainer resumes an epoch by drawing its first batches again
and skipping them, but a plan made from the model cannot be made again once
the model has moved on. At every step the callback writes the epoch's plan
(with any refresh already made) into the trainer's state, which each checkpoint
saves (``trainer_state.json``); on ``train(resume_from_checkpoint=...)`` the
sampler replays it, so the resumed run sees exactly the batches of an
uninterrupted one. The plans of :class:`NoDuplicateBatches` and
:class:`RandomBatches` depend only on the seed and the epoch.

**Evaluation.** sentence-transformers builds the evaluation loader with the
same ``batch_sampler``: evaluation data sets are batched the same way.
"""

from __future__ import annotations

import base64
import warnings
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ... import distributed as nbdist
from ..._checks import check_flag, check_positive_int, is_int, is_real
from ...sampling.baselines import HardNegativeBatchSampler, NoDuplicateBatchSampler, RandomBatchSampler
from ...sampling.epoch_sampler import EpochBatchSampler
from ...sampling.gcbs import GCBSampler
from .losses import LABEL_COLUMNS

try:  # sentence-transformers >= 6
    from sentence_transformers.base.sampler import DefaultBatchSampler
except ImportError:  # pragma: no cover - older versions keep it here
    from sentence_transformers.sampler import DefaultBatchSampler

__all__ = ["GCBSBatches", "HardNegativeBatches", "NoDuplicateBatches", "RandomBatches", "TrainerBatchSampler",
           "column_prompt", "column_task", "column_preprocess_kwargs"]

#: What sentence-transformers' data collator preprocesses a text column with besides its texts, by
#: the name of the collator's attribute (and of the training argument it is built from).
COLLATOR_INPUTS = ("prompts", "router_mapping", "max_length")

#: Where the plans go in ``TrainerState.stateful_callbacks`` (a name no callback class has,
#: so that the trainer's own callback restoring leaves it alone).
STATE_KEY = "negbatch_batch_samplers"


def _encode_ints(values: Tensor) -> str:
    return base64.b64encode(zlib.compress(values.numpy().astype("<i8").tobytes())).decode("ascii")


def _decode_ints(text: str) -> Tensor:
    return torch.from_numpy(np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<i8").copy())


def _class_refused(given: str, instead: str) -> TypeError:
    """The error for a class passed as ``batch_sampler=``, which sentence-transformers would call
    with the data set and the batch size."""
    return TypeError(
        f"batch_sampler={given} passes a class, which sentence-transformers calls with the data set and batch "
        f"size; negbatch's samplers are objects built once with their options: pass batch_sampler={instead} in "
        f"the training arguments and the same object in the trainer's callbacks=[...]"
    )


class TrainerBatchSampler(DefaultBatchSampler):
    """A negbatch :class:`~negbatch.sampling.epoch_sampler.EpochBatchSampler`
    behind sentence-transformers' batch-sampler interface (built by the
    classes of this module; see the module docstring)."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        *,
        inner: EpochBatchSampler | None = None,
        world: int = 1,
        owner: "_NegbatchBatches | None" = None,
    ) -> None:
        if inner is None or owner is None:
            # A DefaultBatchSampler subclass as batch_sampler= is built by the trainer with its arguments
            # only; this one is built by the classes below, which hold the sampling options.
            raise _class_refused("TrainerBatchSampler", "GCBSBatches(model, ...) (or HardNegativeBatches(model, ...), "
                                 "NoDuplicateBatches(), RandomBatches())")
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        self.inner = inner
        self.world = world
        self.owner = owner
        self._restore: dict[str, Any] | None = None
        self._encoded: tuple[int, int, str, str] | None = None

    # -- iteration --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.inner) * self.world

    def __iter__(self):
        inner = self.inner
        inner.set_epoch(self.epoch)
        if self._restore is not None:
            saved, self._restore = self._restore, None
            if saved["epoch"] == self.epoch:
                inner.load_state_dict(saved)
        if self.owner.needs_model and not self.owner.attached:
            self.owner.warn_unattached()
        # The walk below is EpochBatchSampler's own, except that it always starts at the
        # epoch's first batch (the trainer skips batches itself when it resumes) and never
        # refreshes a position that the plan was already refreshed at (a replayed plan).
        inner._ensure_plan()
        every = inner.refresh_every
        position = 0
        while position < len(inner._plan):
            if every and position and position % every == 0 and position > inner._refreshed_at:
                inner._position = position
                inner._refresh()
                inner._refreshed_at = position
            batch = inner._plan[position]
            position += 1
            inner._position = position
            yield from self._shares(batch)

    def _shares(self, batch: np.ndarray) -> list[list[int]]:
        if self.world == 1:
            return [batch.tolist()]
        if len(batch) < self.world:  # a kept short tail: pad it from the epoch's first rows
            first = np.concatenate(self.inner._plan)
            batch = np.concatenate([batch, first[: self.world - len(batch)]])
        return [share.tolist() for share in np.array_split(batch, self.world)]

    # -- checkpoints ------------------------------------------------------------
    def current_batches(self) -> list[list[int]]:
        """The global batches of the current epoch's plan (data-set indices); empty before the first."""
        plan = self.inner._plan
        return [] if plan is None else [b.tolist() for b in plan]

    def checkpoint_state(self) -> dict[str, Any]:
        """The epoch's plan, JSON-ready (see :meth:`restore`)."""
        state = self.inner.state_dict()
        if state["plan"] is None:
            return {"epoch": state["epoch"], "plan": None}
        key = (id(self.inner._plan), int(state["refreshed_at"]))
        if self._encoded is None or self._encoded[:2] != key:
            self._encoded = (*key, _encode_ints(state["plan"]), _encode_ints(state["plan_sizes"]))
        return {
            "kind": type(self.owner).__name__,
            "epoch": int(state["epoch"]),
            "refreshed_at": int(state["refreshed_at"]),
            "num_samples": int(state["num_samples"]),
            "batch_size": int(state["batch_size"]),
            "seed": int(state["seed"]),
            "plan": self._encoded[2],
            "plan_sizes": self._encoded[3],
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Replay a plan saved by :meth:`checkpoint_state` when its epoch is iterated next."""
        if saved.get("plan") is None:
            return
        if saved.get("kind") != type(self.owner).__name__:
            raise ValueError(
                f"the checkpoint's batch plan was made by {saved.get('kind')}, this run samples with "
                f"{type(self.owner).__name__}: resume with the batch sampler the run was started with"
            )
        for key in ("num_samples", "batch_size", "seed"):
            mine = getattr(self.inner, key)
            if saved[key] != mine:
                raise ValueError(
                    f"the checkpoint's batch plan was made with {key}={saved[key]}, this run has {key}={mine}; "
                    f"resume with the same data set, batch size (times processes) and seed"
                )
        self._restore = {
            "epoch": saved["epoch"], "position": 0, "refreshed_at": saved["refreshed_at"],
            "plan": _decode_ints(saved["plan"]), "plan_sizes": _decode_ints(saved["plan_sizes"]),
            "num_samples": saved["num_samples"], "batch_size": saved["batch_size"],
        }


def _training_samplers(dataloader: Any) -> list[TrainerBatchSampler]:
    """Our samplers behind a (prepared, possibly sharded or skipping) training loader."""
    found: list[TrainerBatchSampler] = []
    todo = [getattr(dataloader, "batch_sampler", None), getattr(dataloader, "sampler", None)]
    seen: set[int] = set()
    while todo:
        item = todo.pop(0)
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, TrainerBatchSampler):
            found.append(item)
            continue
        todo.append(getattr(item, "batch_sampler", None))
        todo.extend(getattr(item, "batch_samplers", None) or [])
    return found


class _NegbatchBatches(TrainerCallback):
    """Shared by the four samplers: the factory the trainer calls and the callback that
    saves and restores the plans."""

    needs_model = False

    def __new__(cls, *args: Any, **kwargs: Any) -> "_NegbatchBatches":
        # sentence-transformers calls a class given as batch_sampler= with the data set and the batch
        # size; the constructors take options, not those, and failed with a TypeError about an
        # unexpected 'batch_size' from inside the trainer.
        if "batch_size" in kwargs:
            raise _class_refused(cls.__name__, f"{cls.__name__}({'model, ...' if cls.needs_model else ''})")
        return super().__new__(cls)

    def __init__(self, *, refresh_every: int | None, shuffle_batches: bool, seed: int | None) -> None:
        if refresh_every is not None and (not is_int(refresh_every) or refresh_every < 1):
            raise ValueError(f"refresh_every must be a positive int (batches) or None, got {refresh_every!r}")
        if seed is not None and not is_int(seed):
            raise TypeError(f"seed must be an int or None (None: the trainer's seed), got {seed!r}")
        self.refresh_every = int(refresh_every) if refresh_every is not None else None
        self.shuffle_batches = check_flag(shuffle_batches, "shuffle_batches")
        self.seed = int(seed) if seed is not None else None
        # The trainer's prompts, router_mapping and max_length, read from it as a callback
        # (see _read_collator_inputs).
        self.collator_inputs: dict[str, Any] = {}
        self.attached = False
        self._warned = False

    # -- the factory ------------------------------------------------------------
    def __call__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ) -> TrainerBatchSampler:
        if not hasattr(dataset, "column_names"):
            raise TypeError(
                f"{type(self).__name__} samples a datasets.Dataset (it reads the text columns), got "
                f"{type(dataset).__name__}; an IterableDataset cannot be planned by epoch"
            )
        world, rank = nbdist.world_size(), nbdist.rank()
        common = dict(
            drop_last=drop_last, shuffle_batches=self.shuffle_batches,
            seed=self.seed if self.seed is not None else int(seed or 0), refresh_every=self.refresh_every,
            num_replicas=world, rank=rank,
        )
        columns = self._text_columns(dataset, valid_label_columns)
        global_batch, rows = batch_size * world, len(dataset)
        if global_batch > rows and drop_last:
            # Said in the trainer's terms: for an evaluation set this comes at the first evaluation.
            raise ValueError(
                f"the data set has {rows} rows, fewer than one batch of {global_batch} ({batch_size} per process x "
                f"{world} processes), and dataloader_drop_last=True would drop them all: lower "
                f"per_device_train_batch_size or per_device_eval_batch_size (whichever this data set is batched "
                f"with), or set dataloader_drop_last=False (a set smaller than a batch is then one short batch)"
            )
        if global_batch > rows and rows >= world:
            # A data set smaller than one batch (an evaluation set, which the trainer batches with
            # this same factory): one short batch of every row, as sentence-transformers' own
            # samplers give, rather than an error after training has begun.
            global_batch = rows - rows % world
        inner = self._build(dataset, columns, global_batch, common)
        return TrainerBatchSampler(dataset, batch_size, drop_last, valid_label_columns, generator, seed,
                                   inner=inner, world=world, owner=self)

    def _build(self, dataset: Any, columns: list[str], batch_size: int, common: dict) -> EpochBatchSampler:
        raise NotImplementedError

    @staticmethod
    def _text_columns(dataset: Any, valid_label_columns: Sequence[str] | None) -> list[str]:
        skip = set(valid_label_columns or LABEL_COLUMNS) | {"dataset_name"}
        return [c for c in dataset.column_names if c not in skip]

    def embedder(self, model: nn.Module, dataset: Any, column: str, batch_size: int):
        """``embed(indices) -> (n, d)`` of ``column``'s texts as the trainer's collator presents them
        to the model: with the prompt, the task and the max length the trainer's ``prompts``,
        ``router_mapping`` and collator's ``max_length`` give this column of this data set."""
        name = _dataset_name(dataset)
        return _embedder(model, dataset, column, batch_size,
                         options=lambda: column_preprocess_kwargs(self.collator_inputs, name, column))

    def warn_unattached(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{type(self).__name__} plans batches from the model; pass it in the trainer's callbacks=[...] too, "
                f"or it embeds the texts without the trainer's prompts, router_mapping and max_length, and a run "
                f"resumed from a checkpoint re-plans its epoch with the resumed model instead of replaying the "
                f"interrupted run's batches",
                UserWarning,
                stacklevel=3,
            )

    # -- pickling (the trainer saves its arguments, this factory among them) ----
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if "model" in state:
            state["model"] = None  # the configuration travels, not the model
        return state

    # -- the callback -----------------------------------------------------------
    def _read_collator_inputs(self, args: Any, train_dataloader: Any = None) -> None:
        # The prompts, routes and max length the texts are trained with are the collator's (built
        # from the arguments of those names, unless the trainer was given its own data_collator);
        # the model-based samplers embed with them, so that the plan is made from the inputs the
        # model trains on.
        collator = getattr(train_dataloader, "collate_fn", None)
        self.collator_inputs = {name: getattr(collator, name, getattr(args, name, None)) for name in COLLATOR_INPUTS}

    def on_init_end(self, args, state, control, **kwargs):
        self._read_collator_inputs(args)  # the trainer's arguments, before any loader (or evaluation) is built

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.attached = True
        self._read_collator_inputs(args, train_dataloader)
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        samplers = _training_samplers(train_dataloader)
        if train_dataloader is not None and not any(s.owner is self for s in samplers):
            # As a callback alone it plans nothing: the trainer would batch with its own sampler.
            raise ValueError(
                f"{type(self).__name__} is in callbacks=[...] but is not the trainer's batch sampler, so the run "
                f"would train on the trainer's default batches: pass the same object as "
                f"SentenceTransformerTrainingArguments(batch_sampler=...) too"
            )
        if saved is None or not samplers:
            return
        saved = saved if isinstance(saved, list) else [saved]
        if len(saved) != len(samplers):
            raise ValueError(
                f"the checkpoint holds {len(saved)} batch plan(s) but this run trains with {len(samplers)} "
                f"data set(s); resume with the same training data"
            )
        for sampler, plan in zip(samplers, saved):
            sampler.restore(plan)

    def _save(self, state, train_dataloader) -> None:
        samplers = _training_samplers(train_dataloader)
        if samplers and state.stateful_callbacks is not None:
            state.stateful_callbacks[STATE_KEY] = [s.checkpoint_state() for s in samplers]

    def on_step_end(self, args, state, control, train_dataloader=None, **kwargs):
        self._save(state, train_dataloader)  # before the trainer's checkpoint of this step

    def on_epoch_end(self, args, state, control, train_dataloader=None, **kwargs):
        self._save(state, train_dataloader)


def column_prompt(prompts: Any, dataset_name: str | None, column: str) -> str | None:
    """The prompt sentence-transformers' data collator puts before ``column``'s texts.

    Parameters
    ----------
    prompts : str or dict or None
        The trainer's ``prompts`` (``SentenceTransformerTrainingArguments(prompts=...)``) in any of
        its four forms: one string; ``{column: prompt}``; ``{dataset name: prompt}``;
        ``{dataset name: {column: prompt}}``.
    dataset_name : str or None
        The name of a ``DatasetDict``'s split (None for a plain data set).
    column : str
        The text column.

    Returns
    -------
    str or None
        None where the collator gives the column no prompt.
    """
    if not prompts:
        return None
    if isinstance(prompts, dict):
        if dataset_name is not None and dataset_name in prompts:
            prompts = prompts[dataset_name]
        elif isinstance(next(iter(prompts.values())), dict):
            return None  # per-data-set prompts, none for this one
    if isinstance(prompts, str):
        return prompts
    return prompts.get(column) if isinstance(prompts, dict) else None


def column_task(router_mapping: Any, dataset_name: str | None, column: str) -> str | None:
    """The task sentence-transformers' data collator preprocesses ``column``'s texts with: the route
    a ``Router`` module sends them through (and a ``Transformer``'s ``query_length`` or
    ``document_length``).

    Parameters
    ----------
    router_mapping : dict or None
        The trainer's ``router_mapping`` (``SentenceTransformerTrainingArguments(router_mapping=...)``)
        in either of its two forms: ``{column: task}``; ``{dataset name: {column: task}}``.
    dataset_name, column : str or None, str
        As for :func:`column_prompt`.

    Returns
    -------
    str or None
        None where the collator gives the column no task.

    Examples
    --------
    >>> from negbatch.integrations.sentence_transformers.samplers import column_task
    >>> column_task({"anchor": "query", "positive": "document"}, None, "anchor")
    'query'
    >>> column_task({"nli": {"anchor": "query"}}, "sts", "anchor") is None
    True
    """
    if not router_mapping or not isinstance(router_mapping, dict):
        return None
    if isinstance(next(iter(router_mapping.values())), dict):  # by data set: its own, or none at all
        router_mapping = router_mapping.get(dataset_name, {}) if dataset_name is not None else {}
    return router_mapping.get(column)


def column_preprocess_kwargs(collator_inputs: Mapping[str, Any], dataset_name: str | None,
                             column: str) -> dict[str, Any]:
    """The keyword arguments sentence-transformers' data collator gives ``model.preprocess`` for
    ``column``'s texts (those it leaves None left out, as ``preprocess`` takes them).

    Parameters
    ----------
    collator_inputs : mapping
        The collator's (or the training arguments') ``prompts`` (:func:`column_prompt`),
        ``router_mapping`` (:func:`column_task`) and ``max_length``: an int for every column, or
        ``{task: length}`` for the columns of those tasks. A missing key is None.
    dataset_name, column : str or None, str
        As for :func:`column_prompt`.

    Returns
    -------
    dict
        ``prompt``, ``task`` and ``max_length``, each where the collator gives one.

    Examples
    --------
    >>> from negbatch.integrations.sentence_transformers.samplers import column_preprocess_kwargs
    >>> inputs = {"prompts": {"anchor": "query: "}, "router_mapping": {"anchor": "query"},
    ...           "max_length": {"query": 32}}
    >>> column_preprocess_kwargs(inputs, None, "anchor")
    {'prompt': 'query: ', 'task': 'query', 'max_length': 32}
    >>> column_preprocess_kwargs(inputs, None, "positive")
    {}
    """
    task = column_task(collator_inputs.get("router_mapping"), dataset_name, column)
    kwargs = {"prompt": column_prompt(collator_inputs.get("prompts"), dataset_name, column), "task": task,
              "max_length": _task_max_length(collator_inputs.get("max_length"), task)}
    return {k: v for k, v in kwargs.items() if v is not None}


def _task_max_length(max_length: Any, task: str | None) -> int | None:
    """The collator's truncation length for a column of ``task``: an int is every column's, a dict
    is by task (a column without a task gets none); None leaves the model's own max_seq_length."""
    if isinstance(max_length, dict):
        return max_length.get(task) if task is not None else None
    return max_length if isinstance(max_length, int) else None


def _dataset_name(dataset: Any) -> str | None:
    """The name sentence-transformers gives a split of a multi-dataset run: its transform adds it to
    every row as ``dataset_name`` (what the collator keys the prompts and routes by); None for a plain
    data set."""
    return dataset[0].get("dataset_name") if len(dataset) else None


def _embedder(model: nn.Module, dataset: Any, column: str, batch_size: int, options=dict):
    """``embed(indices) -> (n, d)``: the column's texts through the model (eval mode, no graph:
    the caller, embed_dataset, sets both). ``options()`` are the keyword arguments to preprocess them
    with (:func:`column_preprocess_kwargs`), asked at each call: the trainer's reach a sampler (as a
    callback) after it was built."""
    texts = list(dataset[column])

    def embed(indices: Tensor) -> Tensor:
        rows = [texts[i] for i in indices.tolist()]
        device = next(model.parameters()).device
        kwargs = options()
        out = []
        for start in range(0, len(rows), batch_size):
            prepare = getattr(model, "preprocess", None) or model.tokenize
            chunk = rows[start : start + batch_size]
            # As the trainer's collator does: the model prepends the prompt (and marks its length for
            # a pooling that leaves prompt tokens out), a Router picks the task's route (kept in the
            # features, for the forward) and the text is truncated at the collator's max_length.
            features = prepare(chunk, **kwargs)
            features = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in dict(features).items()}
            out.append(model(features)["sentence_embedding"].float().cpu())
        return torch.cat(out)

    return embed


def _check_model(model: Any, name: str) -> nn.Module:
    if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
        raise TypeError(f"{name} needs the SentenceTransformer being trained (it embeds the data with it), "
                        f"got {type(model).__name__}")
    return model


class GCBSBatches(_NegbatchBatches):
    """Global contrastive batch sampling for ``SentenceTransformerTrainer``.

    Parameters
    ----------
    model : SentenceTransformer
        The model being trained; it embeds the training set's first text
        column (anchors, X) and second (positives, Y) before each epoch, with
        the trainer's prompts for those columns.
    q : float, default 0.999
        Quantile of ``X Yᵀ`` above which pairs become edges (the paper's value).
    refresh_every : int, optional
        Re-embed and re-plan the rows not yet seen after every this many
        batches (optimizer steps times gradient accumulation); each row is
        still seen once per epoch.
    encode_batch_size : int, default 64
        Texts per forward pass while embedding.
    method : {"exact", "faiss"}, default "exact"
        See :func:`negbatch.sampling.gcbs.similarity_graph`.
    shuffle_batches : bool, default True
        Shuffle the order of the batches.
    seed : int, optional
        Default: the trainer's seed.

    Use the object as ``batch_sampler=`` and in ``callbacks=[...]``.

    Examples
    --------
    >>> from sentence_transformers import SentenceTransformerTrainingArguments  # doctest: +SKIP
    >>> gcbs = GCBSBatches(model, refresh_every=50)  # doctest: +SKIP
    >>> args = SentenceTransformerTrainingArguments("out", batch_sampler=gcbs)  # doctest: +SKIP
    >>> trainer = SentenceTransformerTrainer(model, args, train_dataset=data, loss=loss,
    ...                                      callbacks=[gcbs])  # doctest: +SKIP
    """

    needs_model = True

    def __init__(
        self,
        model: nn.Module,
        *,
        q: float = 0.999,
        refresh_every: int | None = None,
        encode_batch_size: int = 64,
        method: str = "exact",
        shuffle_batches: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(refresh_every=refresh_every, shuffle_batches=shuffle_batches, seed=seed)
        self.model = _check_model(model, "GCBSBatches")
        if not is_real(q) or not 0.0 < float(q) < 1.0:
            raise ValueError(f"q must be a float strictly between 0 and 1 (the paper uses 0.999), got {q!r}")
        if method not in ("exact", "faiss"):
            raise ValueError(f"method must be 'exact' or 'faiss', got {method!r}")
        self.q = float(q)
        self.encode_batch_size = check_positive_int(encode_batch_size, "encode_batch_size")
        self.method = method

    def _build(self, dataset, columns, batch_size, common):
        if self.model is None:
            raise RuntimeError("this GCBSBatches was restored from a pickle without its model; build a new one")
        if len(columns) < 2:
            raise ValueError(f"GCBS needs an anchor and a positive text column, the data set has {columns}")
        x = self.embedder(self.model, dataset, columns[0], self.encode_batch_size)
        y = self.embedder(self.model, dataset, columns[1], self.encode_batch_size)
        return GCBSampler(lambda i: (x(i), y(i)), len(dataset), batch_size, model=self.model, q=self.q,
                          chunk_size=self.encode_batch_size * 16, method=self.method, **common)


class HardNegativeBatches(_NegbatchBatches):
    """Hard-negative batches: k-means on the anchors' embeddings (first text
    column) by the model being trained, batches filled one cluster at a time.

    Parameters
    ----------
    model : SentenceTransformer
        The model being trained.
    num_clusters : int, optional
        Default: the number of batches of an epoch.
    refresh_every, encode_batch_size, shuffle_batches, seed
        As in :class:`GCBSBatches`.
    """

    needs_model = True

    def __init__(
        self,
        model: nn.Module,
        *,
        num_clusters: int | None = None,
        refresh_every: int | None = None,
        encode_batch_size: int = 64,
        shuffle_batches: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(refresh_every=refresh_every, shuffle_batches=shuffle_batches, seed=seed)
        self.model = _check_model(model, "HardNegativeBatches")
        self.num_clusters = check_positive_int(num_clusters, "num_clusters") if num_clusters is not None else None
        self.encode_batch_size = check_positive_int(encode_batch_size, "encode_batch_size")

    def _build(self, dataset, columns, batch_size, common):
        if self.model is None:
            raise RuntimeError("this HardNegativeBatches was restored from a pickle without its model; build a new one")
        if not columns:
            raise ValueError("the data set has no text column to cluster")
        x = self.embedder(self.model, dataset, columns[0], self.encode_batch_size)
        return HardNegativeBatchSampler(x, len(dataset), batch_size, model=self.model, num_clusters=self.num_clusters,
                                        chunk_size=self.encode_batch_size * 16, **common)


class NoDuplicateBatches(_NegbatchBatches):
    """Random batches in which no two rows share a key.

    Parameters
    ----------
    column : str, optional
        Text column whose value is the key; default the second text column
        (the positives: a copy of a positive is a false negative elsewhere).
    keys : sequence of hashable, optional
        One key per training row instead (e.g. a group id); overrides ``column``.
    refresh_every, shuffle_batches, seed
        As in :class:`GCBSBatches`.
    """

    def __init__(
        self,
        *,
        column: str | None = None,
        keys: Sequence[Hashable] | None = None,
        refresh_every: int | None = None,
        shuffle_batches: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(refresh_every=refresh_every, shuffle_batches=shuffle_batches, seed=seed)
        if column is not None and keys is not None:
            raise ValueError("give column= or keys=, not both")
        self.column = column
        self.keys = keys

    def _build(self, dataset, columns, batch_size, common):
        if self.keys is not None:
            if len(self.keys) != len(dataset):
                raise ValueError(f"keys has {len(self.keys)} entries for a data set of {len(dataset)} rows")
            keys = list(self.keys)
        else:
            column = self.column if self.column is not None else (columns[1] if len(columns) > 1 else columns[0])
            if column not in dataset.column_names:
                raise ValueError(f"column {column!r} is not in the data set (columns: {dataset.column_names})")
            keys = list(dataset[column])
        return NoDuplicateBatchSampler(keys, batch_size, **common)


class RandomBatches(_NegbatchBatches):
    """Uniformly random batches, a new permutation each epoch (seeded by the
    seed and the epoch). Parameters as in :class:`GCBSBatches`."""

    def __init__(self, *, refresh_every: int | None = None, shuffle_batches: bool = True,
                 seed: int | None = None) -> None:
        super().__init__(refresh_every=refresh_every, shuffle_batches=shuffle_batches, seed=seed)

    def _build(self, dataset, columns, batch_size, common):
        return RandomBatchSampler(len(dataset), batch_size, **common)
