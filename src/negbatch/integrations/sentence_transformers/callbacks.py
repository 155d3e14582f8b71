"""negbatch's training diagnostics as a ``TrainerCallback``.

:class:`NegbatchDiagnostics` adds to each of the trainer's training logs (every
``logging_steps``):

* ``grad_snr_mean``, ``grad_snr_std``: the gradient signal-to-noise ratio per
  parameter (:class:`negbatch.diagnostics.GradientSNR`: exponential moving
  averages of the gradient and its square over optimizer steps), its mean and
  spread across parameters, from the second optimizer step on. It reads the
  gradient the optimizer receives, after the trainer's clipping
  (``max_grad_norm``, 1.0 by default).
* ``false_negative_rate``: among the candidate negatives of the batches since
  the last log, the fraction with the anchor's label (see :class:`NegbatchLoss`:
  by default, a candidate with the same text as the anchor's positive).
* ``loss_gap``, ``global_loss``, ``train_loss_in_batches`` (every ``gap_every``
  optimizer steps, the latest value): the global loss minus the loss restricted
  to the current epoch's batches, :func:`negbatch.diagnostics.global_train_gap`,
  on the whole training set embedded by the current model (with the trainer's
  prompts, router_mapping and max_length, as the sampler embeds it). It needs
  one of this package's batch samplers (it reads their plan); embedding the
  training set is the cost, so choose ``gap_every`` accordingly.

The values go into the ``logs`` of the trainer's ``on_log`` event and into
``trainer.state.log_history``. Callbacks placed before this one (the reporting
integrations: TensorBoard, W&B, ...) have already seen the logs; to have them
record the diagnostics too, put it first with :meth:`NegbatchDiagnostics.attach`.

Its own state (the SNR's moving averages, the false negatives counted since the
last log, the latest gap) goes into every checkpoint folder
(``negbatch_diagnostics.pt``) and is loaded back when the trainer resumes, so a
resumed run logs what the uninterrupted run logs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ... import distributed as nbdist
from ..._checks import check_flag, check_positive_int, is_int
from ...diagnostics.gap import global_train_gap
from ...diagnostics.snr import GradientSNR
from ...sampling.embedding import embed_dataset
from .losses import NegbatchLoss
from .samplers import TrainerBatchSampler, _training_samplers

__all__ = ["NegbatchDiagnostics"]


class NegbatchDiagnostics(TrainerCallback):
    """Gradient SNR, false negatives and the global-minus-training loss gap as trainer metrics.

    Parameters
    ----------
    loss : NegbatchLoss, optional
        The trainer's loss; needed for ``false_negative_rate`` (and gives the
        gap its temperature).
    snr : bool, default True
        Track the gradient SNR of the model's trainable parameters (two float32
        buffers of the parameters' size).
    snr_beta : float, default 0.99
        EMA decay of the SNR (window about 1 / (1 - beta) steps).
    false_negatives : bool, default True
        Count the batches' false negatives (needs ``loss``).
    false_negative_keys : sequence of hashable, optional
        One label per training row (a class, a group, a text); two candidates
        are then false negatives of each other when their rows' labels are
        equal. The rows are found by the data-set index column
        (:func:`~negbatch.integrations.sentence_transformers.with_index_column`).
        Default: equal positive texts.
    gap_every : int, optional
        Measure the loss gap every this many optimizer steps (off by default).
    gap_temperature : float, optional
        Temperature of the gap; default the loss's, read at each measurement (a learnable
        temperature's current value).
    encode_batch_size : int, default 64
        Texts per forward pass when embedding the training set for the gap.
    resume_from : str or path, optional
        The checkpoint folder the trainer resumes from, when it is not
        ``output_dir/checkpoint-<step>`` (as for :class:`NegbatchLossState`).

    Notes
    -----
    Every checkpoint folder gets ``negbatch_diagnostics.pt`` (the SNR's moving
    averages, the counts since the last log, the latest gap); a resumed run loads
    it and logs what the uninterrupted run logs. A resume without it warns (the
    SNR then restarts from the resumed step).

    Examples
    --------
    >>> diagnostics = NegbatchDiagnostics(loss, gap_every=50)  # doctest: +SKIP
    >>> trainer = SentenceTransformerTrainer(model, args, train_dataset=data, loss=loss)  # doctest: +SKIP
    >>> diagnostics.attach(trainer)  # first among the callbacks: the reporters see its values  # doctest: +SKIP
    """

    def __init__(
        self,
        loss: NegbatchLoss | None = None,
        *,
        snr: bool = True,
        snr_beta: float = 0.99,
        false_negatives: bool = True,
        false_negative_keys: Sequence[Hashable] | None = None,
        gap_every: int | None = None,
        gap_temperature: float | None = None,
        encode_batch_size: int = 64,
        resume_from: str | os.PathLike | None = None,
    ) -> None:
        if loss is not None and not isinstance(loss, NegbatchLoss):
            raise TypeError(f"loss must be the trainer's NegbatchLoss, got {type(loss).__name__}")
        snr, false_negatives = check_flag(snr, "snr"), check_flag(false_negatives, "false_negatives")
        if false_negatives and loss is None:
            raise ValueError("false_negatives=True counts them in the loss: pass loss=the NegbatchLoss, or "
                             "false_negatives=False")
        if gap_every is not None and (not is_int(gap_every) or gap_every < 1):
            raise ValueError(f"gap_every must be a positive int (optimizer steps) or None, got {gap_every!r}")
        if gap_every is not None and gap_temperature is None:
            if getattr(getattr(loss, "loss", None), "temperature", None) is None:
                raise ValueError("gap_every needs a temperature: pass gap_temperature= (or a loss that has one)")
        if not 0.0 < snr_beta < 1.0:
            raise ValueError(f"snr_beta must lie in (0, 1), got {snr_beta!r}")
        encode_batch_size = check_positive_int(encode_batch_size, "encode_batch_size")
        self.loss = loss
        self.snr = snr
        self.snr_beta = float(snr_beta)
        self.false_negatives = false_negatives
        self.gap_every = int(gap_every) if gap_every is not None else None
        self.gap_temperature = gap_temperature
        self.encode_batch_size = encode_batch_size
        self._keys = _codes(false_negative_keys) if false_negative_keys is not None else None
        self._tracker: GradientSNR | None = None
        self._false = 0
        self._total = 0
        self._gap: dict[str, float] | None = None
        self._train_dataloader: Any = None
        self.resume_from = None if resume_from is None else Path(resume_from)

    FILE = "negbatch_diagnostics.pt"

    @classmethod
    def file_name(cls) -> str:
        """This process's file in a checkpoint folder."""
        return _rank_file(cls.FILE)

    def attach(self, trainer: Any) -> "NegbatchDiagnostics":
        """Make this the trainer's first callback, so that every later one (the
        reporting integrations, the progress printer) sees its values."""
        handler = trainer.callback_handler
        handler.callbacks = [cb for cb in handler.callbacks if cb is not self]
        handler.callbacks.insert(0, self)
        return self

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._train_dataloader = train_dataloader
        if self.snr and model is not None:
            self._tracker = GradientSNR(model, beta=self.snr_beta)
        if self.false_negatives and self.loss is not None:
            self.loss.track_false_negatives = True
            self.loss.false_negative_keys = self._keys
        self._false = self._total = 0
        self._gap = None
        if state.global_step > 0:
            self._restore(args, state)

    def _state(self) -> dict[str, Any]:
        return {"snr": self._tracker.state_dict() if self._tracker is not None else None,
                "false": self._false, "total": self._total, "gap": self._gap}

    def _restore(self, args, state) -> None:
        path = _resume_folder(args, state, self.resume_from) / self.file_name()
        if not path.exists():
            warnings.warn(f"resuming at step {state.global_step} without {path}: the diagnostics (the SNR's "
                          "moving averages, the false negatives counted since the last log) start afresh; give "
                          "NegbatchDiagnostics(..., resume_from=<the checkpoint folder>) if the trainer resumes "
                          "from another folder", UserWarning, stacklevel=3)
            return
        saved = torch.load(path, weights_only=True, map_location="cpu")
        if saved.get("global_step", state.global_step) != state.global_step:
            raise ValueError(
                f"{path} holds the diagnostics of step {saved['global_step']}, but the trainer resumes at step "
                f"{state.global_step}: give NegbatchDiagnostics(..., resume_from=<the folder of step "
                f"{state.global_step}>)"
            )
        if self._tracker is not None and saved.get("snr") is not None:
            self._tracker.load_state_dict(saved["snr"])
        self._false, self._total = int(saved.get("false", 0)), int(saved.get("total", 0))
        self._gap = saved.get("gap")

    def on_save(self, args, state, control, **kwargs):
        # No checkpoint folder (a hyperparameter search): NegbatchLossState warns.
        _save_in_checkpoint(args, state, self.FILE, self._state())
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._tracker is not None:
            self._tracker.update()

    def _count(self) -> None:
        if self.loss is not None and self.loss.last_false_negatives is not None:
            false, total = self.loss.last_false_negatives
            self._false += false
            self._total += total
            self.loss.last_false_negatives = None

    def on_substep_end(self, args, state, control, **kwargs):
        self._count()

    def on_step_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._count()
        if self.gap_every is not None and state.global_step % self.gap_every == 0:
            self._gap = self.measure_gap(model, train_dataloader or self._train_dataloader)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return  # an evaluation or the end-of-training summary
        values: dict[str, float] = {}
        if self._tracker is not None and self._tracker.steps >= 2:  # one step has no spread: SNR = |g| / sqrt(eps)
            summary = self._tracker.summary()
            values["grad_snr_mean"], values["grad_snr_std"] = summary["snr_mean"], summary["snr_std"]
        if self._total:
            values["false_negative_rate"] = self._false / self._total
            self._false = self._total = 0
        if self._gap is not None:
            values.update(self._gap)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and "loss" in state.log_history[-1]:
            state.log_history[-1].update(values)

    # ------------------------------------------------------------------ the gap

    def _gap_temperature(self) -> float:
        """The given gap_temperature, else the temperature the loss trains at now (a
        learnable one's current value, not its starting one)."""
        if self.gap_temperature is not None:
            return self.gap_temperature
        inner = self.loss.loss
        return float(getattr(inner, "current_temperature", inner.temperature))

    def measure_gap(self, model: Any, train_dataloader: Any) -> dict[str, float]:
        """``global_train_gap`` of the current epoch's batches on the training set embedded now."""
        samplers = _training_samplers(train_dataloader)
        if not samplers:
            raise ValueError(
                "gap_every needs the batches of the epoch: train with one of negbatch's batch samplers "
                "(GCBSBatches, HardNegativeBatches, NoDuplicateBatches, RandomBatches) as batch_sampler="
            )
        sampler: TrainerBatchSampler = samplers[0]
        batches = sampler.current_batches()
        if not batches:
            return {}
        dataset = sampler.sampler  # BatchSampler keeps what it was built on: here the data set
        columns = sampler.owner._text_columns(dataset, sampler.valid_label_columns)
        if len(columns) < 2:
            raise ValueError(f"the loss gap needs an anchor and a positive text column, the data set has {columns}")
        st_model = getattr(model, "module", model)
        # Through the sampler: it embeds the texts with the trainer's prompts, routes and max length, as
        # the model trains on them.
        x = sampler.owner.embedder(st_model, dataset, columns[0], self.encode_batch_size)
        y = sampler.owner.embedder(st_model, dataset, columns[1], self.encode_batch_size)
        used = sorted(i for b in batches for i in b)
        if len(used) != len(set(used)):
            raise RuntimeError("internal error: the epoch's plan repeats a row")
        xs, ys = embed_dataset(lambda i: (x(i), y(i)), list(range(len(dataset))), model=st_model,
                               chunk_size=self.encode_batch_size * 16)
        result = global_train_gap((xs, ys), batches, self._gap_temperature())
        return {"loss_gap": result.gap, "global_loss": result.global_loss,
                "train_loss_in_batches": result.train_loss}


