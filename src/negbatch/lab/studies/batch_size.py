"""Study: how large must a batch be? Every answer negbatch implements, against
the batch size (``negbatch study batch-size``).

For each method and each batch size B (default 32, 64, ..., 1024), the same
model is trained for the same number of epochs (so a smaller batch takes more,
smaller steps), with several seeds, and evaluated downstream: the linear-probe
accuracy on images, nDCG@10 of the test queries on text pairs. The methods:

* ``infonce`` -- InfoNCE with every in-batch negative (SimCLR; MNRL on text):
  the reference every other method is compared with;
* ``infonce-k`` -- K sampled negatives per anchor at every B (Mitrovic et al.
  2020: the number of negatives decoupled from the batch);
* ``queue`` -- InfoNCE plus a FIFO queue of the last embeddings as negatives
  (MoCo's queue, He et al. 2020, without the momentum encoder); by default as
  many entries as the largest batch adds per step, so every B sees about the
  largest batch's number of negatives;
* ``moco`` -- MoCo (He et al. 2020): the same queue, filled by a momentum
  encoder that encodes the keys (second views, documents; queries against
  keys in one direction). Its momentum is ``--moco-momentum`` at
  B = 256, scaled as ``m ** (B / 256)`` so that the keys average over the
  same number of samples at every B;
* ``global`` -- GlobalInfoNCE (SogCLR, Yuan et al. 2022; Chen et al. 2022):
  per-sample running normalisers correct the small-batch gradient bias;
* ``siglip`` -- SigLIP's sigmoid pairs (Zhai et al. 2023): no softmax
  normaliser over the batch, scale and bias learned;
* ``dcl`` -- decoupled contrastive loss (Yeh et al. 2022): the positive out of
  the denominator;
* ``gradcache`` -- InfoNCE at the largest batch, encoded in chunks of B rows
  (GradCache, Gao et al. 2021): B is then the memory budget, not the batch.
  With BatchNorm each chunk is normalised by its own statistics (``--norm
  none`` makes the cached step exactly the large batch's).

The learning rate is scaled with the batch (``--lr-scaling``, default
``sqrt``: ``lr * sqrt(B / 256)``, the usual rule for Adam); the report gives
each method's accuracy and wall time against B, with error bars over seeds,
the drop from the largest to the smallest batch and a Welch test of each
method's drop against InfoNCE's, and the slope against log2 B.

Defaults, images: Fashion-MNIST (all 60,000 training images, all 10,000 test
images, the probes fitted on every training image), the MLP encoder, 2 epochs. Text:
the Bible pairs (4,000 pairs), the small transformer, 2 epochs. Two, not one:
in a single epoch every sample is visited once, and GlobalInfoNCE's per-sample
state is never reused (its gradient is then DCL's). 8 methods x 6
batch sizes x 3 seeds = 144 runs each; the runs go in parallel over the
machine's cores (``--workers``, default all), each with one thread. See
docs/batch_size.md for the measured report and the GPU recipe.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, ClassVar

from ..config import TrainConfig
from ..report import markdown_table, plt, save_figure, training_length
from ..folder import SUMMARY, atomic_write_text
from ..stats import Welch, fmt_mean_std, holm, mean_std, welch
from ..sweep import former_run_key, parse_list, read_results, run_key
from .base import ImageStudy, Study, TextStudy, say

__all__ = ["ImageBatchSize", "TextBatchSize", "METHODS", "method_of", "method_config"]

METHODS: dict[str, str] = {
    "infonce": "InfoNCE, every in-batch negative",
    "infonce-k": "InfoNCE, K sampled negatives",
    "queue": "InfoNCE + a queue of past embeddings",
    "moco": "MoCo: a queue of a momentum encoder's keys",
    "global": "GlobalInfoNCE (bias-corrected)",
    "siglip": "SigLIP (sigmoid pairs)",
    "dcl": "DCL (decoupled)",
    "gradcache": "InfoNCE at the largest batch, cached in chunks of B",
}
DEFAULT_BATCH_SIZES = "32,64,128,256,512,1024"
LR_REFERENCE_BATCH = 256
#: moco's momentum at B = LR_REFERENCE_BATCH. MoCo's 0.999 averages over
#: the last ~1000 steps of 256, more than this study's runs take: 0.9 (the
#: last ~10 steps, 2,560 samples) lets the keys follow a model trained from
#: scratch over two short epochs.
DEFAULT_MOCO_MOMENTUM = 0.9
#: infonce-k's negatives per anchor, the same at every batch size (below the 62 of a batch of 32 images).
DEFAULT_K = 16


def softmax_loss(modality: str) -> str:
    """The name of plain InfoNCE in the lab's task of ``modality``."""
    return "simclr" if modality == "image" else "infonce"


