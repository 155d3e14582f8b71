"""The lab's one configuration: a flat tree of options, mirrored by the command
line and by TOML / YAML / JSON files, validated here and nowhere else.

Every field of :class:`TrainConfig` is a ``--field-name`` option of
``negbatch train`` (and of the studies, for the fields they do not sweep) and a
``field_name`` (or ``field-name``) key of a config file. Unknown keys and bad
values raise one ``ValueError`` that lists every problem.

The data set decides the *task*: image data sets train two augmented views of
each image (SimCLR, ReLIC, the global loss), text data sets train a dual
encoder on (query, document) pairs. Options that belong to the other task
must stay unset, and options left unset take the task's default
(:data:`TASK_DEFAULTS`), so ``--dataset bible`` alone gives a sensible text run.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Iterable
from typing import Any

__all__ = [
    "TrainConfig",
    "TASK_DEFAULTS",
    "TEXT_DATASETS",
    "task_of",
    "load_config_file",
    "load_study_options",
    "add_config_arguments",
    "config_from_args",
    "parse_negatives",
]

#: Options that change how a run is executed, not what it computes: a run
#: folder accepts them changed on resume, and a study's rerun finds its finished
#: runs whatever they are. ``log_every`` changes which steps are logged (the text
#: summary's ``first_loss`` and ``final_loss`` are of the logged rows) and
#: ``device`` the rounding of the sums, not the experiment.
RUNTIME_ONLY = ("progress", "checkpoint_every", "checkpoint_minutes", "num_workers", "compile", "channels_last",
                "image_cache_dir", "log_every", "device")
#: Of :data:`RUNTIME_ONLY`, those that were part of the identity until 2026-12-03:
#: the run keys of the studies hashed them (see :meth:`TrainConfig.former_identity`).
FORMERLY_IDENTITY = ("log_every", "device")

#: Fields added after run folders were first saved, with their default: the
#: default means what the earlier version did, so it is left out of
#: :meth:`TrainConfig.identity` (the run keys of studies stay the same).
LATER_FIELDS: dict[str, Any] = {"key_momentum": 0.0}

#: Text data sets: the Bible pairs, 40 built-in pairs, or the user's file as ``pairs:PATH``.
TEXT_DATASETS = ("bible", "builtin")
#: The data sets read from ``data_dir``: the others ship with a package or name their file (arrays:, pairs:).
FOLDER_DATASETS = ("fashion-mnist", "cifar10", "cifar100", "stl10", "imagefolder")
_PAIRS, _ARRAYS = "pairs:", "arrays:"

IMAGE_ONLY = ("n_train", "n_test", "aug_strength", "hflip", "encoder_widths", "head_widths", "knn_k", "probe_samples",
              "image_size", "decode_size", "image_cache_dir")
#: Image-only options whose default is not None: refused on text data when changed.
IMAGE_ONLY_SET = {"norm": "batch", "channels_last": False, "log_gap": False, "use_unlabeled": False,
                  "evaluation": "auto", "knn_every": 0,
                  # the text task always caches its chunks (GradCache)
                  "chunk_method": "cache"}
TEXT_ONLY = ("max_pairs", "test_fraction", "data_seed", "query_column", "document_column", "hard_negatives_column",
             "vocab_size", "max_length", "text_dim", "text_depth", "text_heads", "dropout", "symmetric",
             "unsupervised", "train_layers")
#: Options of the from-scratch text transformer: refused with ``encoder="minilm"``.
TRANSFORMER_ONLY = ("vocab_size", "text_dim", "text_depth", "text_heads")
#: Layers of all-MiniLM-L6-v2 (the most ``train_layers`` may name).
MINILM_LAYERS = 6

#: What an unset option means, per task. The text defaults are the text studies'
#: (AdamW at a constant rate, temperature 0.05); the image ones SimCLR-like.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "image": {
        "loss": "simclr", "encoder": "mlp", "temperature": 0.2, "batch_size": 128, "epochs": 10,
        "optimizer": "adam", "weight_decay": 1e-6, "schedule": "cosine", "snr": True,
        "aug_strength": 0.5, "hflip": False, "encoder_widths": (256, 128), "head_widths": (256, 64), "knn_k": 20,
    },
    "text": {
        "loss": "infonce", "encoder": "transformer", "temperature": 0.05, "batch_size": 64, "steps": 100,
        "optimizer": "adamw", "weight_decay": 0.01, "schedule": "constant", "snr": False,
        "test_fraction": 0.1, "data_seed": 0, "query_column": "query", "document_column": "document",
        "vocab_size": 8000, "max_length": 64, "text_dim": 64, "text_depth": 1, "text_heads": 4, "dropout": 0.1,
        "symmetric": True,
    },
}

LOSSES = {"image": ("simclr", "relic", "global", "dcl", "siglip"), "text": ("infonce", "global", "dcl", "siglip")}
#: Losses that can keep a queue of past embeddings (``queue_size``).
QUEUE_LOSSES = ("simclr", "infonce", "dcl")
ENCODERS = {"image": ("mlp", "conv", "resnet18", "resnet50"), "text": ("transformer", "minilm")}
SAMPLERS = {"image": ("random", "gcbs", "hard"), "text": ("random", "gcbs", "hard", "no-duplicates")}


def task_of(dataset: str) -> str:
    """``"text"`` for the text data sets (``bible``, ``builtin``, ``pairs:PATH``), else ``"image"``."""
    return "text" if dataset in TEXT_DATASETS or str(dataset).startswith(_PAIRS) else "image"


def dataset_problem(d: object) -> str | None:
    """What is wrong with the data set name ``d`` (None: nothing)."""
    if not isinstance(d, str):
        return f"expected a name, got {d!r}"
    if d.startswith(_PAIRS) or d.startswith(_ARRAYS):
        if not d.split(":", 1)[1].strip():
            return f"{d!r} names no file; write {d.split(':')[0]}:PATH"
        return None
    known = _image_datasets() + TEXT_DATASETS
    if d not in known:
        close = difflib.get_close_matches(d, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"expected one of {', '.join(known)}, arrays:PATH or pairs:PATH{hint} (got {d!r})"
    return None


def parse_negatives(value: Any) -> str | int:
    """``"all"`` or a positive int (strings of digits accepted)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"negatives must be 'all' or a positive int, got {value!r}")


