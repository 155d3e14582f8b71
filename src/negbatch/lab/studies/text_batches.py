"""How batches are composed, on text pairs: random vs GCBS vs hard vs duplicate-free.

At a fixed batch size and number of steps, a dual encoder is trained with all
in-batch negatives (InfoNCE, query_document) on batches from each sampler of
:mod:`negbatch.sampling` (see :mod:`negbatch.lab.text_samplers`): ``random``;
``gcbs`` (global contrastive batch sampling, Sachidananda et al.: batches of
mutually similar pairs from the current encoder's similarity graph, replanned
every epoch); ``hard`` (k-means clusters of the query embeddings); and
``no-duplicates`` (random, but no two pairs with the same document text share a
batch; on the Bible pairs, whose texts are all distinct, it is a second random
control). Each run reports Recall@1/5/10, MRR@10 and nDCG@10 on the test corpus.

Invoked as ``negbatch study text-batches --data bible`` (the ``batches`` study
can dispatch its ``--data`` runs to :func:`run`). Default size (8,000 pairs,
B = 64, one epoch, 4 samplers, 3 seeds: 12 runs): 17 minutes measured on the
shared 2-core CPU at load average 4-9.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..sweep import atomic_write_text, read_results
from ..text_runs import TEXT_METRICS, load_text_split, run_text_configs
from .text_negatives import _list, add_text_arguments, base_text_config, welch_p

__all__ = ["add_arguments", "run", "report", "DEFAULT_SAMPLERS"]

DEFAULT_SAMPLERS = "random,gcbs,hard,no-duplicates"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("study options")
    g.add_argument("--out", default=None, help="study folder (default: negbatch-runs/text-batches-DATA)")
    g.add_argument("--samplers", default=DEFAULT_SAMPLERS, help=f"comma list (default: {DEFAULT_SAMPLERS})")
    g.add_argument("--batch-size", type=int, default=64, help="pairs per batch (default 64)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the training pairs, sets the steps unless --steps is given (default 1)")
    g.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default: 0,1,2)")
    g.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature (default 0.05)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    g.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    add_text_arguments(parser)
    parser.set_defaults(data="bible")


def run(args: argparse.Namespace) -> Path:
    base = base_text_config(args).replace(temperature=args.temperature, lr=args.lr, device=args.device)
    samplers = _list(args.samplers, str, "samplers")
    for s in samplers:
        if s not in ("random", "gcbs", "hard", "no-duplicates"):
            raise ValueError(f"--samplers: unknown sampler {s!r}; expected random, gcbs, hard or no-duplicates")
    seeds = _list(args.seeds, int, "seeds")
    train, _ = load_text_split(base.data, base.max_pairs, base.test_fraction, base.data_seed)
    if args.steps is None:
        if not args.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {args.epochs}")
        base = base.replace(steps=max(1, int(args.epochs * (len(train) // base.batch_size))))
    configs = [base.replace(sampler=s, seed=seed) for s in samplers for seed in seeds]
    name = base.data if not base.data.startswith("pairs:") else "pairs"
    out = Path(args.out or f"negbatch-runs/text-batches-{name}")
    out.mkdir(parents=True, exist_ok=True)
    spec = {"study": "text-batches", "data": base.data, "base": base.to_dict(), "samplers": samplers, "seeds": seeds,
            "runs": len(configs)}
    atomic_write_text(out / "study.json", json.dumps(spec, indent=1))
    print(f"text-batches study ({base.data}): {len(configs)} runs into {out}", file=sys.stderr, flush=True)

    def progress(summary: dict[str, Any], done: int, total: int) -> None:
        c = summary["config"]
        print(f"[{done}/{total}] sampler={c['sampler']} seed={c['seed']}: R@1 {summary['recall@1']:.3f} "
              f"nDCG@10 {summary['ndcg@10']:.3f}", file=sys.stderr, flush=True)

    run_text_configs(configs, out, workers=args.workers, key_fields=("sampler", "batch_size", "seed"), on_done=progress)
    report(out)
    return out


def report(folder: Path) -> Path:
    """Figure and ``report.md`` from a text-batches study folder."""
    from ..report import fmt_mean_std, markdown_table, mean_std, plt, save_figure

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
    ax.set(ylabel="test retrieval metric", title=f"{spec['data']}: batch composition (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig_name = save_figure(fig, folder / "retrieval_by_sampler.png")

    b = spec["base"]
    sample = rows[0] if rows else {}
    table = [[s, len(by_s[s])] + [fmt_mean_std(r[m] for r in by_s[s]) for m in TEXT_METRICS]
             + [fmt_mean_std((r["final_loss"] for r in by_s[s]), 3), f"{mean_std(r['train_seconds'] for r in by_s[s])[0]:.0f}"]
             for s in samplers]
    findings = []
    if "random" in by_s:
        ref = [r["ndcg@10"] for r in by_s["random"]]
        for s in samplers:
            if s == "random":
                continue
            vals = [r["ndcg@10"] for r in by_s[s]]
            diff = mean_std(vals)[0] - mean_std(ref)[0]
            p = welch_p(vals, ref)
            sure = p is not None and p < 0.05
            findings.append(f"**{s}** vs random: nDCG@10 {diff:+.3f}, " + (f"beyond seed noise (Welch p = {p:.2g})." if sure
                            else "within seed noise" + (f" (Welch p = {p:.2f})." if p is not None else " (too few seeds for a test).")))
    text = [
        "# Study: batch composition on text pairs\n\n",
        f"Data `{spec['data']}`: {sample.get('num_train_pairs')} training pairs; {sample.get('num_test_queries')} test queries "
        f"against {sample.get('num_test_documents')} test documents (max_pairs {b['max_pairs']}). Encoder: transformer, dim "
        f"{b['dim']}, {b['depth']} layer(s), {b['heads']} heads. InfoNCE (query_document, all in-batch negatives, symmetric="
        f"{b['symmetric']}, temperature {b['temperature']}), batch size {b['batch_size']}, {b['steps']} steps of AdamW lr {b['lr']}. "
        f"Seeds {spec['seeds']}; mean ± sample std over seeds. The model-dependent samplers (gcbs, hard) plan each epoch from "
        "the encoder as it is at the epoch's start (the untrained encoder for the first epoch).\n\n",
        markdown_table(["sampler", "seeds", *TEXT_METRICS, "final loss", "train s"], table),
        "\nThe final loss is not comparable across samplers: harder batches have a higher loss by construction.\n",
        "\n## What the data show\n\n" + "\n".join(f"- {f}" for f in findings) + "\n"
        + (f"\n{len(findings)} comparisons with random, each at the 0.05 level and not corrected for their number: "
           "one p just below 0.05 is weak evidence.\n" if len(findings) > 1 else ""),
        f"\n![retrieval by sampler]({fig_name})\n\nResults per run: `results.csv` / `results.json`.\n",
    ]
    out = folder / "report.md"
    atomic_write_text(out, "".join(text))
    return out