def moco_momentum(momentum: float, batch: int) -> float:
    """The momentum at batch size ``batch`` that averages the keys over as
    many samples as ``momentum`` does at B = 256: ``momentum ** (batch / 256)``."""
    return momentum ** (batch / LR_REFERENCE_BATCH)


def method_config(base: TrainConfig, method: str, batch: int, *, largest: int, k: int, queue_size: int,
                  lr_scaling: str, momentum: float = DEFAULT_MOCO_MOMENTUM) -> TrainConfig:
    """The configuration of ``method`` at batch size (or, for gradcache, memory
    budget) ``batch``; ``momentum`` is moco's at B = 256."""
    softmax = softmax_loss(base.task)
    trained_batch = largest if method == "gradcache" else batch
    lr = base.lr * {"none": 1.0, "sqrt": math.sqrt(trained_batch / LR_REFERENCE_BATCH),
                    "linear": trained_batch / LR_REFERENCE_BATCH}[lr_scaling]
    cfg = base.replace(loss=softmax, negatives="all", queue_size=0, key_momentum=0.0, chunk_size=None,
                       batch_size=trained_batch, lr=lr)
    if method == "infonce-k":
        return cfg.replace(negatives=k)
    if method == "queue":
        return cfg.replace(queue_size=queue_size)
    if method == "moco":
        one_direction = {"symmetric": False} if cfg.task == "text" else {}  # MoCo's loss: queries against keys
        return cfg.replace(queue_size=queue_size, key_momentum=moco_momentum(momentum, batch), **one_direction)
    if method in ("global", "siglip", "dcl"):
        return cfg.replace(loss=method)
    if method == "gradcache":
        return cfg.replace(chunk_size=batch)
    return cfg


def _workers_words(workers: int | list[int]) -> str:
    """'2 runs' or, for a study trained in parts with different counts, '1 or 2 runs'."""
    counts = workers if isinstance(workers, list) else [workers]
    return " or ".join(map(str, counts)) + (" run" if counts == [1] else " runs")


def method_of(row: dict[str, Any]) -> tuple[str, int]:
    """(method, B) of a results row: read back from its configuration."""
    if row.get("chunk_size"):
        return "gradcache", int(row["chunk_size"])
    b = int(row["batch_size"])
    if row.get("key_momentum"):
        return "moco", b
    if row.get("queue_size"):
        return "queue", b
    if row["loss"] in ("global", "siglip", "dcl"):
        return row["loss"], b
    if str(row["negatives"]) != "all":
        return "infonce-k", b
    return "infonce", b