def _codes(keys: Sequence[Hashable]) -> torch.Tensor:
    if isinstance(keys, (str, bytes)) or not hasattr(keys, "__len__"):
        raise TypeError("false_negative_keys must be a sequence with one hashable label per training row")
    table: dict[Hashable, int] = {}
    try:
        return torch.tensor([table.setdefault(k, len(table)) for k in keys], dtype=torch.long)
    except TypeError as exc:
        raise TypeError(f"every false-negative key must be hashable: {exc}") from exc


class NegbatchLossState(TrainerCallback):
    """Keeps a negbatch loss's own state in the trainer's checkpoints.

    sentence-transformers checkpoints the model, the optimizer and the
    scheduler, not the loss: a learnable temperature (and SigLIP's bias), a
    negative queue and GlobalInfoNCE's per-sample normalisers would restart
    from their initial values in a resumed run (the optimizer's moments of the
    loss's parameters are restored, the parameters themselves were not). This
    callback writes ``loss.state_dict()`` into each checkpoint folder
    (``negbatch_loss.pt``; under several processes each rank its own,
    ``negbatch_loss-rank<r>.pt``, as ``GlobalInfoNCE(sync_state=False)``
    keeps per-rank state) and loads it back when the trainer resumes, and
    at the end of training when ``load_best_model_at_end=True`` has put the
    best checkpoint's model back (the loss's state of that checkpoint goes
    with it, not the last step's).

    Parameters
    ----------
    loss : NegbatchLoss or nn.Module
        The loss given to the trainer (its wrapped negbatch loss is saved).
    resume_from : str or path, optional
        The checkpoint folder the trainer resumes from, when it is not
        ``output_dir/checkpoint-<step>`` (``trainer.train(resume_from_checkpoint=...)``
        does not tell callbacks which folder it read). Default: the
        ``resume_from_checkpoint`` of the training arguments if it names a
        folder, else ``output_dir/checkpoint-<step>``. A resume without the file
        there warns.

    Examples
    --------
    >>> from negbatch.integrations.sentence_transformers import NegbatchLoss, NegbatchLossState  # doctest: +SKIP
    >>> loss = NegbatchLoss(model, InfoNCE(temperature=0.05, queue_size=4096))  # doctest: +SKIP
    >>> trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss,
    ...                                      callbacks=[NegbatchLossState(loss)])  # doctest: +SKIP
    """

    FILE = "negbatch_loss.pt"

    def __init__(self, loss: torch.nn.Module, resume_from: str | os.PathLike | None = None) -> None:
        if not isinstance(loss, torch.nn.Module):
            raise TypeError(f"loss must be the NegbatchLoss given to the trainer, got {type(loss).__name__}")
        self.loss = loss.loss if isinstance(loss, NegbatchLoss) else loss
        self.resume_from = None if resume_from is None else Path(resume_from)

    @classmethod
    def file_name(cls) -> str:
        """This process's file in a checkpoint folder."""
        return _rank_file(cls.FILE)

    def on_save(self, args, state, control, **kwargs):
        if not _save_in_checkpoint(args, state, self.FILE, {"state": self.loss.state_dict()}):
            warnings.warn(f"no checkpoint folder {Path(args.output_dir) / f'checkpoint-{state.global_step}'} to "
                          f"write the loss's state into (a hyperparameter search writes elsewhere); it is not saved",
                          UserWarning, stacklevel=2)
        return control

    def _file_in(self, folder: Path) -> Path:
        """This process's file in a checkpoint folder."""
        path = folder / self.file_name()
        if not path.exists() and (folder / self.FILE).exists() and not _per_rank_state(self.loss):
            # Written by fewer processes: the state every rank keeps alike is rank 0's.
            path = folder / self.FILE
        return path

    def _read(self, path: Path) -> dict[str, Any]:
        device = next(iter(self.loss.state_dict().values()), torch.empty(0)).device
        return torch.load(path, weights_only=True, map_location=device)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return control
        path = self._file_in(_resume_folder(args, state, self.resume_from))
        if not path.exists():
            warnings.warn(f"resuming at step {state.global_step} without {path}: the loss's state (learnable "
                          "temperature, queue, normalisers) starts afresh; give NegbatchLossState(loss, "
                          "resume_from=<the checkpoint folder>) if the trainer resumes from another folder",
                          UserWarning, stacklevel=2)
            return control
        saved = self._read(path)
        if saved.get("global_step", state.global_step) != state.global_step:
            raise ValueError(
                f"{path} holds the loss's state of step {saved['global_step']}, but the trainer resumes at step "
                f"{state.global_step}: give NegbatchLossState(loss, resume_from=<the folder of step "
                f"{state.global_step}>)"
            )
        self.loss.load_state_dict(saved.get("state", saved))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # The trainer has just loaded the best checkpoint's model (load_best_model_at_end), right before
        # this event; the loss's state of that checkpoint belongs with it: the last step's learned
        # temperature, queue (of the last model's embeddings) or normalisers would go on with an earlier model.
        best = state.best_model_checkpoint
        if not (args.load_best_model_at_end and best):
            return control
        path = self._file_in(Path(best))
        if not path.exists():
            warnings.warn(f"the best checkpoint {best} holds no {path.name}: the model is the best checkpoint's, "
                          f"the loss's state (learnable temperature, queue, normalisers) stays the last step's",
                          UserWarning, stacklevel=2)
            return control
        saved = self._read(path)
        self.loss.load_state_dict(saved.get("state", saved))
        return control


