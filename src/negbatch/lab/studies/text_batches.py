"""How batches are composed, on text pairs: random vs GCBS vs hard vs duplicate-free
(``negbatch study batches --data bible``).

At a fixed batch size and number of steps, a dual encoder is trained with all
in-batch negatives (InfoNCE, query_document) on batches from each sampler of
:mod:`negbatch.sampling`: ``random``; ``gcbs`` (global contrastive batch
sampling, Sachidananda et al.: batches of mutually similar pairs from the
current encoder's similarity graph, replanned every epoch); ``hard`` (k-means
clusters of the query embeddings); and ``no-duplicates`` (random, but no two
pairs with the same document text share a batch; on the Bible pairs, whose
texts are all distinct, it is a second random control). Each run reports
Recall@1/5/10, MRR@10 and nDCG@10 on the test corpus.

Default size (8,000 pairs, B = 64, one epoch, 4 samplers, 3 seeds: 12 runs):
17 minutes measured on the shared 2-core CPU at load average 4-9.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..report import markdown_table, plt, save_figure
from ..folder import atomic_write_text
from ..stats import fmt_mean_std, holm, mean_std, welch_p
from ..sweep import parse_list, read_results
from ..tasks.text import TEXT_METRICS
from .base import TextStudy

__all__ = ["TextBatches", "SAMPLERS"]

SAMPLERS = ("random", "gcbs", "hard", "no-duplicates")


class TextBatches(TextStudy):
    """The batches study on text pairs: one run per (sampler, seed)."""

    name = "batches"
    summary = "random vs GCBS vs hard (vs duplicate-free) batches"
    swept = ("sampler", "seed", "epochs", "steps")
    key_fields = ("sampler", "batch_size", "seed")

    def add_study_arguments(self, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma list (default: {','.join(SAMPLERS)})")
        g.add_argument("--epochs", type=float, default=None,
                       help="passes over the training pairs (fractions allowed), turned into steps (default: a "
                            "--config file's epochs or steps, else 1)")
        g.add_argument("--steps", type=int, default=None,
                       help="optimizer steps per run, instead of --epochs (default: from the epochs)")

    def plan(self, args: argparse.Namespace) -> tuple[Path, list[TrainConfig]]:
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be a positive int, got {args.steps}")
        if args.steps is not None and args.epochs is not None:
            raise ValueError(f"give --epochs or --steps, not both (got --epochs {args.epochs} --steps {args.steps})")
        base = self.base_config(args)
        samplers = parse_list(args.samplers, str, "samplers", unique=True)
        for s in samplers:
            if s not in SAMPLERS:
                raise ValueError(f"--samplers: unknown sampler {s!r}; expected {', '.join(SAMPLERS)}")
        seeds = self.seeds(args)
        train, _ = self.load(base)
        steps, epochs = args.steps, args.epochs
        if steps is None and epochs is None:  # a --config file's length, as every study keeps it; else one epoch
            if "steps" in self._given:
                steps = base.steps
            else:
                epochs = base.epochs if "epochs" in self._given else 1.0
        if steps is None:
            if not epochs > 0:
                raise ValueError(f"--epochs must be > 0, got {epochs}")
            steps = max(1, int(epochs * (len(train) // base.batch_size)))
        base = base.replace(steps=steps, epochs=None)  # every sampler's runs take the same number of steps
        configs = [base.replace(sampler=s, seed=seed) for s in samplers for seed in seeds]
        out = self.out_folder(args, base.dataset)
        self.write_spec(out, {"base": base.to_dict(), "samplers": samplers, "seeds": seeds, "runs": len(configs)}, configs)
        return out, configs

    def line(self, summary: dict[str, Any]) -> str:
        c = summary["config"]
        return f"sampler={c['sampler']} seed={c['seed']}: R@1 {summary['recall@1']:.3f} nDCG@10 {summary['ndcg@10']:.3f}"

    def report(self, folder: Path) -> Path:
        return report(folder)


def report(folder: Path) -> Path:
    """Figure and ``report.md`` from a text batches study folder."""
    folder = Path(folder)
    spec = json.loads((folder / "study.json").read_text())
    rows = read_results(folder)
    samplers = [s for s in spec["samplers"] if any(r["sampler"] == s for r in rows)]
    by_s = {s: [r for r in rows if r["sampler"] == s] for s in samplers}
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4))
    width = 0.2
    for j, key in enumerate(("recall@1", "recall@10", "mrr@10", "ndcg@10")):
        st = [mean_std(r[key] for r in by_s[s]) for s in samplers]
        ax.bar([i + (j - 1.5) * width for i in range(len(samplers))], [s[0] for s in st], width, yerr=[s[1] for s in st],
               capsize=3, label=key)
    ax.set_xticks(range(len(samplers)), samplers)
    ax.set(ylabel="test retrieval metric", title=f"{spec['base']['dataset']}: batch composition (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig_name = save_figure(fig, folder / "retrieval_by_sampler.png")

    b = spec["base"]
    sample = rows[0] if rows else {}
    table = [[s, len(by_s[s])] + [fmt_mean_std(r[m] for r in by_s[s]) for m in TEXT_METRICS]
             + [fmt_mean_std((r["final_loss"] for r in by_s[s]), 3), f"{mean_std(r['train_seconds'] for r in by_s[s])[0]:.0f}"]
             for s in samplers]
    findings, family = [], 0
    if "random" in by_s:
        ref = [r["ndcg@10"] for r in by_s["random"]]
        others = [s for s in samplers if s != "random"]
        values = {s: [r["ndcg@10"] for r in by_s[s]] for s in others}
        raw = [welch_p(values[s], ref) for s in others]
        # One family of tests against one reference: verdicts on Holm's adjusted p.
        family = sum(p is not None for p in raw)  # Holm's m: the defined tests
        for s, p, adjusted in zip(others, raw, holm(raw)):
            diff = mean_std(values[s])[0] - mean_std(ref)[0]
            if p is None:
                findings.append(f"**{s}** vs random: nDCG@10 {diff:+.3f}, within seed noise (too few seeds for a test).")
                continue
            sure = "beyond seed noise" if adjusted < 0.05 else "within seed noise"
            over = f", Holm-adjusted over {family} = {adjusted:.2g}" if family > 1 else ""
            findings.append(f"**{s}** vs random: nDCG@10 {diff:+.3f}, {sure} (Welch p = {p:.2g}{over}).")
    text = [
        "# Study: batch composition on text pairs\n\n",
        TextStudy.describe(b, sample) + f" {TextStudy.objective(b)}, batch size {b['batch_size']}, "
        f"{b['steps']} steps of {TextStudy.optimizer(b)} lr {b['lr']}. "
        f"Seeds {spec['seeds']}; mean ± sample std over seeds. The model-dependent samplers (gcbs, hard) plan each epoch from "
        f"the encoder as it is at the epoch's start ({TextStudy.before_training(b)} for the first epoch).\n\n",
        markdown_table(["sampler", "seeds", *TEXT_METRICS, "final loss", "train s"], table),
        "\nThe final loss is not comparable across samplers: harder batches have a higher loss by construction.\n",
        "\n## What the data show\n\n" + "\n".join(f"- {f}" for f in findings) + "\n"
        + (f"\n{len(findings)} comparisons with random: \"beyond seed noise\" means Holm's adjusted p over the "
           f"{family} tests is below 0.05.\n" if len(findings) > 1 and family > 1 else ""),
        f"\n![retrieval by sampler]({fig_name})\n\nResults per run: `results.csv` / `results.json`.\n",
    ]
    out = folder / "report.md"
    atomic_write_text(out, "".join(text))
    return out