class BatchSizeStudy(Study):
    """What the image and text versions share: the plan and the report."""

    name = "batch-size"
    summary = "accuracy against batch size for every method (InfoNCE all/K, queue, global, SigLIP, DCL, GradCache)"
    # The learning rate is not swept: --lr is the base rate at B=LR_REFERENCE_BATCH, scaled per batch size.
    # dcl_sigma and siglip_bias belong to one method each (their defaults): not offered, since the
    # base configuration (loss simclr) refuses them.
    swept = ("loss", "negatives", "batch_size", "chunk_size", "queue_size", "key_momentum", "seed", "dcl_sigma",
             "siglip_bias")
    key_fields = ("loss", "negatives", "queue_size", "batch_size", "chunk_size", "seed")
    metric: ClassVar[tuple[str, str]] = ("linear_acc", "linear-probe accuracy")
    parallel_by_default = True
    unread_hints = {"alpha": "no method of this study trains ReLIC", "gamma": "--methods has no global",
                    "gamma_schedule": "--methods has no global"}
    fixed_options = {"chunk_method": (("cache",), "gradcache is InfoNCE of the whole batch computed in chunks; "
                                                  "accumulation (a loss per chunk, fewer negatives) is another method")}

    def add_study_arguments(self, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)} (default: all)")
        g.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES,
                       help=f"comma list of batch sizes, the memory budget of gradcache (default: {DEFAULT_BATCH_SIZES})")
        g.add_argument("--k", type=int, default=None,
                       help=f"infonce-k: negatives per anchor at every batch size (default: {DEFAULT_K})")
        g.add_argument("--queue-size", type=int, default=None,
                       help="queue: entries (default: what the largest batch adds per step)")
        g.add_argument("--moco-momentum", type=float, default=None,
                       help=f"moco: the momentum encoder's momentum at B={LR_REFERENCE_BATCH}, scaled as "
                            f"m ** (B / {LR_REFERENCE_BATCH}) (default: {DEFAULT_MOCO_MOMENTUM})")
        g.add_argument("--lr-scaling", default="sqrt", choices=("sqrt", "linear", "none"),
                       help=f"learning rate times sqrt(B/{LR_REFERENCE_BATCH}), B/{LR_REFERENCE_BATCH} or 1 "
                            f"(default: sqrt)")

    def candidates(self, batch: int) -> int:
        """Negatives per anchor in a batch of ``batch`` (what K may not exceed)."""
        raise NotImplementedError

    def entries_per_step(self, batch: int) -> int:
        """Queue entries a batch adds to each direction's queue."""
        raise NotImplementedError

    def check_data(self, base: TrainConfig) -> int:
        """Load the data (errors before any folder is made); the training set's size."""
        raise NotImplementedError

    def plan(self, args: argparse.Namespace) -> tuple[Path, list[TrainConfig]]:
        methods = parse_list(args.methods, str, "methods", unique=True)
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown {', '.join(unknown)}; expected a comma list of {', '.join(METHODS)}")
        sizes = sorted(parse_list(args.batch_sizes, int, "batch-sizes", unique=True))
        if sizes[0] < 2:
            raise ValueError(f"--batch-sizes must be ints >= 2, got {args.batch_sizes}")
        if len(sizes) < 2:
            raise ValueError(f"--batch-sizes: the study compares batch sizes; give two or more, got {args.batch_sizes}")
        # A method's option without the method trains nothing: said, not refused (a recipe sets them for
        # every method, and a command line may run a few of its methods).
        for option, value, users in (("k", args.k, ("infonce-k",)), ("queue-size", args.queue_size, ("queue", "moco")),
                                     ("moco-momentum", args.moco_momentum, ("moco",))):
            if value is not None and not set(users) & set(methods):
                say(f"--{option} {value}: not used, it applies to --methods {' or '.join(users)}, which this study "
                    f"does not run")
        if args.queue_size is not None and (isinstance(args.queue_size, bool) or args.queue_size < 1):
            raise ValueError(f"--queue-size must be a positive int, got {args.queue_size}")
        k = DEFAULT_K if args.k is None else args.k
        momentum = DEFAULT_MOCO_MOMENTUM if args.moco_momentum is None else args.moco_momentum
        if not (isinstance(momentum, float) and 0 < momentum < 1):
            raise ValueError(f"--moco-momentum must be a float in (0, 1), got {momentum}")
        seeds = self.seeds(args)
        base = self.base_config(args)
        if base.steps is not None:
            raise ValueError(f"--steps {base.steps}: the batch-size study compares batch sizes at equal epochs (a "
                             f"batch of B takes N/B steps); give --epochs instead")
        n_train = self.check_data(base)
        if sizes[-1] > n_train:
            raise ValueError(f"--batch-sizes: {sizes[-1]} exceeds the {n_train} training samples; lower it")
        if "infonce-k" in methods and not 1 <= k <= self.candidates(sizes[0]):
            raise ValueError(f"--k {k}: expected 1 <= K <= {self.candidates(sizes[0])}, the negatives of the "
                             f"smallest batch ({sizes[0]})")
        queue_size = args.queue_size if args.queue_size is not None else self.entries_per_step(sizes[-1])
        options = dict(largest=sizes[-1], k=k, queue_size=queue_size, lr_scaling=args.lr_scaling, momentum=momentum)
        # Seed-major: an interrupted study has every (method, B) cell at the same number of seeds.
        configs = [method_config(base.replace(seed=seed), m, b, **options) for seed in seeds for b in sizes
                   for m in methods]
        out = self.out_folder(args, base.dataset)
        self.write_spec(out, {"methods": methods, "batch_sizes": sizes, "seeds": seeds, "k": k,
                              "queue_size": queue_size, "moco_momentum": momentum,
                              "lr_scaling": args.lr_scaling, "base": base.to_dict(),
                              "n_train": n_train, "workers": self._workers_of(out, configs, args.workers),
                              "metric": list(self.metric)}, configs)
        return out, configs

    def _workers_of(self, out: Path, configs: list[TrainConfig], workers: int) -> list[int]:
        """The numbers of runs trained at a time so far (what the times were measured under):
        this invocation's only if it trains something."""
        earlier = []
        if (out / "study.json").exists():
            saved = json.loads((out / "study.json").read_text()).get("workers", [])
            earlier = saved if isinstance(saved, list) else [saved]
        # Read before write_spec renames run folders named before 2026-12-03 (former_run_key): either name.
        finished = all(any((out / "runs" / key(c, self.key_fields) / SUMMARY).exists()
                           for key in (run_key, former_run_key)) for c in configs)
        return sorted(set(earlier) | ({workers} if not finished or not earlier else set()))

    def line(self, summary: dict[str, Any]) -> str:
        method, b = method_of({**summary["config"]})
        key, _ = self.metric
        return (f"{method} B={b} seed={summary['config']['seed']}: {key} {summary[key]:.4f}, "
                f"{summary['train_seconds']:.0f} s")

    def report(self, folder: Path) -> Path:
        return report(folder)


