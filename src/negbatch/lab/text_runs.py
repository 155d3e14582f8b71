"""Text-pair runs for the lab's studies: one dual-encoder training run from a
:class:`TextRunConfig`, and a sweep of them into a study folder.

The image trainer (:mod:`negbatch.lab.trainer`) trains on augmented views of
images; text studies train a small transformer encoder
(:class:`negbatch.models.text.TransformerTextEncoder`) on (query, document)
pairs with ``InfoNCE(form="query_document")`` and evaluate Recall@1/5/10,
MRR@10 and nDCG@10 of the test queries against the test corpus
(:func:`negbatch.evaluation.retrieval.evaluate_retrieval`).

Data (``data``):

* ``"bible"`` -- ASV -> BBE verse pairs, split by chapter
  (:func:`negbatch.data.text.bible_pairs`; ``max_pairs`` subsamples before the
  split, so the split stays leakage-free);
* ``"builtin"`` -- the 40 built-in pairs (tests, smoke runs), split by pair;
* ``"pairs:PATH"`` -- the user's JSONL/CSV file
  (:func:`negbatch.data.text.load_pairs`), split by pair id.

The split uses ``data_seed`` (not the run's ``seed``), so every seed of a study
sees the same test corpus.

Resuming: a finished run (``summary.json`` present) is skipped; an unfinished
one continues from its last ``checkpoint.pt`` (written every
``checkpoint_every`` steps: encoder, optimizer, the epoch's batch plan and
position, and every random stream), so an interrupted run ends exactly as an
uninterrupted one would. A folder holding a run of another configuration is
refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import parse_negatives
from .runs import SUMMARY, atomic_torch_save, atomic_write_text, finished_run, load_checkpoint, record_run
from .sweep import run_jobs

__all__ = [
    "TextRunConfig",
    "parse_data",
    "load_text_split",
    "text_run_key",
    "train_text_run",
    "run_text_configs",
    "TEXT_METRICS",
]

TEXT_METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"


def parse_data(value: str) -> tuple[str, str | None]:
    """``"bible"``, ``"builtin"`` or ``"pairs:PATH"`` -> (kind, path or None)."""
    if not isinstance(value, str):
        raise TypeError(f"data must be a string, got {type(value).__name__}")
    if value in ("bible", "builtin"):
        return value, None
    if value.startswith("pairs:") and value[len("pairs:"):].strip():
        return "pairs", value[len("pairs:"):].strip()
    raise ValueError(f"data must be 'bible', 'builtin' or 'pairs:PATH' (a JSONL/CSV file of query,document), got {value!r}")


@dataclass(frozen=True)
class TextRunConfig:
    """One text-pair training run (dual encoder, InfoNCE, retrieval evaluation).

    Examples
    --------
    >>> from negbatch.lab.text_runs import TextRunConfig
    >>> TextRunConfig(data="builtin", negatives="4").negatives
    4
    """

    # data
    data: str = field(default="bible", metadata={"help": "bible, builtin or pairs:PATH"})
    max_pairs: int | None = field(default=None, metadata={"help": "subsample this many pairs before the split (bible)"})
    test_fraction: float = field(default=0.1, metadata={"help": "fraction of chapters (bible) or pairs held out"})
    data_seed: int = field(default=0, metadata={"help": "seed of the subsample and the split"})
    # tokenizer and encoder
    vocab_size: int = field(default=8000, metadata={"help": "WordPiece vocabulary size"})
    max_length: int = field(default=64, metadata={"help": "tokens per text (longer texts are truncated)"})
    dim: int = field(default=64, metadata={"help": "encoder width"})
    depth: int = field(default=1, metadata={"help": "transformer layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    dropout: float = field(default=0.1, metadata={"help": "dropout"})
    # objective
    negatives: str | int = field(default="all", metadata={"help": "negatives per query: all or K"})
    temperature: float = field(default=0.05, metadata={"help": "softmax temperature"})
    symmetric: bool = field(default=True, metadata={"help": "add the document-to-query term"})
    # optimisation
    batch_size: int = field(default=64, metadata={"help": "pairs per step"})
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    chunk_size: int = field(default=0, metadata={"help": "gradient caching chunk (0: no cache)"})
    sampler: str = field(default="random", metadata={"help": "batch sampler: random, gcbs, hard, no-duplicates"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, batches, dropout and sampled negatives"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})

    def __post_init__(self) -> None:
        errors: list[str] = []

        def bad(name: str, msg: str) -> None:
            errors.append(f"{name}: {msg} (got {getattr(self, name)!r})")

        try:
            parse_data(self.data)
        except (TypeError, ValueError) as err:
            errors.append(str(err))
        for name in ("vocab_size", "max_length", "dim", "depth", "heads", "batch_size", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "expected a positive int")
        if self.max_pairs is not None and (isinstance(self.max_pairs, bool) or not isinstance(self.max_pairs, int) or self.max_pairs < 2):
            bad("max_pairs", "expected an int >= 2 or None")
        for name in ("data_seed", "seed", "chunk_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(name, "expected an int >= 0")
        if not (isinstance(self.test_fraction, (int, float)) and 0 < self.test_fraction < 1):
            bad("test_fraction", "expected a float in (0, 1)")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            bad("dropout", "expected a float in [0, 1)")
        for name in ("temperature", "lr"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                bad(name, "expected a float > 0")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            bad("weight_decay", "expected a float >= 0")
        if isinstance(self.dim, int) and isinstance(self.heads, int) and self.heads >= 1 and self.dim % self.heads:
            bad("heads", f"must divide dim={self.dim}")
        if not isinstance(self.symmetric, bool):
            bad("symmetric", "expected true or false")
        if self.sampler not in ("random", "gcbs", "hard", "no-duplicates"):
            bad("sampler", "expected random, gcbs, hard or no-duplicates")
        try:
            negatives = parse_negatives(self.negatives)
            object.__setattr__(self, "negatives", negatives)
            if negatives != "all" and isinstance(self.batch_size, int) and negatives > self.batch_size - 1:
                bad("negatives", f"exceeds the {self.batch_size - 1} in-batch candidates per query; use <= {self.batch_size - 1} or 'all'")
        except ValueError:
            bad("negatives", "expected 'all' or a positive int")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            bad("device", "expected cpu, cuda or cuda:N")
        if errors:
            raise ValueError("invalid text run configuration:\n  " + "\n  ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TextRunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown text run option(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "TextRunConfig":
        return self.from_dict({**self.to_dict(), **changes})


def text_run_key(cfg: TextRunConfig, fields_: tuple[str, ...] = ("negatives", "batch_size", "seed")) -> str:
    """Folder name of a run: the named fields, then 10 hex digits of the config's hash."""
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    prefix = "-".join(f"{f}={getattr(cfg, f)}" for f in fields_)
    return f"{prefix}-{digest}"


