"""The image task: two augmented views of every image, one encoder + head.

Data: the small greyscale sets (digits, Fashion-MNIST, MNIST-5k), the RGB
sets in their standard formats (CIFAR-10/100, STL-10, ImageFolder trees) and
the user's arrays (``arrays:PATH``), all as :class:`negbatch.data.ImageDataset`.
Small data sets live on the device and each batch is an index into them;
larger ones (uint8 in memory, or image files) stay on the CPU and stream
through a DataLoader (``num_workers``), one batch on the device at a time.
Views: the greyscale :class:`~negbatch.data.Augment` for one-channel images,
SimCLR's :class:`~negbatch.data.SimCLRAugment` (batched on the device) for
RGB. Evaluation (``evaluation``): ``small`` is the exact float64 probe of the
digits studies, ``scale`` the linear evaluation and weighted kNN streamed on
the device (``auto``: small for the greyscale sets held on the device).

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

import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import distributed as nbdist
from ...data import Augment, ImageDataset, SimCLRAugment, image_batch_loader, load_dataset, to_float_images
from ...diagnostics import alignment, global_train_gap, intra_class_distance, silhouette_score, uniformity
from ...evaluation import extract_features, knn_accuracy, linear_eval, linear_probe, weighted_knn_accuracy
from ...losses import ReLIC
from ...models import ContrastiveModel, ProjectionHead, build_encoder
from ...sampling import EpochBatchSampler, GCBSampler, HardNegativeBatchSampler, RandomBatchSampler, embed_dataset
from ..config import TrainConfig
from ..global_loss import GammaSchedule, GlobalPairLoss
from ..objective import batch_loss, needs_indices
from ..precision import Precision
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
    "evaluate_at_scale",
    "load_image_data",
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
        if needs_indices(self.loss):
            return self.loss(z1, z2, indices=batch.index, generator=generator)
        return self.loss(z1, z2, generator=generator)

    def log_values(self) -> dict[str, float]:
        """A learned temperature (and SigLIP's bias), the share of filtered candidates."""
        values = getattr(self.loss, "log_values", None)
        return values() if values is not None else {}


def negative_candidates(loss: str, batch_size: int) -> int:
    """Negatives available per anchor: SimCLR (and the global loss) have the
    other 2B - 2 views, ReLIC the other B - 1 samples of the opposite view."""
    return batch_size - 1 if loss == "relic" else 2 * batch_size - 2


def build_loss(cfg: TrainConfig, num_samples: int | None = None, total_steps: int | None = None) -> nn.Module:
    """The objective named by ``cfg.loss`` with ``cfg.negatives`` negatives per anchor.

    ``num_samples`` (the training set's size) is needed by ``loss="global"``,
    which keeps one running normaliser per training sample; ``total_steps``
    sets the length of its gamma schedule (default: ``cfg.epochs`` epochs of
    full batches).
    """
    negatives = cfg.negatives
    contrasted, where = cfg.batch_size, f"batch_size={cfg.batch_size}"
    if cfg.chunk_size and cfg.chunk_method == "accumulate":
        from ..chunked import check_accumulated_chunks

        check_accumulated_chunks(cfg.chunk_size, nbdist.world_size())  # before the run claims its folder
        if cfg.chunk_size < cfg.batch_size:
            # Accumulation contrasts each chunk on its own; the smallest chunk decides.
            contrasted = cfg.batch_size % cfg.chunk_size or cfg.chunk_size
            where = (f"chunk_method='accumulate' with chunk_size={cfg.chunk_size} (batch_size={cfg.batch_size}: "
                     f"the smallest chunk has {contrasted} rows)")
    # With a momentum encoder the views are queries and keys (MoCo): B - 1 in-batch keys.
    available = contrasted - 1 if cfg.key_momentum else negative_candidates(cfg.loss, contrasted)
    if negatives != "all" and negatives > available:
        raise ValueError(
            f"negatives={negatives} exceeds the {available} candidates per anchor of {cfg.loss} at "
            f"{where}; use negatives <= {available} or 'all'"
        )
    gather = nbdist.world_size() > 1  # every process's embeddings are candidates
    learnable = bool(cfg.learnable_temperature)
    if cfg.loss == "global":
        if num_samples is None:
            raise ValueError("loss='global' needs num_samples, the training set's size (one nu per sample)")
        steps = total_steps or cfg.total_steps(max(num_samples // cfg.batch_size, 1))
        return GlobalPairLoss(num_samples, cfg.temperature, GammaSchedule(cfg.gamma, cfg.gamma_schedule, steps),
                              negatives, gather=gather, learnable_temperature=learnable)
    if cfg.loss == "relic":
        return PairLoss(ReLIC(temperature=cfg.temperature, alpha=cfg.alpha, negatives=negatives, gather=gather,
                              learnable_temperature=learnable))
    return PairLoss(batch_loss(cfg, form="query_document" if cfg.key_momentum else "two_view", gather=gather))


# ------------------------------------------------------------------------ batches


def image_embed_fn(model: nn.Module, train_x, *, two_sided: bool = True, device: torch.device | None = None):
    """``embed_fn(indices)`` for the library samplers: the projections of the
    un-augmented images, as the pair ``(z, z)`` (or ``z`` alone). ``train_x``
    may be a tensor on any device (uint8 or float) or image files; each chunk
    goes to ``device`` (default: the tensor's)."""

    def embed_fn(indices: Tensor):
        x = train_x[indices.to(train_x.device)] if isinstance(train_x, Tensor) else train_x[indices]
        z = model(to_float_images(x, device if device is not None else x.device))
        return (z, z) if two_sided else z

    return embed_fn


def build_sampler(cfg: TrainConfig, train_x, model: nn.Module, device: torch.device | None = None) -> EpochBatchSampler:
    """The batch sampler named by ``cfg.sampler``, dropping the short tail
    batch, so that every sampler takes the same number of steps per epoch:

    * ``random`` -- a permutation per epoch, seeded by ``(seed, epoch)``;
    * ``gcbs`` / ``hard`` -- planned from the model's embeddings of
      ``train_x`` at the start of each epoch (and every ``refresh_every`` steps).
    """
    n = len(train_x)
    if cfg.batch_size > n:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {n} training samples; lower batch_size")
    # Global batches of batch_size; under several processes each gets its share.
    common = dict(drop_last=True, seed=cfg.seed, refresh_every=cfg.refresh_every or None)
    if cfg.sampler == "random":
        return RandomBatchSampler(n, cfg.batch_size, shuffle_batches=False, **common)
    embedding = dict(model=model, chunk_size=1024)
    if cfg.sampler == "gcbs":
        return GCBSampler(image_embed_fn(model, train_x, device=device), n, cfg.batch_size, q=cfg.gcbs_q,
                          **embedding, **common)
    if cfg.sampler == "hard":
        return HardNegativeBatchSampler(image_embed_fn(model, train_x, two_sided=False, device=device), n,
                                        cfg.batch_size, **embedding, **common)
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
    precision: Precision | None = None,
    key_encoder: nn.Module | None = None,
) -> Tensor:
    """Forward, loss and backward of one batch; returns the detached loss.

    Without ``chunk_size``: both views in one pass (BatchNorm sees the whole 2B
    batch). With it, each view is encoded in chunks of ``chunk_size`` rows:
    ``"cache"`` runs :class:`negbatch.GradCache` (the full-batch loss and, for
    encoders without BatchNorm, its exact gradient); ``"accumulate"`` is
    gradient accumulation, a loss per chunk (negatives only from the chunk).
    ``precision`` adds autocast and loss scaling (fp16). ``key_encoder``
    (MoCo's momentum encoder, not with ``chunk_size``) encodes the second
    views, the keys, without a graph; the model the first, the queries.
    """
    if chunk_size:
        from ..chunked import accumulated_forward_backward, cached_forward_backward

        step = cached_forward_backward if chunk_method == "cache" else accumulated_forward_backward
        return step(model, loss_fn, batch, generator, chunk_size, precision)
    precision = precision or Precision("fp32", batch.view1.device)
    with precision.autocast():
        if key_encoder is not None:
            z1, z2 = model(batch.view1), key_encoder(batch.view2)
        else:
            z1, z2 = model(torch.cat([batch.view1, batch.view2])).chunk(2)
        loss = loss_fn(z1, z2, batch, generator)
    precision.backward(loss)
    return loss.detach()


# ---------------------------------------------------------------- model, evaluation


def build_model(cfg: TrainConfig, image_shape: tuple[int, int, int]) -> ContrastiveModel:
    """Encoder + projection head, with ``cfg.norm``'s BatchNorm layers."""
    encoder = build_encoder(cfg.encoder, image_shape, cfg.encoder_widths)  # ResNets: None is the standard widths
    model = ContrastiveModel(encoder, ProjectionHead(encoder.out_dim, cfg.head_widths))
    return with_norm(model, cfg.norm)


def with_norm(model: nn.Module, norm: str) -> nn.Module:
    """``model`` with its BatchNorm layers kept (``"batch"``), synchronised
    across processes (``"sync"``: SyncBatchNorm, CUDA only) or removed
    (``"none"``: each replaced by an identity)."""
    if norm == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if norm == "none":
        for name, child in model.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(model, name, nn.Identity())
            else:
                with_norm(child, norm)
    return model


@torch.no_grad()
def representations(model: ContrastiveModel, x: Tensor, batch_size: int = 512) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model.representation(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: ContrastiveModel, data: ImageDataset, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Frozen-representation metrics, exactly as the small-data studies report
    them: linear probe (float64 L-BFGS) and kNN accuracy on the test split; on
    the L2-normalised test representations, intra-class mean pairwise
    distance and silhouette (true labels), and alignment/uniformity of two
    augmented views."""
    x = to_float_images(data.x_test, device)
    rtr = representations(model, to_float_images(data.x_train, device)).cpu()
    rte = representations(model, x).cpu()
    zte = F.normalize(rte, dim=1)
    aug = Augment(strength=cfg.aug_strength, hflip=cfg.hflip)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    a1 = F.normalize(representations(model, aug(x, g)).cpu(), dim=1)
    a2 = F.normalize(representations(model, aug(x, g)).cpu(), dim=1)
    return {
        "linear_acc": linear_probe(rtr, data.y_train, rte, data.y_test),
        "knn_acc": knn_accuracy(rtr, data.y_train, rte, data.y_test, k=min(cfg.knn_k, rtr.shape[0])),
        "intra_class_distance": _defined(intra_class_distance, zte, data.y_test),
        "silhouette": _defined(silhouette_score, zte, data.y_test),
        "alignment": alignment(a1, a2),
        "uniformity": uniformity(zte),
    }


def _defined(metric, *args) -> float | None:
    """The metric, or None where it is undefined (e.g. no class with two test images)."""
    try:
        return metric(*args)
    except ValueError:
        return None


def weighted_knn(ftr: Tensor, ytr: Tensor, fte: Tensor, yte: Tensor, device: torch.device) -> float:
    """Wu et al.'s kNN monitor: k = 200 (or the training set's size), temperature 0.07."""
    return weighted_knn_accuracy(ftr, ytr, fte, yte, k=min(200, len(ftr)), device=device)


#: The geometry metrics (pairwise over the test set) use at most this many test images at scale.
GEOMETRY_SAMPLES = 2000


@torch.no_grad()
def evaluate_at_scale(model: ContrastiveModel, data: ImageDataset, views, cfg: TrainConfig,
                      device: torch.device) -> dict[str, float]:
    """The linear evaluation protocol and the weighted kNN monitor on frozen
    features streamed through the model in batches (any data set size): the
    logistic regression is fitted on the device (:func:`negbatch.evaluation.linear_eval`),
    the kNN is Wu et al.'s (k = 200, temperature 0.07). The geometry metrics
    and alignment use the first :data:`GEOMETRY_SAMPLES` test images."""
    was_training = model.training
    model.eval()
    try:
        features = lambda x: extract_features(model.representation, x, batch_size=512, device=device,  # noqa: E731
                                              num_workers=cfg.num_workers)
        ftr, fte = features(data.x_train), features(data.x_test)
        n = min(len(data.x_test), GEOMETRY_SAMPLES)
        zte = F.normalize(fte[:n], dim=1)
        g = torch.Generator().manual_seed(cfg.seed + 7)
        x = to_float_images(data.x_test[:n] if isinstance(data.x_test, Tensor) else data.x_test[torch.arange(n)],
                            device)
        a1 = F.normalize(model.representation(views(x, g)).float().cpu(), dim=1)
        a2 = F.normalize(model.representation(views(x, g)).float().cpu(), dim=1)
        return {
            "linear_acc": linear_eval(ftr, data.y_train, fte, data.y_test, device=device),
            "knn_acc": weighted_knn(ftr, data.y_train, fte, data.y_test, device),
            "intra_class_distance": _defined(intra_class_distance, zte, data.y_test[:n]),
            "silhouette": _defined(silhouette_score, zte, data.y_test[:n]),
            "alignment": alignment(a1, a2),
            "uniformity": uniformity(zte),
        }
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------- the task


def load_image_data(cfg: TrainConfig) -> ImageDataset:
    """The data set of ``cfg``: a named one (``data_dir``, and for imagefolder
    ``image_size`` / ``decode_size``), or the user's arrays (``arrays:PATH``)."""
    if cfg.dataset.startswith("arrays:"):
        return load_dataset("npz", cfg.dataset.split(":", 1)[1].strip())
    options: dict[str, Any] = {}
    if cfg.dataset == "imagefolder":
        options = {"size": cfg.image_size, "decode_size": cfg.decode_size, "num_workers": cfg.num_workers,
                   "cache_dir": cfg.image_cache_dir}
    elif cfg.image_size is not None or cfg.decode_size is not None:
        raise ValueError(f"image_size and decode_size apply to dataset='imagefolder', not {cfg.dataset!r}")
    if cfg.dataset == "stl10":
        # unlabeled_X.bin holds 100,000 images (2.8 GB in memory): read only by a run that trains on them.
        options = {"unlabeled": cfg.use_unlabeled}
    return load_dataset(cfg.dataset, cfg.data_dir, **options)


#: Data sets up to this size (bytes) are held on the training device.
RESIDENT_BYTES = 1 << 30


class ImageTask(Task):
    """Two augmented views of each training image through one encoder + head."""

    def __init__(self, cfg: TrainConfig, device: torch.device, data: ImageDataset | None = None) -> None:
        super().__init__(cfg, device)
        # BatchNorm normalises each process's rows by their statistics, and accumulated chunks take
        # chunk_size / N rows of each process: either way the computation follows N.
        self.world_size_invariant = cfg.norm != "batch" and not (cfg.chunk_size and cfg.chunk_method == "accumulate")
        self.loaded_here = data is None  # from cfg's data set (not handed in)
        data = data if data is not None else load_image_data(cfg)
        self.data = data.subset(cfg.n_train, cfg.n_test)
        self.data_identity = self.data.identity()
        if cfg.use_unlabeled and self.data.x_unlabeled is None:
            raise ValueError(f"use_unlabeled: {self.data.name} has no unlabeled split (STL-10 has)")
        # Pre-training images: the labelled training split, with the unlabeled one if asked (or if
        # there is nothing else: the user's unlabeled arrays); the probe needs the labelled splits.
        unlabeled_only = len(self.data.x_train) == 0
        images, self.train_labels = self.data.pretraining_images() if cfg.use_unlabeled or unlabeled_only else (
            self.data.x_train, self.data.y_train)
        self.resident = isinstance(images, Tensor) and images.numel() * images.element_size() <= RESIDENT_BYTES
        self.train_x = images.to(device) if self.resident else images
        channels = self.data.image_shape[0]
        if channels == 1:
            self.augment = Augment(strength=cfg.aug_strength, hflip=cfg.hflip)
        else:
            self.augment = SimCLRAugment(strength=cfg.aug_strength, hflip=0.5 if cfg.hflip else 0.0)
        mode = cfg.evaluation if cfg.evaluation != "auto" else ("small" if channels == 1 and self.resident else "scale")
        self.evaluation = mode
        # Seconds of earlier sessions (a resumed run): embedding + ordering, the gap diagnostic.
        self.timing = {"sampler_seconds": 0.0, "gap_seconds": 0.0}

    def earlier_data_identity(self, saved: dict[str, Any]) -> dict[str, Any] | None:
        """STL-10 without ``use_unlabeled``: until 2026-12-03 its unlabeled split was read for
        every run, and ``data.json`` fingerprinted it; the identity of that record, so that
        such a folder resumes (reading the split this once)."""
        cfg = self.cfg
        if cfg.dataset != "stl10" or cfg.use_unlabeled or not self.loaded_here or \
                "unlabeled" not in saved.get("splits", {}):
            return None
        return load_dataset("stl10", cfg.data_dir, unlabeled=True).subset(cfg.n_train, cfg.n_test).identity()

    def build(self) -> None:
        cfg = self.cfg
        if cfg.norm == "sync" and self.device.type != "cuda":
            raise ValueError("norm='sync' (SyncBatchNorm) runs on CUDA devices only; use norm='batch' or 'none' on "
                             f"{self.device.type}")
        if cfg.probe_samples is not None and cfg.probe_samples > len(self.data.x_train):
            raise ValueError(f"probe_samples={cfg.probe_samples} exceeds the {len(self.data.x_train)} training images; "
                             f"lower it or leave it unset (all)")
        self._check_evaluation_data()
        self.model = build_model(cfg, self.data.image_shape).to(self.device)
        self._warn_chunked_batchnorm()
        n = len(self.train_x)
        self.loss_fn = build_loss(cfg, num_samples=n,
                                  total_steps=cfg.total_steps(max(n // cfg.batch_size, 1))).to(self.device)
        self.build_key_encoder()  # MoCo: the second views are keys of a momentum encoder
        self.sampler = build_sampler(cfg, self.train_x, self.model, self.device)

    def _check_evaluation_data(self) -> None:
        """What the evaluation after training needs, checked before training starts:
        two test images (alignment, uniformity) and two classes among the probe's
        training images."""
        cfg, data = self.cfg, self.data
        if not data.has_labels:
            return
        if len(data.x_test) < 2:
            raise ValueError(f"the evaluation needs at least 2 test images, {data.name}'s test split holds "
                             f"{len(data.x_test)}" + (f" (n_test={cfg.n_test}); raise n_test" if cfg.n_test else ""))
        labels = data.y_train[:cfg.probe_samples]
        if int(labels.min()) == int(labels.max()):
            name = "probe_samples" if cfg.probe_samples is not None else "n_train" if cfg.n_train else None
            raise ValueError(f"the linear probe's {len(labels)} training images hold one class only "
                             f"({int(labels.min())}); it needs at least 2"
                             + (f": raise {name} (now {getattr(cfg, name)})" if name else ""))

    def _warn_chunked_batchnorm(self) -> None:
        """GradCache's warning about BatchNorm in chunks, in the lab's terms:
        the library's names its own argument (batchnorm='eval'), which the
        command line does not have; --norm none is the lab's remedy."""
        cfg = self.cfg
        if not (cfg.chunk_size and cfg.chunk_method == "cache" and cfg.norm == "batch"):
            return
        layers = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if layers:
            warnings.warn(
                f"chunk_size={cfg.chunk_size} with norm='batch': each chunk is normalised by its own BatchNorm "
                "statistics, so the cached gradient is not the full-batch gradient; --norm none removes the "
                "BatchNorm layers (exact), see docs/gradcache.md", UserWarning, stacklevel=2)
            from ...gradcache import _WARNED_BATCHNORM

            _WARNED_BATCHNORM.update(layers)  # said once, here

    def start_epoch(self, epoch: int) -> dict[str, float]:
        """Time spent embedding and ordering this epoch's batches and, with
        ``log_gap``: ``gap``, ``gap_global_loss``, ``gap_train_loss`` of
        :func:`~negbatch.diagnostics.global_train_gap` on the epoch's batches
        and the current model's embeddings of the un-augmented images (the
        sampler's own when it has them), ``same_class_pairs`` (the share of
        in-batch pairs of one class) and ``gap_seconds``, their cost, which is
        not part of training."""
        cfg = self.cfg
        row: dict[str, float] = {}
        if cfg.knn_every and epoch and epoch % cfg.knn_every == 0 and self.data.has_labels:
            row["knn_monitor"] = self.knn_monitor()
        if not (cfg.log_gap or cfg.sampler != "random"):
            return row
        before = dict(self.sampler.timing)
        plan = [torch.as_tensor(b) for b in self.sampler.plan()]
        row.update({k: self.sampler.timing[k] - before[k] for k in before})
        if cfg.log_gap:
            t0 = time.perf_counter()
            z = self.sampler.last_prepared
            z = z[0] if isinstance(z, tuple) else z
            if z is None:
                z, _ = embed_dataset(image_embed_fn(self.model, self.train_x, two_sided=False, device=self.device),
                                     np.arange(len(self.train_x)), model=self.model, two_sided=False, shard=False)
            # The temperature the loss trains at now (a learnable one's current value).
            inner = getattr(self.loss_fn, "loss", self.loss_fn)
            result = global_train_gap(z, plan, float(getattr(inner, "current_temperature", cfg.temperature)))
            row.update({"gap": result.gap, "gap_global_loss": result.global_loss, "gap_train_loss": result.train_loss})
            if (self.train_labels >= 0).all():
                row["same_class_pairs"] = same_class_pairs(plan, self.train_labels)
            row["gap_seconds"] = time.perf_counter() - t0
            self.timing["gap_seconds"] += row["gap_seconds"]
        return row

    @torch.no_grad()
    def knn_monitor(self) -> float:
        """Weighted kNN accuracy (Wu et al.) of the test split against the labelled
        training split, on the current representation (logged every ``knn_every`` epochs)."""
        was_training = self.model.training
        self.model.eval()
        try:
            f = lambda x: extract_features(self.model.representation, x, batch_size=512, device=self.device)  # noqa: E731
            return weighted_knn(f(self.data.x_train), self.data.y_train, f(self.data.x_test), self.data.y_test,
                                self.device)
        finally:
            self.model.train(was_training)

    def batches(self, streams):
        if self.resident and self.cfg.num_workers == 0:
            for index in self.sampler:
                index = torch.as_tensor(index, dtype=torch.long)
                yield self._views(self.train_x[index.to(self.device)], index, streams)
            return
        cuda = self.device.type == "cuda"
        loader = image_batch_loader(self.train_x, None, self.sampler, num_workers=self.cfg.num_workers,
                                    pin_memory=cuda)
        for x, _, index in loader:
            yield self._views(to_float_images(x, self.device, non_blocking=cuda), index, streams)

    def _views(self, x: Tensor, index: Tensor, streams) -> Batch:
        """Two views of this process's rows ``x``, from random numbers drawn for the
        whole global batch (so that every process sees the views one process would)."""
        start = self.sampler.share_bounds(self.cfg.batch_size)[0]
        views = [self.view(x, streams.augment, part=(start, self.cfg.batch_size)) for _ in range(2)]
        if self.cfg.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return Batch(index, *views)

    def view(self, x: Tensor, generator: torch.Generator, part: tuple[int, int] | None = None) -> Tensor:
        """One random view of each image of ``x`` (float, on the device)."""
        x = to_float_images(x) if x.dtype == torch.uint8 else x
        if isinstance(self.augment, Augment):
            return self.augment(x, generator, part=part)
        start, total = part if part is not None else (0, x.shape[0])
        params = self.augment.draw(total, x.shape[2], x.shape[3], generator)
        rows = slice(start, start + x.shape[0])
        return self.augment.apply(x, type(params)(**{k: v[rows] for k, v in vars(params).items()}))

    def step(self, batch: Batch, streams) -> Tensor:
        return forward_backward(self.net, self.loss_fn, batch, streams.loss, self.cfg.chunk_size,
                                self.cfg.chunk_method, self.precision, key_encoder=self.key_encoder)

    def step_metrics(self) -> dict[str, float]:
        # e.g. the true InfoNCE next to the global loss's surrogate
        return self.loss_fn.log_values() if hasattr(self.loss_fn, "log_values") else {}

    def evaluate(self) -> dict[str, Any]:
        if not self.data.has_labels:
            return {"evaluation": "none (the data set has no labels)"}
        data = self.data
        if self.cfg.probe_samples is not None:  # the probes fit on a prefix of the (shuffled) training split
            data = data.subset(n_train=self.cfg.probe_samples)
        if self.evaluation == "small":
            return evaluate(self.model, data, self.cfg, self.device)
        return {**evaluate_at_scale(self.model, data, self.view, self.cfg, self.device), "evaluation": "scale"}

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"final_loss": rows[-1]["loss"] if rows else None}
        if self.cfg.log_gap or self.cfg.sampler != "random":
            # Of train_seconds: embedding + ordering (part of training), and the gap diagnostic (not).
            out.update(self._timing_so_far())
            gaps = [r for r in rows if "gap" in r]
            if gaps:
                out.update({"final_gap": gaps[-1]["gap"], "mean_gap": sum(r["gap"] for r in gaps) / len(gaps),
                            "final_global_loss": gaps[-1]["gap_global_loss"]})
                if "same_class_pairs" in gaps[-1]:
                    out["final_same_class_pairs"] = gaps[-1]["same_class_pairs"]
        return out

    def _timing_so_far(self) -> dict[str, float]:
        return {"sampler_seconds": self.timing["sampler_seconds"] + sum(self.sampler.timing.values()),
                "gap_seconds": self.timing["gap_seconds"]}

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss_fn.state_dict(), "timing": self._timing_so_far(), **self.key_encoder_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_fn.load_state_dict(state["loss"])
        self.load_key_encoder_state(state)
        self.timing = dict(state["timing"])
