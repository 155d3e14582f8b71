"""The image task: two augmented views of every image, one encoder + head.

The places a new method plugs in are small functions:

* :func:`build_loss` -- the objective (an ``nn.Module`` called as
  ``loss(z1, z2, batch, generator)``; ``batch.index`` holds the data set
  indices, for losses with per-sample state).
* :func:`build_sampler` -- which samples share a batch (a
  :class:`negbatch.sampling.EpochBatchSampler`; GCBS and the hard-negative
  sampler embed the training images with the model before each epoch).
* :func:`forward_backward` -- forward, loss and backward of one batch (where
  gradient caching goes).

What the samplers embed: the **un-augmented** training images, the
projection-head output (what the loss sees), with the anchor and positive
side both equal to it. It costs one forward pass, draws no random numbers (so
a run's augmentations are the same whatever the sampler) and does not depend
on an augmentation seed. The price: the N diagonal entries of ``X Yᵀ`` are
self-similarities equal to 1, always above the threshold, so of the
``(1 - q) N²`` kept entries only ``(1 - q) N² - N`` are edges between
distinct samples: at small N choose ``q`` well below the paper's 0.999
(``1 - q`` several times ``1 / N``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data import Augment, ImageDataset, load_dataset
from ...diagnostics import alignment, global_train_gap, intra_class_distance, silhouette_score, uniformity
from ...evaluation import knn_accuracy, linear_probe
from ...losses import InfoNCE, ReLIC
from ...models import ContrastiveModel, ProjectionHead, build_encoder
from ...sampling import EpochBatchSampler, GCBSampler, HardNegativeBatchSampler, RandomBatchSampler, embed_dataset
from ..config import TrainConfig
from ..global_loss import GammaSchedule, GlobalPairLoss
from .base import Task

__all__ = [
    "ImageTask",
    "Batch",
    "PairLoss",
    "build_loss",
    "build_model",
    "build_sampler",
    "forward_backward",
    "evaluate",
    "negative_candidates",
    "same_class_pairs",
    "image_embed_fn",
    "data_identity",
]


@dataclass
class Batch:
    """One training batch: data set indices and the two augmented views."""

    index: Tensor
    view1: Tensor
    view2: Tensor


# --------------------------------------------------------------------------- loss


class PairLoss(nn.Module):
    """Adapts a two-view loss of :mod:`negbatch.losses` to the call
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