class ImageBatchSize(BatchSizeStudy, ImageStudy):
    """The batch-size study on images (linear-probe accuracy)."""

    modality = "image"
    # Every test image, and the probes fitted on every training image: what the measured report
    # in docs/batch_size.md used. (Until 2026-12-02 the defaults named 5,000 test images and
    # 10,000 for the probes, but applied them only when --dataset was typed: the plain command,
    # which measured the report, used all of them.)
    defaults = {"dataset": "fashion-mnist", "epochs": 2, "lr": 0.002, "snr": False, "log_every": 50}

    def candidates(self, batch: int) -> int:
        return 2 * batch - 2

    def entries_per_step(self, batch: int) -> int:
        return 2 * batch  # both views of every sample

    def check_data(self, base: TrainConfig) -> int:
        from ..tasks.image import load_image_data

        data = load_image_data(base).subset(base.n_train, base.n_test)
        return int(data.x_train.shape[0])


class TextBatchSize(BatchSizeStudy, TextStudy):
    """The batch-size study on text pairs (nDCG@10)."""

    modality = "text"
    defaults = {"epochs": 2, "lr": 1e-3, "log_every": 10}
    metric = ("ndcg@10", "nDCG@10")

    def study_defaults(self, dataset: str) -> dict[str, Any]:
        values = super().study_defaults(dataset)
        values.pop("steps", None)
        if dataset == "bible":
            values["max_pairs"] = 4000
        return values

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.epilog = (parser.epilog or "").replace("--max-pairs 8000", "--max-pairs 4000")

    def candidates(self, batch: int) -> int:
        return batch - 1

    def entries_per_step(self, batch: int) -> int:
        return batch  # one document (and, symmetric, one query) per pair

    def check_data(self, base: TrainConfig) -> int:
        train, _ = self.load(base.replace(batch_size=2))  # the smallest batch: only the split is wanted
        return len(train)


# --------------------------------------------------------------------------- report