def _int_tuple(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    try:
        # int() would truncate 2.5 and take True: only ints, integral floats and digits.
        if any(isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) for v in value):
            raise ValueError
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a list of positive ints, got {value!r}") from None
    if not out or any(v < 1 for v in out):
        raise ValueError(f"expected a non-empty list of positive ints, got {value!r}")
    return out


def _positive_number(value: Any) -> bool:
    """A number above 0 (the checks of its type and range come separately)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _opt(default: Any, help: str, section: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, "section": section, **meta})


def _image_datasets() -> tuple[str, ...]:
    from ..data import DATASETS

    return tuple(d for d in DATASETS if d != "npz")  # the user's arrays are arrays:PATH here


@dataclass(frozen=True)
class TrainConfig:
    """One contrastive training run, on images or on text pairs (docs/lab.md lists every field).

    Examples
    --------
    >>> from negbatch.lab import TrainConfig
    >>> TrainConfig().loss, TrainConfig().temperature
    ('simclr', 0.2)
    >>> text = TrainConfig(dataset="builtin")
    >>> text.task, text.loss, text.temperature, text.steps
    ('text', 'infonce', 0.05, 100)
    """

    # data
    dataset: str = _opt("digits", "data set: digits, fashion-mnist, mnist5k, cifar10, cifar100, stl10, imagefolder, "
                        "arrays:PATH (.npz/.npy, see docs/lab.md); text pairs: bible, builtin, pairs:PATH (JSONL/CSV)",
                        "data")
    data_dir: str | None = _opt(None, "folder of the data set's files (Fashion-MNIST's IDX files, CIFAR's python "
                                "batches, STL-10's binaries, an ImageFolder tree's root; docs/images.md)", "data")
    n_train: int | None = _opt(None, "images: use the first N training images (default all)", "data")
    n_test: int | None = _opt(None, "images: use the first N test images (default all)", "data")
    max_pairs: int | None = _opt(None, "text: subsample this many pairs before the split (default all)", "data")
    test_fraction: float | None = _opt(None, "text: held-out fraction of chapters (bible) or pairs (default 0.1)", "data")
    data_seed: int | None = _opt(None, "text: seed of the subsample and the split (default 0)", "data")
    query_column: str | None = _opt(None, "text, pairs:PATH: the query column (default query)", "data")
    document_column: str | None = _opt(None, "text, pairs:PATH: the document column (default document)", "data")
    hard_negatives_column: str | None = _opt(None, "text, pairs:PATH: a column of hard-negative documents (default none)", "data")
    image_size: int | None = _opt(None, "imagefolder: resize every image once to this side and cache it (64: "
                                  "the papers' downsampled ImageNet)", "data")
    decode_size: int | None = _opt(None, "imagefolder: decode the files lazily, each batch, at this side", "data")
    image_cache_dir: str | None = _opt(None, "imagefolder with image_size: the folder of the decoded images' cache "
                                       "(default: data_dir; give a writable one when data_dir is read-only)", "data")
    use_unlabeled: bool = _opt(False, "images: pre-train on the unlabeled split too (STL-10's 100,000 images)", "data")
    aug_strength: float | None = _opt(None, "images: augmentation strength in [0, 1] (default 0.5; RGB: SimCLR's "
                                      "colour strength s)", "data")
    hflip: bool | None = _opt(None, "images: random horizontal flips (default false)", "data")
    # model
    encoder: str | None = _opt(None, "images: mlp, conv, resnet18 or resnet50 (CIFAR stem up to 32x32) (default "
                               "mlp); text: transformer (trained from scratch) or minilm (the pre-trained all-MiniLM-L6-v2, trained through "
                               "sentence-transformers' SentenceTransformerTrainer; see docs/text.md) (default transformer)",
                               "model")
    encoder_widths: tuple[int, ...] | None = _opt(None, "images: MLP hidden widths, conv stage channels or a ResNet's "
                                                  "four stage widths (default 256,128; ResNets: 64,128,256,512)", "model")
    head_widths: tuple[int, ...] | None = _opt(None, "images: projection head widths (default 256,64)", "model")
    norm: str = _opt("batch", "images: the encoder's BatchNorm layers: batch (per process), sync (SyncBatchNorm "
                     "across processes, CUDA) or none (removed: exact under GradCache and equal on any number of "
                     "processes)", "model", choices=("batch", "sync", "none"))
    vocab_size: int | None = _opt(None, "text: WordPiece vocabulary size (default 8000)", "model")
    max_length: int | None = _opt(None, "text: tokens per text, longer texts are truncated (default 64)", "model")
    text_dim: int | None = _opt(None, "text: encoder width (default 64)", "model")
    text_depth: int | None = _opt(None, "text: transformer layers (default 1)", "model")
    text_heads: int | None = _opt(None, "text: attention heads (default 4)", "model")
    dropout: float | None = _opt(None, "text: dropout (default 0.1; minilm: every dropout layer of the model)", "model")
    # text: the sentence-transformers path (encoder="minilm") and the SimCSE-style recipe
    train_layers: int | None = _opt(None, "text, minilm: train only the top N of MiniLM's 6 transformer layers, "
                                    "the embeddings and lower layers frozen (default all, embeddings included)",
                                    "model")
    unsupervised: bool | None = _opt(None, "text: SimCSE-style training: each training query is its own positive "
                                     "(the same text twice; dropout is the only augmentation); the held-out pairs "
                                     "still evaluate (default false)", "data")
    # objective
    loss: str | None = _opt(None, "images: simclr (InfoNCE), relic, global (GlobalInfoNCE, bias-corrected), dcl "
                            "(decoupled) or siglip (sigmoid pairs); text: infonce, global, dcl or siglip (default "
                            "simclr / infonce)", "objective")
    negatives: str | int = _opt("all", "negatives per anchor: all or K", "objective")
    temperature: float | None = _opt(None, "softmax temperature (default 0.2 images, 0.05 text)", "objective")
    symmetric: bool | None = _opt(None, "text: add the document-to-query term (default true)", "objective")
    alpha: float = _opt(1.0, "ReLIC invariance weight", "objective")
    gamma: float = _opt(0.9, "global loss: E-step rate of the running normalisers (final rate of a schedule)", "objective")
    queue_size: int = _opt(0, "simclr, infonce, dcl: also contrast with the last N embeddings of each direction, "
                           "a FIFO queue (MoCo; 0: none)", "objective")
    key_momentum: float = _opt(0.0, "simclr, infonce, dcl: encode the keys -- the documents (text), the second "
                               "views (images) -- with a momentum encoder, an exponential moving average of the "
                               "model with this momentum, and contrast the queries with them alone (MoCo, with "
                               "queue_size; 0: none; MoCo uses 0.999)", "objective")
    learnable_temperature: bool | None = _opt(None, "learn the temperature (log-space scale clamped to [1, 100], as "
                                              "CLIP; default true for siglip, false otherwise)", "objective")
    siglip_bias: float = _opt(-10.0, "siglip: initial bias (learned)", "objective")
    dcl_sigma: float | None = _opt(None, "dcl: DCL-W's weight concentration (the paper's 0.5; None: plain DCL)",
                                   "objective")
    gamma_schedule: str = _opt("constant", "global loss: gamma constant, or decaying from 1 to gamma over training",
                               "objective", choices=("constant", "linear", "cosine"))
    # optimisation
    batch_size: int | None = _opt(None, "samples (pairs) per batch (default 128 images, 64 text)", "optimisation")
    epochs: int | None = _opt(None, "passes over the training set (default 10 images); give epochs or steps", "optimisation")
    steps: int | None = _opt(None, "optimizer steps in all (default 100 text); give epochs or steps", "optimisation")
    optimizer: str | None = _opt(None, "sgd, adam, adamw or lars (default adam images, adamw text)", "optimisation",
                                 choices=("sgd", "adam", "adamw", "lars"))
    lr: float = _opt(1e-3, "peak learning rate", "optimisation")
    schedule: str | None = _opt(None, "learning rate: cosine (with warm-up) or constant (default cosine images, "
                                "constant text)", "optimisation", choices=("cosine", "constant"))
    weight_decay: float | None = _opt(None, "weight decay (default 1e-6 images, 0.01 text)", "optimisation")
    momentum: float = _opt(0.9, "momentum (sgd, lars)", "optimisation")
    warmup_steps: int = _opt(0, "linear warm-up steps before the cosine decay", "optimisation")
    chunk_size: int | None = _opt(None, "encode in chunks of N rows (None or 0: one pass); see chunk_method", "optimisation")
    chunk_method: str = _opt("cache", "with chunk_size: cache (GradCache, the full-batch loss) or accumulate (a loss "
                             "per chunk: fewer negatives)", "optimisation", choices=("cache", "accumulate"))
    sampler: str = _opt("random", "batch sampler: random, gcbs (global contrastive batch sampling), hard (k-means "
                        "hard-negative batches); text also no-duplicates", "optimisation")
    gcbs_q: float = _opt(0.999, "gcbs: quantile of the similarity matrix above which pairs become graph edges",
                         "optimisation")
    refresh_every: int = _opt(0, "gcbs/hard: re-plan the remaining batches every N steps (0: once per epoch)",
                              "optimisation")
    log_gap: bool = _opt(False, "images: log each epoch's global-train loss gap (one extra pass per epoch)",
                         "optimisation")
    # bookkeeping
    seed: int = _opt(0, "seed of every random draw", "run")
    snr: bool | None = _opt(None, "track the gradient signal-to-noise ratio (default true images, false text)", "run")
    snr_beta: float = _opt(0.95, "EMA decay of the SNR tracker", "run")
    log_every: int = _opt(1, "log metrics every N steps", "run")
    checkpoint_every: int = _opt(0, "also checkpoint every N steps (0: by time only)", "run")
    checkpoint_minutes: float = _opt(5.0, "checkpoint at least every N minutes of training (0: only at the end)", "run")
    knn_k: int | None = _opt(None, "images: neighbours of the kNN probe (default 20)", "run")
    probe_samples: int | None = _opt(None, "images: fit the linear probe and the kNN on the first N training images "
                                     "(a seeded random subset; default all): the same test, a faster evaluation",
                                     "run")
    evaluation: str = _opt("auto", "images: small (float64 probe of the whole split, the digits studies), scale "
                           "(linear evaluation and weighted kNN streamed on the device), auto (small for greyscale "
                           "sets held on the device)", "run", choices=("auto", "small", "scale"))
    knn_every: int = _opt(0, "images: log a weighted kNN accuracy every N epochs (0: never)", "run")
    device: str = _opt("cpu", "cpu, cuda, cuda:N or auto (under torchrun: cuda is each process's GPU)", "run")
    precision: str = _opt("fp32", "fp32, bf16 (autocast) or fp16 (autocast + GradScaler)", "run",
                          choices=("fp32", "bf16", "fp16"))
    channels_last: bool = _opt(False, "images: channels-last memory format (faster convolutions on GPUs)", "run")
    compile: bool = _opt(False, "torch.compile the model (first steps slower while it compiles)", "run")
    num_workers: int = _opt(0, "DataLoader worker processes (0: load in the training process)", "run")
    progress: bool = _opt(False, "show a progress bar (default: on for negbatch train when its output is a terminal, "
                                 "else off)", "run")

    @property
    def task(self) -> str:
        """``"image"`` or ``"text"``, decided by :attr:`dataset`."""
        return task_of(self.dataset)

    def __post_init__(self) -> None:
        errors: list[str] = []
        task = self.task if isinstance(self.dataset, str) else "image"
        self._check_dataset(errors)
        if task == "text" and self.symmetric is None and _positive_number(self.key_momentum):
            object.__setattr__(self, "symmetric", False)  # MoCo's loss: queries against keys only
        self._resolve_task_defaults(task, errors)
        self._check_text_encoder(task, errors)

        def bad(name: str, msg: str) -> None:
            errors.append(f"{name}: {msg} (got {getattr(self, name)!r})")

        def integer(name: str, low: int, msg: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                bad(name, msg)

        def number(name: str, ok, msg: str) -> None:
            v = getattr(self, name)
            if v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                bad(name, msg)
            elif not math.isfinite(v):  # inf passes a bound like v > 0 and fails far later (a NaN loss)
                bad(name, f"{msg}; got {v}, which is not finite")

        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) is not None and getattr(self, f.name) not in choices:
                bad(f.name, f"expected one of {', '.join(choices)}")
        for name, allowed in (("loss", LOSSES), ("encoder", ENCODERS)):
            if getattr(self, name) not in allowed[task]:
                bad(name, f"expected one of {', '.join(allowed[task])} for {task} data")
        if self.queue_size and self.loss not in QUEUE_LOSSES:
            bad("queue_size", f"a queue extends the softmax losses ({', '.join(QUEUE_LOSSES)}), not loss="
                f"{self.loss!r}; set queue_size=0")
        if _positive_number(self.key_momentum):
            self._check_key_momentum(task, errors)
        if self.dcl_sigma is not None and self.loss != "dcl":
            bad("dcl_sigma", f"applies to loss='dcl' only (got loss={self.loss!r}); leave it unset")
        if self.siglip_bias != -10.0 and self.loss != "siglip":
            bad("siglip_bias", f"applies to loss='siglip' only (got loss={self.loss!r}); leave it unset")
        if self.learnable_temperature is not None and not isinstance(self.learnable_temperature, bool):
            bad("learnable_temperature", "expected true or false")
        if self.sampler not in SAMPLERS[task]:
            bad("sampler", f"expected one of {', '.join(SAMPLERS[task])} for {task} data")
        for name in ("batch_size", "log_every", "knn_k", "probe_samples", "vocab_size", "max_length", "text_dim", "text_depth", "text_heads",
                     "image_size", "decode_size"):
            integer(name, 1, "expected a positive int", optional=name not in ("batch_size", "log_every"))
        if isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool) and self.batch_size == 1:
            bad("batch_size", "a contrastive batch needs at least 2 samples (with 1 an anchor has no negative and "
                              "the loss is 0)")
        for name in ("n_train", "n_test", "epochs", "steps"):
            integer(name, 1, "expected a positive int or None", optional=True)
        integer("max_pairs", 2, "expected an int >= 2 or None", optional=True)
        if self.epochs is None and self.steps is None:
            errors.append("epochs, steps: give one of them (the number of passes over the data, or of optimizer steps)")
        elif self.epochs is not None and self.steps is not None:
            errors.append(f"epochs, steps: give one of them, not both (got epochs={self.epochs!r}, steps={self.steps!r})")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 0):
            bad("chunk_size", "expected an int >= 0 or None (0 and None: no chunking)")
        for name in ("queue_size", "warmup_steps", "checkpoint_every", "seed", "refresh_every", "num_workers", "knn_every"):
            integer(name, 0, "expected an int >= 0")
        integer("data_seed", 0, "expected an int >= 0", optional=True)
        number("temperature", lambda v: v > 0, "expected a float > 0")
        number("dcl_sigma", lambda v: v > 0, "expected a float > 0 (the paper's 0.5) or None")
        number("siglip_bias", math.isfinite, "expected a finite float (SigLIP starts at -10)")
        number("lr", lambda v: v > 0, "expected a float > 0")
        number("checkpoint_minutes", lambda v: v >= 0, "expected a float >= 0 (0: only at the end)")
        for name in ("weight_decay", "alpha"):
            number(name, lambda v: v >= 0, "expected a float >= 0")
        number("gcbs_q", lambda v: 0 < v < 1, "expected a float strictly between 0 and 1 (the paper uses 0.999)")
        number("gamma", lambda v: 0 < v <= 1, "expected a float in (0, 1]")
        number("momentum", lambda v: 0 <= v < 1, "expected a float in [0, 1)")
        number("key_momentum", lambda v: 0 <= v < 1, "expected a float in [0, 1) (MoCo: 0.999; 0: no momentum "
               "encoder)")
        number("snr_beta", lambda v: 0 < v < 1, "expected a float in (0, 1)")
        number("aug_strength", lambda v: 0 <= v <= 1, "expected a float in [0, 1]")
        number("test_fraction", lambda v: 0 < v < 1, "expected a float in (0, 1)")
        number("dropout", lambda v: 0 <= v < 1, "expected a float in [0, 1)")
        if isinstance(self.text_dim, int) and isinstance(self.text_heads, int) and self.text_heads >= 1 \
                and self.text_dim % self.text_heads:
            bad("text_heads", f"must divide text_dim={self.text_dim}")
        try:
            object.__setattr__(self, "negatives", parse_negatives(self.negatives))
        except ValueError:
            bad("negatives", "expected 'all' or a positive int")
        if self.image_cache_dir is not None and (self.dataset != "imagefolder" or self.image_size is None):
            # Only image_size decodes once and caches; anything else reads the files as they are.
            bad("image_cache_dir", "applies to dataset='imagefolder' with image_size only (the decoded images' "
                "cache); drop it")
        if self.device not in ("cpu", "cuda", "auto") and not re.fullmatch(r"cuda:\d+", str(self.device)):
            bad("device", "expected cpu, cuda, cuda:N or auto")
        if errors:
            raise ValueError("invalid training configuration:\n  " + "\n  ".join(errors))
        if self.chunk_size == 0:  # one spelling of "no chunking", so that resuming and skipping agree
            object.__setattr__(self, "chunk_size", None)

    def _check_dataset(self, errors: list[str]) -> None:
        problem = dataset_problem(self.dataset)
        if problem:
            errors.append(f"dataset: {problem}")

    def _resolve_task_defaults(self, task: str, errors: list[str]) -> None:
        """Fill unset options with the task's defaults; refuse the other task's options."""
        foreign = TEXT_ONLY if task == "image" else IMAGE_ONLY
        for name in foreign:
            if getattr(self, name) is not None:
                errors.append(f"{name}: applies to {'text' if task == 'image' else 'image'} data sets only; "
                              f"dataset={self.dataset!r} is {task} data (got {getattr(self, name)!r})")
        if task == "text":
            for name, default in IMAGE_ONLY_SET.items():
                if getattr(self, name) != default:
                    errors.append(f"{name}: applies to image data sets only; dataset={self.dataset!r} is text data "
                                  f"(got {getattr(self, name)!r})")
        defaults = dict(TASK_DEFAULTS[task])
        if self.epochs is not None or self.steps is not None:  # one given: the other stays unset
            defaults.pop("epochs", None)
            defaults.pop("steps", None)
        if str(self.encoder).startswith("resnet"):
            defaults.pop("encoder_widths")  # None: the standard stage widths
        if task == "text" and self.encoder == "minilm":
            for name in TRANSFORMER_ONLY:  # None: MiniLM's own (refused when given)
                defaults.pop(name)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("encoder_widths", "head_widths"):
            value = getattr(self, name)
            if value is not None:  # a tuple too: its entries are checked
                try:
                    object.__setattr__(self, name, _int_tuple(value))
                except ValueError as err:
                    errors.append(f"{name}: {err}")

    def _check_key_momentum(self, task: str, errors: list[str]) -> None:
        """What a momentum encoder (MoCo) combines with: a softmax loss over
        queries and keys, one pass per encoder."""
        got = f"(got key_momentum={self.key_momentum!r}"
        if self.loss not in QUEUE_LOSSES:
            errors.append(f"key_momentum: a momentum encoder feeds the softmax losses ({', '.join(QUEUE_LOSSES)}), "
                          f"not loss={self.loss!r}; set key_momentum=0 {got})")
        if self.chunk_size:
            errors.append(f"key_momentum: the lab's chunked step (chunk_size) encodes every input with the trained "
                          f"encoder, not the keys with the momentum copy (the library's GradCache takes both as two "
                          f"towers, GradCache([encoder, keys], loss)); drop chunk_size or key_momentum {got}, "
                          f"chunk_size={self.chunk_size!r})")
        if task == "text" and self.encoder == "minilm":
            errors.append(f"key_momentum: sentence-transformers' trainer (encoder='minilm') has no momentum "
                          f"encoder; use encoder='transformer' or key_momentum=0 {got})")
        if task == "text" and self.symmetric:
            errors.append(f"symmetric: with a momentum encoder the loss is MoCo's, queries against keys (the "
                          f"documents, which take no gradient); leave symmetric unset or false {got})")

    def _check_text_encoder(self, task: str, errors: list[str]) -> None:
        """The options of ``encoder="minilm"`` and of ``unsupervised`` (after the task's defaults)."""
        if task != "text":
            return
        if self.unsupervised is None:
            object.__setattr__(self, "unsupervised", False)
        if self.unsupervised:
            if self.hard_negatives_column is not None:
                errors.append(f"hard_negatives_column: unsupervised training uses each query alone; drop "
                              f"hard_negatives_column or unsupervised (got {self.hard_negatives_column!r})")
            if self.dropout == 0:
                errors.append("dropout: unsupervised training needs dropout > 0, its only augmentation "
                              "(got 0; e.g. 0.1)")
        if self.encoder != "minilm":
            if self.train_layers is not None:
                errors.append(f"train_layers: applies to encoder='minilm' only; encoder={self.encoder!r} trains "
                              f"every layer (got {self.train_layers!r})")
            return
        for name in TRANSFORMER_ONLY:
            if getattr(self, name) is not None:
                errors.append(f"{name}: applies to encoder='transformer' only; minilm keeps its own tokenizer and "
                              f"architecture: drop --{name.replace('_', '-')} (got {getattr(self, name)!r})")
        tl = self.train_layers
        if tl is not None and (isinstance(tl, bool) or not isinstance(tl, int) or not 1 <= tl <= MINILM_LAYERS):
            errors.append(f"train_layers: expected an int from 1 to {MINILM_LAYERS} (MiniLM's layers), or None for "
                          f"the whole model (got {tl!r})")
        # name -> (is the value unsupported, what to do instead)
        unsupported = {
            "snr": (self.snr, "track it with NegbatchDiagnostics in your own SentenceTransformerTrainer"),
            "chunk_method": (self.chunk_method != "cache", "minilm caches (GradCache); use chunk_method='cache'"),
            "gamma_schedule": (self.gamma_schedule != "constant", "minilm's global loss keeps gamma constant"),
            "optimizer": (self.optimizer == "lars", "use adamw, adam or sgd"),
            "compile": (self.compile, "the trainer runs the model as it is"),
            "loss": (self.loss not in ("infonce", "global"), "use infonce or global"),
            "queue_size": (self.queue_size > 0, "set queue_size=0 (the trainer's loss keeps no queue here)"),
            "learnable_temperature": (bool(self.learnable_temperature),
                                      "the trainer's optimizer holds the model's parameters only; fix the temperature"),
        }
        for name, (refused, what) in unsupported.items():
            if refused:
                errors.append(f"{name}: not supported with encoder='minilm' (got {getattr(self, name)!r}); {what}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build a config from a mapping (file contents, JSON); keys may use ``-`` or ``_``.

        Raises ``ValueError`` naming unknown keys (with the closest valid name) and
        values of the wrong type, together with the value errors of the other keys.

        Examples
        --------
        >>> from negbatch.lab import TrainConfig
        >>> TrainConfig.from_dict({"loss": "relic", "negatives": 10, "head-widths": [64, 32]}).head_widths
        (64, 32)
        """
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        errors = []
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                errors.append(f"unknown key {key!r} in {source}{_did_you_mean(name)}")
                continue
            try:
                kwargs[name] = _coerce(known[name], value)
            except ValueError as err:
                errors.append(f"{key}: {err}")
        if errors:
            # Also the value checks of the keys that did parse: every problem at once.
            try:
                cls(**kwargs)
            except ValueError as err:
                errors += [line.strip() for line in str(err).splitlines()[1:]]
            raise ValueError("invalid training configuration:\n  " + "\n  ".join(errors))
        return cls(**kwargs)

    def inapplicable(self, given: Iterable[str]) -> list[str]:
        """Of the options ``given`` (by a user: the command line, a config
        file), those this configuration never reads, each with why: an
        option of another loss, sampler, optimizer or of chunking would
        otherwise be accepted, recorded in config.json as if used, and do
        nothing. (Studies set some for every run they sweep, e.g. ``gcbs_q``
        beside the random sampler: the rule is for what a user typed.)

        Examples
        --------
        >>> TrainConfig(loss="simclr").inapplicable(["alpha", "temperature"])
        ["alpha: applies to loss='relic' only (this run's loss is 'simclr')"]
        """
        rules = {
            "alpha": (self.loss != "relic", f"applies to loss='relic' only (this run's loss is {self.loss!r})"),
            "gamma": (self.loss != "global", f"applies to loss='global' only (this run's loss is {self.loss!r})"),
            "gamma_schedule": (self.loss != "global",
                               f"applies to loss='global' only (this run's loss is {self.loss!r})"),
            "gcbs_q": (self.sampler != "gcbs", f"applies to sampler='gcbs' only (this run's is {self.sampler!r})"),
            "refresh_every": (self.sampler not in ("gcbs", "hard"),
                              f"re-plans gcbs or hard batches only (this run's sampler is {self.sampler!r})"),
            "momentum": (self.optimizer not in ("sgd", "lars"),
                         f"applies to optimizer sgd or lars only (this run's is {self.optimizer!r})"),
            "chunk_method": (not self.chunk_size, "applies with chunk_size > 0 only (this run is not chunked)"),
            # --data-dir without --dataset trained on the digits, the folder recorded as if read.
            "data_dir": (self.dataset not in FOLDER_DATASETS,
                         f"dataset {self.dataset!r} reads no folder (give --dataset: one of "
                         f"{', '.join(FOLDER_DATASETS)} reads data_dir)"),
        }
        return [f"{name}: {why}" for name in given if name in rules for unused, why in [rules[name]] if unused]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (tuples become lists), every field resolved."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def identity(self) -> dict[str, Any]:
        """The fields that decide a run's results (all but :data:`RUNTIME_ONLY`):
        what resuming and skipping finished runs compare. Fields added since
        (:data:`LATER_FIELDS`) count only when set: a run folder, or a study's
        run, saved before them keeps its identity."""
        return {k: v for k, v in self.to_dict().items()
                if k not in RUNTIME_ONLY and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    def former_identity(self) -> dict[str, Any]:
        """:meth:`identity` as it was until 2026-12-03, with :data:`FORMERLY_IDENTITY`:
        what a study's run folders of that time were named by."""
        return {**self.identity(), **{k: getattr(self, k) for k in FORMERLY_IDENTITY}}

    def replace(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the whole run, given the batches of one epoch."""
        return self.steps if self.steps is not None else self.epochs * batches_per_epoch


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Convert a file or command-line value to the field's type, strictly."""
    if f.name == "negatives":
        return parse_negatives(value)
    if f.name in ("encoder_widths", "head_widths"):
        return None if value is None else _int_tuple(value)
    kind = _kind(f)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and _optional(f)):
        if _optional(f):
            return None
        raise ValueError(f"expected a {kind}, got None")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ValueError(f"expected an int, got {value!r}")
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"expected a float, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a float, got {value!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _kind(f: dataclasses.Field) -> str:
    text = str(f.type)
    for kind in ("bool", "int", "float"):
        if text.startswith(kind):
            return kind
    return "str"


def _optional(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def _did_you_mean(key: str) -> str:
    """`` (did you mean 'batch_size'?)`` for a key close to a training option's name, else ``""``."""
    close = difflib.get_close_matches(key.replace("-", "_"), list(TrainConfig.__dataclass_fields__), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The training options of a TOML (``.toml``), YAML (``.yaml``/``.yml``) or
    JSON (``.json``, e.g. a run's ``config.json``) file, as a dict.

    A ``[train]`` table / ``train:`` mapping is used if present, else the top
    level. A ``[study]`` table holds a study's own options (a recipe, see
    :func:`load_study_options`) and is not a training option.
    """
    data = _read_config(path)
    data.pop("study", None)
    # No option takes a table: one here is a misspelt [train] or [study] (its name read as an option's).
    tables = sorted(k for k, v in data.items() if isinstance(v, dict) and k != "train")
    if tables:
        raise ValueError(f"config file {path} has a table [{tables[0]}]; training options go under [train] (or at "
                         f"the top level), a study's under [study]")
    if isinstance(data.get("train"), dict):
        others = sorted(k for k in data if k != "train")
        if others:
            raise ValueError(
                f"config file {path} has a [train] table / train: mapping and other top-level keys {others}; "
                f"put every training option under it, or drop it and give them all at the top level"
            )
        data = data["train"]
    unknown = [str(k) for k in data if str(k).replace("-", "_") not in TrainConfig.__dataclass_fields__]
    if unknown:  # named here, with the file: once merged with the command line the source is gone
        hints = ", ".join(f"{k!r}{_did_you_mean(k)}" for k in unknown)
        raise ValueError(f"config file {path}: unknown key{'s' if len(unknown) > 1 else ''} {hints}; "
                         f"the training options are the long options of negbatch train --help")
    return data


def load_study_options(path: str | Path) -> dict[str, Any]:
    """The ``[study]`` table of a config file (a recipe): the study's ``name`` and
    its own options (``ks``, ``losses``, ``seeds``, ...), or ``{}``.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.toml"
    >>> _ = p.write_text('[study]\\nname = "negatives"\\nks = "1,all"\\n[train]\\nbatch_size = 64\\n')
    >>> load_study_options(p), load_config_file(p)
    ({'name': 'negatives', 'ks': '1,all'}, {'batch_size': 64})
    """
    study = _read_config(path).get("study", {})
    if not isinstance(study, dict):
        raise ValueError(f"config file {path}: [study] must be a table of a study's options, got {study!r}")
    return study


def _read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a folder; give the path of a .toml, .yaml or .json file")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {path} is not valid TOML: {err}") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("YAML config files need PyYAML: pip install pyyaml (or use a .toml file)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    else:
        raise ValueError(f"config file {path}: expected a .toml, .yaml, .yml or .json file")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return data


SECTIONS = {"data": "data", "model": "model", "objective": "objective", "optimisation": "optimisation and batches",
            "run": "run"}


def add_config_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Add one ``--field-name`` option per :class:`TrainConfig` field, in groups.

    Options default to ``argparse.SUPPRESS`` so that only the ones given on the
    command line override a config file. ``--data`` is accepted for ``--dataset``.
    """
    groups = {key: parser.add_argument_group(f"training options: {title} (also keys of a --config file)")
              for key, title in SECTIONS.items()}
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        names = ["--" + f.name.replace("_", "-")] + (["--data"] if f.name == "dataset" else [])
        help_text = f.metadata.get("help", "")
        if default is not None and "default" not in help_text:
            help_text += f" (default: {shown})"
        groups[f.metadata["section"]].add_argument(
            *names, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < ``base`` (e.g. a file's contents) < options given on the command line."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig.from_dict({**without_replaced_length(base or {}, given), **given})


def set_in_file(values: dict[str, Any]) -> set[str]:
    """The training options a config file sets: its keys whose value is not the option's default.
    A run's config.json records every field, those its run does not read at their defaults, and
    that file is a valid ``--config``; a key at its default changes nothing either way."""
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    out = set()
    for key, value in values.items():
        name = str(key).replace("-", "_")
        default = fields.get(name, dataclasses.MISSING)
        if isinstance(value, list) and isinstance(default, tuple):  # JSON/TOML have no tuples
            value = tuple(value)
        if value != default:
            out.add(name)
    return out


def without_replaced_length(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``base`` without its ``epochs``/``steps`` when ``given`` (the command line) sets the
    other one: a file's ``epochs = 200`` gives way to a quick ``--steps 5`` trial."""
    out = dict(base)
    for one, other in (("epochs", "steps"), ("steps", "epochs")):
        if one in given and other not in given:
            out.pop(other, None)
    return out