def build_loss(cfg: TrainConfig, num_samples: int | None = None, total_steps: int | None = None) -> nn.Module:
    """The objective named by ``cfg.loss`` with ``cfg.negatives`` negatives per anchor.

    ``num_samples`` (the training set's size) is needed by ``loss="global"``,
    which keeps one running normaliser per training sample; ``total_steps``
    sets the length of its gamma schedule (default: ``cfg.epochs`` epochs of
    full batches).
    """
    negatives = cfg.negatives
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
        steps = total_steps or cfg.total_steps(max(num_samples // cfg.batch_size, 1))
        return GlobalPairLoss(num_samples, cfg.temperature, GammaSchedule(cfg.gamma, cfg.gamma_schedule, steps),
                              negatives)
    return PairLoss(ReLIC(temperature=cfg.temperature, alpha=cfg.alpha, negatives=negatives))


# ------------------------------------------------------------------------ batches


def image_embed_fn(model: nn.Module, train_x: Tensor, *, two_sided: bool = True):
    """``embed_fn(indices)`` for the library samplers: the projections of the
    un-augmented images, as the pair ``(z, z)`` (or ``z`` alone)."""

    def embed_fn(indices: Tensor):
        z = model(train_x[indices.to(train_x.device)])
        return (z, z) if two_sided else z

    return embed_fn


def build_sampler(cfg: TrainConfig, train_x: Tensor, model: nn.Module) -> EpochBatchSampler:
    """The batch sampler named by ``cfg.sampler``, dropping the short tail
    batch, so that every sampler takes the same number of steps per epoch:

    * ``random`` -- a permutation per epoch, seeded by ``(seed, epoch)``;
    * ``gcbs`` / ``hard`` -- planned from the model's embeddings of
      ``train_x`` at the start of each epoch (and every ``refresh_every`` steps).
    """
    n = train_x.shape[0]
    if cfg.batch_size > n:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {n} training samples; lower batch_size")
    common = dict(drop_last=True, seed=cfg.seed, refresh_every=cfg.refresh_every or None, num_replicas=1, rank=0)
    if cfg.sampler == "random":
        return RandomBatchSampler(n, cfg.batch_size, shuffle_batches=False, **common)
    embedding = dict(model=model, chunk_size=1024)
    if cfg.sampler == "gcbs":
        return GCBSampler(image_embed_fn(model, train_x), n, cfg.batch_size, q=cfg.gcbs_q, **embedding, **common)
    if cfg.sampler == "hard":
        return HardNegativeBatchSampler(image_embed_fn(model, train_x, two_sided=False), n, cfg.batch_size,
                                        **embedding, **common)
    raise ValueError(f"unknown sampler {cfg.sampler!r}; expected random, gcbs or hard")


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
        from ..chunked import accumulated_forward_backward, cached_forward_backward

        step = cached_forward_backward if chunk_method == "cache" else accumulated_forward_backward
        return step(model, loss_fn, batch, generator, chunk_size)
    z1, z2 = model(torch.cat([batch.view1, batch.view2])).chunk(2)
    loss = loss_fn(z1, z2, batch, generator)
    loss.backward()
    return loss.detach()


# ---------------------------------------------------------------- model, evaluation


def build_model(cfg: TrainConfig, image_shape: tuple[int, int, int]) -> ContrastiveModel:
    encoder = build_encoder(cfg.encoder, image_shape, cfg.encoder_widths)
    return ContrastiveModel(encoder, ProjectionHead(encoder.out_dim, cfg.head_widths))


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


def data_identity(data: ImageDataset) -> dict[str, Any]:
    """Name, shapes and a sha256 of the arrays: what makes two runs' data the same."""
    digest = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"name": data.name, "source": getattr(data, "source", None),
            "train": list(data.x_train.shape), "test": list(data.x_test.shape), "fingerprint": digest.hexdigest()}


# ----------------------------------------------------------------------- the task


class ImageTask(Task):
    """Two augmented views of each training image through one encoder + head."""

    def __init__(self, cfg: TrainConfig, device: torch.device, data: ImageDataset | None = None) -> None:
        super().__init__(cfg, device)
        data = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir)
        self.data = data.subset(cfg.n_train, cfg.n_test)
        self.data_identity = data_identity(self.data)
        self.train_x = self.data.x_train.to(device)
        self.augment = Augment(strength=cfg.aug_strength, hflip=cfg.hflip)
        # Seconds of earlier sessions (a resumed run): embedding + ordering, the gap diagnostic.
        self.timing = {"sampler_seconds": 0.0, "gap_seconds": 0.0}

    def build(self) -> None:
        cfg = self.cfg
        self.model = build_model(cfg, self.data.image_shape).to(self.device)
        n = self.train_x.shape[0]
        self.loss_fn = build_loss(cfg, num_samples=n,
                                  total_steps=cfg.total_steps(max(n // cfg.batch_size, 1))).to(self.device)
        self.sampler = build_sampler(cfg, self.train_x, self.model)

    def start_epoch(self, epoch: int) -> dict[str, float]:
        """Time spent embedding and ordering this epoch's batches and, with
        ``log_gap``: ``gap``, ``gap_global_loss``, ``gap_train_loss`` of
        :func:`~negbatch.diagnostics.global_train_gap` on the epoch's batches
        and the current model's embeddings of the un-augmented images (the
        sampler's own when it has them), ``same_class_pairs`` (the share of
        in-batch pairs of one class) and ``gap_seconds``, their cost, which is
        not part of training."""
        cfg = self.cfg
        if not (cfg.log_gap or cfg.sampler != "random"):
            return {}
        before = dict(self.sampler.timing)
        plan = [torch.as_tensor(b) for b in self.sampler.plan()]
        row = {k: self.sampler.timing[k] - before[k] for k in before}
        if cfg.log_gap:
            t0 = time.perf_counter()
            z = self.sampler.last_prepared
            z = z[0] if isinstance(z, tuple) else z
            if z is None:
                z, _ = embed_dataset(image_embed_fn(self.model, self.train_x, two_sided=False),
                                     np.arange(self.train_x.shape[0]), model=self.model, two_sided=False, shard=False)
            result = global_train_gap(z, plan, cfg.temperature)
            row.update({"gap": result.gap, "gap_global_loss": result.global_loss, "gap_train_loss": result.train_loss,
                        "same_class_pairs": same_class_pairs(plan, self.data.y_train)})
            row["gap_seconds"] = time.perf_counter() - t0
            self.timing["gap_seconds"] += row["gap_seconds"]
        return row

    def batch(self, index: list[int], streams) -> Batch:
        index = torch.as_tensor(index, dtype=torch.long)
        x = self.train_x[index.to(self.device)]
        return Batch(index, self.augment(x, streams.augment), self.augment(x, streams.augment))

    def step(self, batch: Batch, streams) -> Tensor:
        return forward_backward(self.model, self.loss_fn, batch, streams.loss, self.cfg.chunk_size,
                                self.cfg.chunk_method)

    def step_metrics(self) -> dict[str, float]:
        # e.g. the true InfoNCE next to the global loss's surrogate
        return self.loss_fn.log_values() if hasattr(self.loss_fn, "log_values") else {}

    def evaluate(self) -> dict[str, Any]:
        return evaluate(self.model, self.data, self.cfg, self.device)

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"final_loss": rows[-1]["loss"] if rows else None}
        if self.cfg.log_gap or self.cfg.sampler != "random":
            # Of train_seconds: embedding + ordering (part of training), and the gap diagnostic (not).
            out.update(self._timing_so_far())
            gaps = [r for r in rows if "gap" in r]
            if gaps:
                out.update({"final_gap": gaps[-1]["gap"], "mean_gap": sum(r["gap"] for r in gaps) / len(gaps),
                            "final_global_loss": gaps[-1]["gap_global_loss"],
                            "final_same_class_pairs": gaps[-1]["same_class_pairs"]})
        return out

    def _timing_so_far(self) -> dict[str, float]:
        return {"sampler_seconds": self.timing["sampler_seconds"] + sum(self.sampler.timing.values()),
                "gap_seconds": self.timing["gap_seconds"]}

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss_fn.state_dict(), "timing": self._timing_so_far()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_fn.load_state_dict(state["loss"])
        self.timing = dict(state["timing"])