# -------------------------------------------------------------------------- data


@lru_cache(maxsize=4)
def load_text_split(data: str, max_pairs: int | None, test_fraction: float, data_seed: int):
    """(train, test) :class:`~negbatch.data.text.TextPairs` for a ``data`` spec (cached per process)."""
    from ..data.text import bible_pairs, builtin_pairs, load_pairs, split_by_group

    kind, path = parse_data(data)
    if kind == "bible":
        split = bible_pairs(test_fraction=test_fraction, seed=data_seed, max_pairs=max_pairs)
        train, test = split.train, split.test
    else:
        pairs = builtin_pairs() if kind == "builtin" else load_pairs(path)
        if max_pairs is not None and max_pairs < len(pairs):
            import random

            order = list(range(len(pairs)))
            random.Random(data_seed).shuffle(order)
            pairs = pairs.subset(sorted(order[:max_pairs]))
        train, test = split_by_group(pairs, lambda i: i, test_fraction=test_fraction, seed=data_seed)
    if len(test) < 2 or len(train) < 2:
        raise ValueError(f"data {data!r}: the split left {len(train)} training and {len(test)} test pairs; "
                         "use more pairs (max_pairs) or another test_fraction")
    return train, test


@lru_cache(maxsize=4)
def _tokenizer(data: str, max_pairs: int | None, test_fraction: float, data_seed: int, vocab_size: int, max_length: int):
    from ..models.text import TextTokenizer

    train, _ = load_text_split(data, max_pairs, test_fraction, data_seed)
    # Trained on the training side only; deterministic, so caching changes nothing.
    return TextTokenizer.train(train.queries + train.documents, vocab_size=vocab_size, max_length=max_length)


# ------------------------------------------------------------------------ batches