def _cells(rows: list[dict[str, Any]], key: str) -> dict[str, dict[int, dict[int, dict[str, Any]]]]:
    """method -> B -> seed -> row."""
    cells: dict[str, dict[int, dict[int, dict[str, Any]]]] = {}
    for r in rows:
        if r.get(key) is None:
            continue
        method, b = method_of(r)
        cells.setdefault(method, {}).setdefault(b, {})[int(r["seed"])] = r
    return cells


def _method_settings(spec: dict[str, Any], large: int) -> str:
    """The settings of the methods this study ran (none for those it did not)."""
    methods = spec["methods"]
    parts = []
    if "infonce-k" in methods:
        parts.append(f"K = {spec['k']} for infonce-k")
    if "queue" in methods or "moco" in methods:
        parts.append(f"a queue of {spec['queue_size']} entries{_moco_words(spec)}")
    if "gradcache" in methods:
        parts.append(f"gradcache trains B = {large} in chunks of the column's B")
    return "; " + ", ".join(parts) if parts else ""


def _against_infonce(w: Welch | None, adjusted: float | None, family: int) -> str:
    """One method's change against InfoNCE's, judged by Holm's adjusted p."""
    if w is None:
        return "no test of its change against InfoNCE's (fewer than 2 seeds, or no spread in either)"
    verdict = ("fares better than InfoNCE" if w.difference > 0 else
               "fares worse than InfoNCE" if w.difference < 0 else "fares as InfoNCE")
    sure = "beyond seed noise" if adjusted < 0.05 else "within seed noise"
    return (f"as the batch shrinks it {verdict} ({sure}: difference of changes {w.difference:+.3f}, "
            f"95% CI [{w.low:+.3f}, {w.high:+.3f}], Welch p = {w.p:.2g}, Holm-adjusted over {family} = {adjusted:.2g})")


def _changes(cells: dict[int, dict[int, dict]], key: str, small: int, large: int) -> list[float]:
    """Per seed: the metric at the smallest batch minus at the largest (what shrinking the batch does)."""
    if small not in cells or large not in cells:
        return []
    return [cells[small][s][key] - cells[large][s][key] for s in sorted(set(cells[small]) & set(cells[large]))]


def _identical(cells: dict[str, dict[int, dict[int, dict]]], a: str, b: str, key: str) -> bool:
    """Whether methods ``a`` and ``b`` scored the same in every run both have."""
    pairs = [(cells[a][bb][s][key], cells[b][bb][s][key]) for bb in cells.get(a, {}) for s in cells[a][bb]
             if s in cells.get(b, {}).get(bb, {})]
    return bool(pairs) and all(x == y for x, y in pairs)


def _reading(cells, key: str, reference: list[float], base: dict, large: int, small: int) -> str:
    """How to read the numbers: what InfoNCE did, what equal epochs imply, the GPU recipe."""
    parts = ["How to read this. At equal epochs a batch of B takes N/B steps, so a smaller batch takes more, "
             "smaller steps and meets fewer negatives at each."]
    if len(reference) >= 2:
        from scipy import stats

        c = mean_std(reference)[0]
        p = float(stats.ttest_1samp(reference, 0.0).pvalue) if len(set(reference)) > 1 else None
        if p is None:  # the same change in every seed (a coarse test set): no spread to test it against
            parts.append(f"Here InfoNCE's change from B = {large} to B = {small} is {c:+.3f} in every seed: "
                         "with no spread across seeds there is no test of it (a larger test set or more seeds "
                         "would give one)." if c != 0 else
                         f"Here InfoNCE scored the same at B = {large} and B = {small} in every seed.")
        elif p < 0.05:
            parts.append(f"Here InfoNCE itself {'gained' if c > 0 else 'lost'} {abs(c):.3f} from B = {large} to "
                         f"B = {small} (one-sample t-test over seeds, p = {p:.2g}): "
                         + ("the extra steps outweighed the lost negatives, the opposite of the large-batch "
                            "papers' finding, which holds at many epochs." if c > 0 else
                            "the lost negatives outweighed the extra steps, as the large-batch papers report."))
        else:
            parts.append("Here InfoNCE's change from the largest to the smallest batch is within seed noise.")
    if base.get("epochs") == 1 and _identical(cells, "global", "dcl", key):
        parts.append("With one epoch every sample is visited once, so GlobalInfoNCE never reuses its per-sample "
                     "state: its gradient is then DCL's (both leave the positive out of the denominator), and the "
                     "two scored the same in every run here. Its bias correction needs several epochs (--epochs 2 or "
                     "more).")
    parts.append("To see the effect the papers report (SimCLR loses several points of ImageNet accuracy from "
                 "B = 4096 to 256 at 100 epochs), train longer with a ResNet on CIFAR-100 or ImageNet-100: "
                 "`recipes/batchsize_cifar100.toml` is this study's GPU setting, with its estimated time.")
    return " ".join(parts)


