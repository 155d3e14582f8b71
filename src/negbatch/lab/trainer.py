"""The training loop: one contrastive run from a :class:`TrainConfig`.

Read :func:`train` top to bottom: it builds the data, the model, the loss, the
batch sampler and the optimizer, then loops over epochs and batches, logging
and checkpointing, and finally evaluates the frozen representation. The three
places a new method plugs in are small functions:

* :func:`build_loss` -- the objective (an ``nn.Module`` called as
  ``loss(z1, z2, batch, generator)``; ``batch.index`` holds the dataset
  indices, for losses with per-sample state).
* :func:`build_batch_sampler` -- which samples share a batch (an object with
  ``set_epoch``, ``batches``, ``state_dict``, ``load_state_dict``; it is given
  the model and the training images, for samplers that embed the data before
  each epoch).
* :func:`forward_backward` -- forward, loss and backward of one batch (where
  gradient caching goes).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Augment, ImageDataset, load_dataset
from ..diagnostics import GradientSNR, alignment, intra_class_distance, silhouette_score, uniformity
from ..evaluation import knn_accuracy, linear_probe
from ..losses import InfoNCE, ReLIC
from ..models import ContrastiveModel, ProjectionHead, build_encoder
from .batching import build_planned_sampler, epoch_diagnostics
from .config import TrainConfig, parse_negatives
from .global_loss import GammaSchedule, GlobalPairLoss
from .lars import LARS
from .runs import SUMMARY, atomic_torch_save, atomic_write_text, finished_run, load_checkpoint, record_run

__all__ = [
    "Batch",
    "PairLoss",
    "RandomBatchSampler",
    "build_loss",
    "build_batch_sampler",
    "build_model",
    "build_optimizer",
    "build_schedule",
    "forward_backward",
    "evaluate",
    "train",
    "read_metrics",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class Batch:
    """One training batch: dataset indices and the two augmented views."""

    index: Tensor
    view1: Tensor
    view2: Tensor


# --------------------------------------------------------------------------- loss


class PairLoss(nn.Module):
    """Adapts a two-view loss of :mod:`negbatch.losses` to the trainer's call
    ``loss(z1, z2, batch, generator)``. Its ``state_dict`` (e.g. per-sample
    buffers of a stateful loss) is saved in checkpoints."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, z1: Tensor, z2: Tensor, batch: Batch, generator: torch.Generator) -> Tensor:
        return self.loss(z1, z2, generator=generator)


def negative_candidates(loss: str, batch_size: int) -> int:
    """Negatives available per anchor: SimCLR (and the global loss) have the
    other 2B - 2 views, ReLIC the other B - 1 samples of the opposite view."""
    return 2 * batch_size - 2 if loss in ("simclr", "global") else batch_size - 1