class _EpochPlans:
    """The run's batches, an epoch's plan at a time, planned when the first
    batch of the epoch is needed.

    ``random``: a permutation from the run's batch generator, cut into full
    batches (the order of :func:`negbatch.text_training.train_text_pairs` for
    the same seed). Other samplers (:mod:`negbatch.lab.text_samplers`) plan
    from embeddings of the encoder as it is at the start of the epoch, so a
    resumed run restores the saved plan instead of planning it again.
    """

    def __init__(self, cfg: TextRunConfig, encoder: nn.Module, tokenize, train, generator: torch.Generator) -> None:
        self.cfg, self.encoder, self.tokenize, self.train = cfg, encoder, tokenize, train
        self.generator = generator
        self.epoch, self.plan, self.position = -1, [], 0

    def next(self) -> Tensor:
        if self.position == len(self.plan):
            self.epoch, self.position = self.epoch + 1, 0
            self.plan = self._plan(self.epoch)
            if not self.plan:
                raise ValueError(f"sampler {self.cfg.sampler!r} planned no batch of {self.cfg.batch_size} pairs "
                                 f"out of {len(self.train)}; lower batch_size")
        batch = self.plan[self.position]
        self.position += 1
        return batch

    def _plan(self, epoch: int) -> list[Tensor]:
        if self.cfg.sampler == "random":
            from ..text_training import epoch_batches_without_replacement

            return epoch_batches_without_replacement(len(self.train), self.cfg.batch_size, self.generator)
        from .text_samplers import epoch_batches

        return list(epoch_batches(self.cfg, self.encoder, self.tokenize, self.train, epoch))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "plan": list(self.plan), "position": self.position,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.plan, self.position = state["epoch"], list(state["plan"]), state["position"]
        self.generator.set_state(state["generator"])


# ------------------------------------------------------------------------- train


def _to(features, device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in features.items()}