def _slope(cells: dict[int, dict[int, dict]], key: str) -> tuple[float, float] | None:
    """Least-squares slope of the metric against log2 B over every run, and its two-sided p-value."""
    from scipy import stats

    xs = [math.log2(b) for b in cells for _ in cells[b]]
    ys = [r[key] for b in cells for r in cells[b].values()]
    if len(set(xs)) < 2 or len(xs) < 3:
        return None
    fit = stats.linregress(xs, ys)
    return float(fit.slope), float(fit.pvalue)


def _moco_words(spec: dict[str, Any]) -> str:
    """How moco's momentum was set (studies of earlier versions have no moco)."""
    if "moco" not in spec["methods"]:
        return ""
    m = spec.get("moco_momentum", DEFAULT_MOCO_MOMENTUM)
    return (f" (moco: filled by a momentum encoder of momentum {m} at B = {LR_REFERENCE_BATCH}, "
            f"{moco_momentum(m, spec['batch_sizes'][0]):.4g} at B = {spec['batch_sizes'][0]}, "
            f"{moco_momentum(m, spec['batch_sizes'][-1]):.4g} at B = {spec['batch_sizes'][-1]})")


def _seconds(value: float) -> str:
    """Two significant digits below 10 s (a tiny study's runs take milliseconds), whole seconds above."""
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def report(folder: Path) -> Path:
    """Figures and ``report.md`` from a batch-size study folder alone (also a partial one)."""
    folder = Path(folder)
    spec = json.loads((folder / "study.json").read_text())
    key, label = spec["metric"]
    rows = [r for r in read_results(folder) if int(r["seed"]) in spec["seeds"]]
    cells = _cells(rows, key)
    methods = [m for m in spec["methods"] if m in cells]
    sizes = spec["batch_sizes"]
    small, large = sizes[0], sizes[-1]
    pyplot = plt()

    fig, axes = pyplot.subplots(1, 2, figsize=(13, 4.4), layout="constrained")
    for j, m in enumerate(methods):
        bs = [b for b in sizes if b in cells[m]]
        for ax, metric in ((axes[0], key), (axes[1], "train_seconds")):
            st = [mean_std(r[metric] for r in cells[m][b].values()) for b in bs]
            ax.errorbar([b * (1 + 0.02 * (j - len(methods) / 2)) for b in bs], [s[0] for s in st],
                        yerr=[s[1] for s in st], marker="o", capsize=3, label=m)
    xlabel = f"batch size B (gradcache: chunk size, batch {large})" if "gradcache" in methods else "batch size B"
    axes[0].set(xscale="log", xlabel=xlabel, ylabel=label,
                title=f"{label} against the batch size (mean ± std over seeds)")
    axes[1].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="training seconds",
                title=f"wall time of training ({_workers_words(spec.get('workers', 1))} in parallel)")
    from matplotlib.ticker import FormatStrFormatter

    for ax in axes:
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xticks([], minor=True)  # the log axis's own minor labels ("3x10^1") beside these
        ax.legend(fontsize=8)
    # Seconds as numbers, not powers of ten.
    axes[1].yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes[1].yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    figure = save_figure(fig, folder / "batch_size.png")

    table = [[m] + [fmt_mean_std((r[key] for r in cells[m][b].values()), 3) if b in cells[m] else "-" for b in sizes]
             for m in methods]
    times = [[m] + [_seconds(mean_std(r["train_seconds"] for r in cells[m][b].values())[0]) if b in cells[m] else "-"
                    for b in sizes] for m in methods]
    reference = _changes(cells.get("infonce", {}), key, small, large)
    changes = {m: _changes(cells[m], key, small, large) for m in methods}
    changes = {m: c for m, c in changes.items() if c}
    # Every method's change against InfoNCE's: one family of tests, whose
    # verdicts take Holm's adjusted p (several methods, one shared reference).
    tests = {m: welch(c, reference) for m, c in changes.items() if m != "infonce" and reference}
    adjusted = dict(zip(tests, holm([None if w is None else w.p for w in tests.values()])))
    family = sum(w is not None for w in tests.values())  # Holm's m: the defined tests
    findings, ranking = [], []
    for m, m_changes in changes.items():
        slope = _slope(cells[m], key)
        c, sd, n = mean_std(m_changes)
        ranking.append((-c, m))
        spread = f"± {sd:.3f} (n={n} seeds)" if n > 1 else "(1 seed)"  # one seed has no spread, not a spread of 0
        parts = [f"from B={large} to B={small} it changes by {c:+.3f} {spread}"]
        if slope is not None:
            parts.append(f"slope {slope[0]:+.4f} per doubling of B (p = {slope[1]:.2g})")
        if m in tests:
            parts.append(_against_infonce(tests[m], adjusted[m], family))
        findings.append(f"**{m}** ({METHODS[m]}): " + "; ".join(parts) + ".")
    ranking.sort()
    b = spec["base"]
    missing = sum(1 for m in spec["methods"] for bb in sizes for s in spec["seeds"]
                  if s not in cells.get(m, {}).get(bb, {}))
    workers = _workers_words(spec.get("workers", 1))
    text = [
        "# Study: how large must a batch be?\n\n",
        f"Data `{b['dataset']}` ({spec['n_train']} training samples), {training_length(b)} at every batch size, "
        f"learning rate {b['lr']} x {spec['lr_scaling']} scaling from B = {LR_REFERENCE_BATCH}, temperature "
        f"{b['temperature']}, optimizer {b['optimizer']}{_method_settings(spec, large)}. Seeds "
        f"{spec['seeds']}; mean ± sample std over seeds; {workers} trained at a "
        "time, one thread each (times are comparable within this study only).\n",
        f"\n**{missing} of {len(spec['methods']) * len(sizes) * len(spec['seeds'])} runs missing** (an interrupted "
        "study: rerun the same command to finish it).\n" if missing else "",
        f"\n## {label}\n\n", markdown_table(["method"] + [f"B={s}" for s in sizes], table),
        "\n## Training seconds (mean over seeds)\n\n", markdown_table(["method"] + [f"B={s}" for s in sizes], times),
        "\n## Which methods lose least when the batch shrinks\n\n",
        "\n".join(f"- {f}" for f in findings) + "\n",
    ]
    if ranking:
        text.append(f"\nOrdered by the mean change from B = {large} to B = {small} (best first): "
                    + ", ".join(f"{m} ({-c:+.3f})" for c, m in ranking)
                    + (f". Each comparison with InfoNCE is Welch's test of the two changes; \"beyond seed noise\" "
                       f"means Holm's adjusted p over the {family} comparisons is below 0.05 (the raw p alone would "
                       "find some difference by chance in most reports of this many methods; the 95% intervals are "
                       "each comparison's own, not adjusted, so one may exclude 0 where the verdict is within "
                       "noise).\n" if family else
                       "; no method's change was tested against InfoNCE's (that takes two seeds of both, or an "
                       "InfoNCE to compare with).\n"))
    text.append("\n" + _reading(cells, key, reference, b, large, small) + "\n")
    text.append(f"\n![{label} and time against the batch size]({figure})\n\nResults per run: `results.csv` / "
                "`results.json`; per-step metrics (the learned temperature, SigLIP's bias) in `runs/*/metrics.jsonl`.\n")
    out = folder / "report.md"
    atomic_write_text(out, "".join(text))
    return out