def _rank_file(file: str) -> str:
    """This process's name for a callback's ``file`` in a checkpoint folder: rank r > 0 writes
    ``<stem>-rank<r>.pt`` beside rank 0's ``file``."""
    rank = nbdist.rank()
    return f"{file.removesuffix('.pt')}-rank{rank}.pt" if rank > 0 else file


def _save_in_checkpoint(args: Any, state: Any, file: str, payload: dict[str, Any]) -> bool:
    """Write ``payload`` (with the step) as this process's ``file`` in the trainer's checkpoint folder of
    this step, atomically; False where the trainer made no such folder (a hyperparameter search)."""
    folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    path = folder / _rank_file(file)
    if path.name != file:
        folder.mkdir(parents=True, exist_ok=True)  # a rank on a node without the main process's folder
    elif not folder.is_dir():
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"global_step": state.global_step, **payload}, tmp)
    os.replace(tmp, path)  # a checkpoint interrupted here holds the old file or none
    return True


def _resume_folder(args: Any, state: Any, explicit: Path | None) -> Path:
    """The checkpoint folder a resumed run reads a callback's file from: the one given, else the
    training arguments' ``resume_from_checkpoint`` if it names a folder, else
    ``output_dir/checkpoint-<step>``."""
    if explicit is not None:
        return explicit
    named = getattr(args, "resume_from_checkpoint", None)
    if isinstance(named, str) and Path(named).is_dir():
        return Path(named)
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def _per_rank_state(loss: torch.nn.Module) -> bool:
    """Whether the loss keeps state that differs between ranks (GlobalInfoNCE(sync_state=False))."""
    return any(getattr(m, "sync_state", True) is False for m in loss.modules())