def train_text_run(
    cfg: TextRunConfig,
    run_dir: str | os.PathLike,
    *,
    checkpoint_every: int = 50,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """Train one text configuration in ``run_dir`` and evaluate retrieval on the test side.

    Writes ``config.json``, ``metrics.jsonl`` (step, loss, seconds),
    ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end) and
    ``summary.json`` (the test metrics of the trained encoder and, prefixed
    ``untrained_``, of the same encoder before training; data sizes; the
    first loss and ``final_loss``, the mean of the last 10 steps; wall time
    and, on CUDA, peak GPU memory), each atomically. A finished run is
    returned without training; an unfinished one resumes from its checkpoint
    and ends as an uninterrupted run would (same batches, dropout masks,
    sampled negatives and optimizer state).

    Parameters
    ----------
    cfg : TextRunConfig
    run_dir : path
    checkpoint_every : int, default 50
        Steps between checkpoints (0: only at the end).
    stop_after : int, optional
        Stop (with a checkpoint) once this many steps are done, as an
        interruption would; returns None. For tests and time-sliced runs.

    Examples
    --------
    >>> import tempfile
    >>> from negbatch.lab.text_runs import TextRunConfig, train_text_run
    >>> cfg = TextRunConfig(data="builtin", test_fraction=0.25, batch_size=8, steps=2, dim=16, heads=2, vocab_size=600)
    >>> s = train_text_run(cfg, tempfile.mkdtemp())
    >>> 0.0 <= s["recall@1"] <= 1.0
    True
    """
    from ..evaluation.retrieval import evaluate_retrieval
    from ..gradcache import GradCache
    from ..losses import InfoNCE
    from ..models.text import TransformerTextEncoder

    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0 (0: only at the end), got {checkpoint_every!r}")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    run_dir = Path(run_dir)
    finished = finished_run(run_dir, cfg.to_dict(), lambda saved: saved)
    if finished is not None:
        return finished
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available; use device='cpu'")

    train, test = load_text_split(cfg.data, cfg.max_pairs, cfg.test_fraction, cfg.data_seed)
    if cfg.batch_size > len(train):
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the {len(train)} training pairs; lower batch_size")
    tok = _tokenizer(cfg.data, cfg.max_pairs, cfg.test_fraction, cfg.data_seed, cfg.vocab_size, cfg.max_length)
    torch.manual_seed(cfg.seed)
    encoder = TransformerTextEncoder(tok.vocab_size, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                                     dropout=cfg.dropout, max_length=cfg.max_length).to(device)
    loss_fn = InfoNCE(temperature=cfg.temperature, negatives=cfg.negatives, form="query_document", symmetric=cfg.symmetric)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    cache = GradCache(encoder, loss_fn, chunk_size=cfg.chunk_size) if cfg.chunk_size else None
    batches = _EpochPlans(cfg, encoder, tok, train, torch.Generator().manual_seed(cfg.seed))
    loss_gen = torch.Generator().manual_seed(cfg.seed + 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record_run(run_dir, cfg.to_dict())  # the set-up passed its checks: the folder is this run's

    checkpoint = run_dir / CHECKPOINT
    if checkpoint.exists():  # resume: every piece of state the next step depends on
        state = load_checkpoint(checkpoint, device, ("model", "optimizer", "batches", "rng", "rows", "untrained",
                                                     "seconds"))
        encoder.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        loss_gen.set_state(state["rng"]["loss"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        rows, untrained, earlier = list(state["rows"]), dict(state["untrained"]), state["seconds"]
    else:
        before = evaluate_retrieval(encoder, tok, test, device=device)
        untrained = {k: float(before[k]) for k in TEXT_METRICS}
        # Reseed after the untrained evaluation: dropout then draws exactly as in
        # train_text_pairs with this seed (the tests compare the two loops).
        torch.manual_seed(cfg.seed)
        rows, earlier = [], 0.0

    def save_checkpoint() -> None:
        rng = {"torch": torch.get_rng_state(), "loss": loss_gen.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {"model": encoder.state_dict(), "optimizer": optimizer.state_dict(), "batches": batches.state_dict(),
                 "rng": rng, "rows": rows, "untrained": untrained, "seconds": earlier + time.perf_counter() - started,
                 "config": cfg.to_dict()}
        atomic_torch_save(checkpoint, state)
        atomic_write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    encoder.train()
    started = time.perf_counter()
    for step in range(len(rows) + 1, cfg.steps + 1):
        idx = batches.next().tolist()
        queries = _to(tok([train.queries[i] for i in idx]), device)
        documents = _to(tok([train.documents[i] for i in idx]), device)
        optimizer.zero_grad(set_to_none=True)
        # Sampled negatives (negatives=K) draw from their own generator; "all" draws nothing.
        generator = loss_gen if cfg.negatives != "all" else None
        if cache is not None:
            value = cache.step(queries, documents, generator=generator)
        else:
            value = loss_fn(encoder(queries), encoder(documents), generator=generator)
            value.backward()
        optimizer.step()
        rows.append({"step": step, "loss": float(value.detach()), "seconds": earlier + time.perf_counter() - started})
        if stop_after is not None and step >= stop_after and step < cfg.steps:
            save_checkpoint()
            return None
        if checkpoint_every and step % checkpoint_every == 0 and step < cfg.steps:
            save_checkpoint()
    save_checkpoint()
    seconds = earlier + time.perf_counter() - started

    metrics = evaluate_retrieval(encoder, tok, test, device=device)
    summary: dict[str, Any] = {"config": cfg.to_dict(), "steps": len(rows)}
    summary.update({k: metrics[k] for k in TEXT_METRICS})
    summary.update({f"untrained_{k}": untrained[k] for k in TEXT_METRICS})
    summary.update({
        "num_train_pairs": len(train), "num_test_queries": metrics["num_queries"], "num_test_documents": metrics["num_documents"],
        "first_loss": rows[0]["loss"], "final_loss": sum(r["loss"] for r in rows[-10:]) / len(rows[-10:]),
        "train_seconds": seconds, "seconds_per_step": seconds / len(rows),
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    })
    atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------------------- sweep


def _train_one(cfg_dict: dict[str, Any], run_dir: str, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    summary = train_text_run(TextRunConfig.from_dict(cfg_dict), run_dir)
    return {**summary, "run": Path(run_dir).name}


def run_text_configs(
    configs: list[TextRunConfig],
    study_dir: str | os.PathLike,
    *,
    workers: int = 1,
    key_fields: tuple[str, ...] = ("negatives", "batch_size", "seed"),
    on_done: Callable[[dict[str, Any], int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every text configuration into ``study_dir/runs/<key>/``, skipping
    finished ones, and rewrite ``results.json`` / ``results.csv`` after each
    (the text counterpart of :func:`negbatch.lab.sweep.run_configs`).

    Examples
    --------
    >>> import tempfile
    >>> from negbatch.lab.text_runs import TextRunConfig, run_text_configs
    >>> base = TextRunConfig(data="builtin", test_fraction=0.25, batch_size=8, steps=1, dim=16, heads=2, vocab_size=600)
    >>> rows = run_text_configs([base, base.replace(seed=1)], tempfile.mkdtemp())
    >>> len(rows)
    2
    """
    study_dir = Path(study_dir)
    jobs = [(c.to_dict(), str(study_dir / "runs" / text_run_key(c, key_fields))) for c in configs]
    return run_jobs(jobs, study_dir, _train_one, workers=workers, on_done=on_done)