def build_loss(cfg: TrainConfig, num_samples: int | None = None) -> nn.Module:
    """The objective named by ``cfg.loss`` with ``cfg.negatives`` negatives per anchor.

    ``num_samples`` (the training set's size) is needed by ``loss="global"``,
    which keeps one running normaliser per training sample."""
    negatives = parse_negatives(cfg.negatives)
    contrasted, where = cfg.batch_size, f"batch_size={cfg.batch_size}"
    if cfg.chunk_size and cfg.chunk_method == "accumulate" and cfg.chunk_size < cfg.batch_size:
        # Accumulation contrasts each chunk on its own; the smallest chunk decides.
        contrasted = cfg.batch_size % cfg.chunk_size or cfg.chunk_size
        where = (f"chunk_method='accumulate' with chunk_size={cfg.chunk_size} (batch_size={cfg.batch_size}: "
                 f"the smallest chunk has {contrasted} rows)")
    available = negative_candidates(cfg.loss, contrasted)
    if negatives != "all" and negatives > available:
        raise ValueError(
            f"negatives={negatives} exceeds the {available} candidates per anchor of {cfg.loss} at "
            f"{where}; use negatives <= {available} or 'all'"
        )
    if cfg.loss == "simclr":
        return PairLoss(InfoNCE(temperature=cfg.temperature, negatives=negatives))
    if cfg.loss == "global":
        if num_samples is None:
            raise ValueError("loss='global' needs num_samples, the training set's size (one nu per sample)")
        steps = cfg.epochs * max(num_samples // cfg.batch_size, 1)
        gamma = GammaSchedule(cfg.gamma, cfg.gamma_schedule, steps)
        return GlobalPairLoss(num_samples, cfg.temperature, gamma, negatives)
    return PairLoss(ReLIC(temperature=cfg.temperature, alpha=cfg.alpha, negatives=negatives))


# ------------------------------------------------------------------------ batches


class RandomBatchSampler:
    """Uniformly shuffled batches, dropping the last incomplete one.

    Epoch ``e``'s order depends only on ``(seed, e)``, so the state to resume
    is the epoch number.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if batch_size > num_samples:
            raise ValueError(f"batch_size={batch_size} exceeds the {num_samples} training samples; lower batch_size")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        return list(order[: len(self) * self.batch_size].view(len(self), self.batch_size))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])


def build_batch_sampler(cfg: TrainConfig, train_x: Tensor, model: nn.Module):
    """The batch sampler named by ``cfg.sampler``: ``random``, or ``gcbs`` /
    ``hard``, which embed ``train_x`` with ``model`` before each epoch
    (:mod:`negbatch.lab.batching`)."""
    if cfg.sampler == "random":
        return RandomBatchSampler(train_x.shape[0], cfg.batch_size, cfg.seed)
    if cfg.sampler in ("gcbs", "hard"):
        return build_planned_sampler(cfg, train_x, model)
    raise ValueError(f"unknown sampler {cfg.sampler!r}")


# ----------------------------------------------------------------------- one step


def forward_backward(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: Batch,
    generator: torch.Generator,
    chunk_size: int | None = None,
    chunk_method: str = "cache",
) -> Tensor:
    """Forward, loss and backward of one batch; returns the detached loss.

    Without ``chunk_size``: both views in one pass (BatchNorm sees the whole 2B
    batch). With it, each view is encoded in chunks of ``chunk_size`` rows:
    ``"cache"`` runs :class:`negbatch.GradCache` (the full-batch loss and, for
    encoders without BatchNorm, its exact gradient); ``"accumulate"`` is
    gradient accumulation, a loss per chunk (negatives only from the chunk).
    """
    if chunk_size:
        from .chunked import accumulated_forward_backward, cached_forward_backward

        step = cached_forward_backward if chunk_method == "cache" else accumulated_forward_backward
        return step(model, loss_fn, batch, generator, chunk_size)
    z1, z2 = model(torch.cat([batch.view1, batch.view2])).chunk(2)
    loss = loss_fn(z1, z2, batch, generator)
    loss.backward()
    return loss.detach()


# ---------------------------------------------------------------- model, optimizer


def build_model(cfg: TrainConfig, image_shape: tuple[int, int, int]) -> ContrastiveModel:
    encoder = build_encoder(cfg.encoder, image_shape, cfg.encoder_widths)
    return ContrastiveModel(encoder, ProjectionHead(encoder.out_dim, cfg.head_widths))


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return LARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class WarmupCosine:
    """Learning-rate factor: linear warm-up to 1 over ``warmup`` steps, then
    cosine decay to 0 at ``total`` steps (a picklable callable for LambdaLR)."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, max(total, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.total - self.warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, total_steps))


# --------------------------------------------------------------------- evaluation


@torch.no_grad()
def representations(model: ContrastiveModel, x: Tensor, batch_size: int = 512) -> Tensor:
    model.eval()
    out = torch.cat([model.representation(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    model.train()
    return out


@torch.no_grad()
def evaluate(model: ContrastiveModel, data: ImageDataset, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Frozen-representation metrics: linear probe and kNN accuracy on the test
    split; on the L2-normalised test representations, intra-class mean
    pairwise distance and silhouette (true labels), and alignment/uniformity of
    two augmented views."""
    rtr = representations(model, data.x_train.to(device)).cpu()
    rte = representations(model, data.x_test.to(device)).cpu()
    zte = F.normalize(rte, dim=1)
    aug = Augment(strength=cfg.aug_strength, hflip=cfg.hflip)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    x = data.x_test.to(device)
    a1 = F.normalize(representations(model, aug(x, g)).cpu(), dim=1)
    a2 = F.normalize(representations(model, aug(x, g)).cpu(), dim=1)
    return {
        "linear_acc": linear_probe(rtr, data.y_train, rte, data.y_test),
        "knn_acc": knn_accuracy(rtr, data.y_train, rte, data.y_test, k=min(cfg.knn_k, rtr.shape[0])),
        "intra_class_distance": intra_class_distance(zte, data.y_test),
        "silhouette": silhouette_score(zte, data.y_test),
        "alignment": alignment(a1, a2),
        "uniformity": uniformity(zte),
    }


# ------------------------------------------------------------------------ logging


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-step metric rows of a run folder."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a line cut short by an interruption; resuming rewrites it
            raise ValueError(f"{path} line {i + 1} is not valid JSON") from None
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device='cpu'")
    return torch.device(name)


def _last_gap(rows: list[dict[str, Any]]) -> dict[str, float]:
    gaps = [r for r in rows if "gap" in r]
    if not gaps:
        return {}
    out = {"final_gap": gaps[-1]["gap"], "mean_gap": sum(r["gap"] for r in gaps) / len(gaps),
           "final_global_loss": gaps[-1]["gap_global_loss"]}
    if "same_class_pairs" in gaps[-1]:
        out["final_same_class_pairs"] = gaps[-1]["same_class_pairs"]
    return out


# -------------------------------------------------------------------------- train


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    data: ImageDataset | None = None,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """Train one configuration in ``run_dir``, resuming from its checkpoint.

    Writes ``config.json``, ``metrics.jsonl`` / ``metrics.csv`` (one row per
    ``log_every`` steps), ``checkpoint.pt`` (every ``checkpoint_every`` steps
    and at the end) and ``summary.json`` (final metrics). A finished run is not
    trained again: its summary is returned.

    Parameters
    ----------
    cfg : TrainConfig
    run_dir : path
    data : ImageDataset, optional
        Use these arrays instead of loading ``cfg.dataset`` (``n_train`` /
        ``n_test`` still apply).
    stop_after : int, optional
        Stop (with a checkpoint) once this many steps are done, as an
        interruption would; returns None. For tests and time-sliced runs.

    Returns
    -------
    dict or None: the summary (config, evaluation metrics, final loss and SNR,
    wall time).

    Examples
    --------
    >>> import tempfile
    >>> from negbatch.lab import TrainConfig, train
    >>> cfg = TrainConfig(n_train=128, n_test=64, batch_size=32, epochs=1,
    ...                   encoder_widths=(32,), head_widths=(32, 16))
    >>> summary = train(cfg, tempfile.mkdtemp())
    >>> 0.0 <= summary["linear_acc"] <= 1.0
    True
    """
    run_dir = Path(run_dir)
    finished = finished_run(run_dir, cfg.identity(), lambda saved: TrainConfig.from_dict(saved).identity())
    if finished is not None:
        return finished
    device = _device(cfg.device)

    # Data, model, objective, batches, optimisation.
    data = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir)
    data = data.subset(cfg.n_train, cfg.n_test)
    train_x = data.x_train.to(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.image_shape).to(device)
    loss_fn = build_loss(cfg, num_samples=train_x.shape[0]).to(device)
    sampler = build_batch_sampler(cfg, train_x, model)
    optimizer = build_optimizer(cfg, model)
    total_steps = cfg.epochs * len(sampler)
    schedule = build_schedule(cfg, optimizer, total_steps)
    augment = Augment(strength=cfg.aug_strength, hflip=cfg.hflip)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    loss_gen = torch.Generator().manual_seed(cfg.seed + 2)
    snr = GradientSNR(model, beta=cfg.snr_beta) if cfg.snr else None
    record_run(run_dir, cfg.to_dict())  # the set-up passed its checks: the folder is this run's

    # Resume: every piece of state, then drop metric rows logged after the checkpoint.
    step, epoch, start_batch = 0, 0, 0
    if (run_dir / CHECKPOINT).exists():
        ckpt = load_checkpoint(run_dir / CHECKPOINT, device, ("model", "optimizer", "schedule", "loss", "sampler",
                                                              "rng", "step", "epoch", "batch"))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        loss_fn.load_state_dict(ckpt["loss"])
        sampler.load_state_dict(ckpt["sampler"])
        if snr is not None:
            snr.load_state_dict(ckpt["snr"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        aug_gen.set_state(ckpt["rng"]["augment"])
        loss_gen.set_state(ckpt["rng"]["loss"])
        step, epoch, start_batch = ckpt["step"], ckpt["epoch"], ckpt["batch"]
    rows = [r for r in read_metrics(run_dir) if r["step"] <= step]
    atomic_write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    def save_checkpoint(epoch: int, next_batch: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "loss": loss_fn.state_dict(),
            "sampler": sampler.state_dict(),
            "snr": snr.state_dict() if snr is not None else {},
            "rng": {"torch": torch.get_rng_state(), "augment": aug_gen.get_state(), "loss": loss_gen.get_state()},
            "step": step,
            "epoch": epoch,
            "batch": next_batch,
            "config": cfg.to_dict(),
        }
        atomic_torch_save(run_dir / CHECKPOINT, state)

    writer = _tensorboard(run_dir)
    progress = None
    if cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=step, desc=run_dir.name, leave=False)
    log = open(run_dir / METRICS, "a")
    started = time.perf_counter()
    diagnostic_seconds = 0.0
    model.train()
    try:
        while epoch < cfg.epochs:
            if start_batch == 0:
                sampler.set_epoch(epoch)
            batches = sampler.batches()
            epoch_row = {}
            if start_batch == 0 and (cfg.log_gap or cfg.sampler != "random"):
                epoch_row = epoch_diagnostics(cfg, sampler, batches, model, train_x, data.y_train)
                diagnostic_seconds += epoch_row.get("gap_seconds", 0.0)
            for b in range(start_batch, len(batches)):
                index = batches[b]
                x = train_x[index.to(device)]
                batch = Batch(index, augment(x, aug_gen), augment(x, aug_gen))
                optimizer.zero_grad(set_to_none=True)
                loss = forward_backward(model, loss_fn, batch, loss_gen, cfg.chunk_size, cfg.chunk_method)
                if snr is not None:
                    snr.update()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                schedule.step()
                step += 1
                if step % cfg.log_every == 0 or step == total_steps or epoch_row:
                    row = {"step": step, "epoch": epoch, "loss": float(loss), "lr": lr}
                    if hasattr(loss_fn, "log_values"):  # e.g. the true InfoNCE next to a surrogate
                        row.update(loss_fn.log_values())
                    if snr is not None:
                        row.update(snr.summary())
                    row.update(epoch_row)  # the epoch's diagnostics go with its first step
                    epoch_row = {}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    if writer is not None:
                        for k, v in row.items():
                            if k not in ("step", "epoch"):
                                writer.add_scalar(k, v, step)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{float(loss):.3f}")
                done_epoch = b + 1 == len(batches)
                position = (epoch + 1, 0) if done_epoch else (epoch, b + 1)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save_checkpoint(*position)
                if stop_after is not None and step >= stop_after and step < total_steps:
                    save_checkpoint(*position)
                    return None
            epoch, start_batch = epoch + 1, 0
        loop_seconds = time.perf_counter() - started
    finally:
        log.close()
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
    save_checkpoint(epoch, 0)

    rows = read_metrics(run_dir)
    _write_csv(run_dir / "metrics.csv", rows)
    summary: dict[str, Any] = {"config": cfg.to_dict(), "steps": step}
    summary.update(evaluate(model, data, cfg, device))
    last = rows[-1] if rows else {}
    summary["final_loss"] = last.get("loss")
    if snr is not None:
        summary.update({"snr_mean": last.get("snr_mean"), "snr_std": last.get("snr_std")})
    summary["train_seconds"] = loop_seconds  # the loop only (this session's part, if resumed)
    if cfg.log_gap or cfg.sampler != "random":
        # Of train_seconds: embedding + ordering (part of training), and the gap diagnostic (not).
        timing = sampler.timing() if hasattr(sampler, "timing") else {}
        summary.update({"sampler_seconds": sum(timing.values()), "gap_seconds": diagnostic_seconds})
        summary.update(_last_gap(rows))
    atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2))
    return summary
