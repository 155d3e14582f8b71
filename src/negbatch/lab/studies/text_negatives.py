"""The negatives study on text pairs (``negbatch study negatives --data bible``).

At a fixed batch size, a dual encoder is trained with
``InfoNCE(form="query_document")`` and K negatives per query drawn uniformly
from the B - 1 other documents of the batch (``all`` = every one of them), for
each K and seed; each run reports Recall@1/5/10, MRR@10 and nDCG@10 of the test
queries against the whole test corpus. :mod:`negatives` dispatches here when
``--data`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..config import parse_negatives
from ..sweep import atomic_write_text, parse_list, read_results
from ..text_runs import TEXT_METRICS, TextRunConfig, load_text_split, run_text_configs

_list = parse_list

__all__ = ["add_text_arguments", "base_text_config", "run", "report", "TEXT_DEFAULTS", "DEFAULT_TEXT_KS"]

DEFAULT_TEXT_KS = "1,4,16,all"
# Defaults sized for a few minutes on a 2-core CPU (docs/text.md, "Studies").
TEXT_DEFAULTS = {"max_pairs": 8000, "steps": 120, "batch_size": 64, "temperature": 0.05, "lr": 1e-3}


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The text options shared by the text studies (``--data`` and the encoder's)."""
    g = parser.add_argument_group("text pairs (with --data)")
    g.add_argument("--data", default=None,
                   help="text pairs instead of images: bible (ASV->BBE verse pairs, split by chapter), builtin (40 pairs, "
                        "for tests) or pairs:PATH (your JSONL/CSV with query,document columns). The negatives study's "
                        "default on bible (12 runs of 120 steps) took 16 min on a shared 2-core CPU at load average 6-9 "
                        "(0.17 s per step at low load)")
    g.add_argument("--max-pairs", type=int, default=None,
                   help=f"subsample this many pairs before the split (default with --data bible: {TEXT_DEFAULTS['max_pairs']}; 0: all)")
    g.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {TEXT_DEFAULTS['steps']})")
    g.add_argument("--test-fraction", type=float, default=None, help="held-out fraction of chapters / pairs (default 0.1; builtin 0.25)")
    g.add_argument("--text-dim", type=int, default=64, help="encoder width (default 64)")
    g.add_argument("--text-depth", type=int, default=1, help="transformer layers (default 1)")
    g.add_argument("--text-heads", type=int, default=4, help="attention heads (default 4)")
    g.add_argument("--vocab-size", type=int, default=8000, help="WordPiece vocabulary (default 8000)")
    g.add_argument("--max-length", type=int, default=64, help="tokens per text (default 64)")
    g.add_argument("--symmetric", default="true", choices=("true", "false"), help="add the document-to-query term (default true)")


def base_text_config(args: argparse.Namespace) -> TextRunConfig:
    """The text run configuration given by the command line (before the swept fields)."""
    data = args.data
    builtin = data == "builtin"
    max_pairs = args.max_pairs if args.max_pairs is not None else (TEXT_DEFAULTS["max_pairs"] if data == "bible" else None)
    values: dict[str, Any] = {
        "data": data,
        "max_pairs": max_pairs or None,
        "test_fraction": args.test_fraction if args.test_fraction is not None else (0.25 if builtin else 0.1),
        "vocab_size": args.vocab_size, "max_length": args.max_length,
        "dim": args.text_dim, "depth": args.text_depth, "heads": args.text_heads,
        "symmetric": args.symmetric == "true",
        "steps": args.steps if args.steps is not None else TEXT_DEFAULTS["steps"],
        "batch_size": getattr(args, "batch_size", TEXT_DEFAULTS["batch_size"]),
        "lr": TEXT_DEFAULTS["lr"],
        "temperature": TEXT_DEFAULTS["temperature"],
    }
    for name in ("weight_decay", "device"):  # shared with the image options, when given
        if hasattr(args, name):
            values[name] = getattr(args, name)
    for name in ("batch_size",):
        values[name] = int(values[name])
    if "weight_decay" in values:
        values["weight_decay"] = float(values["weight_decay"])
    if values.get("device") == "auto":
        import torch

        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return TextRunConfig(**values)



def build_text_configs(base: TextRunConfig, ks: list, seeds: list[int], temperatures: list[float], lrs: list[float]) -> tuple[list[TextRunConfig], list]:
    """Every (K, temperature, lr, seed) configuration; K >= the B - 1 candidates becomes ``all``."""
    available = base.batch_size - 1
    capped: list = []
    for k in ks:
        k = "all" if k == "all" or k >= available else k
        if k not in capped:
            capped.append(k)
    configs = [base.replace(negatives=k, temperature=t, lr=lr, seed=s) for k in capped for t in temperatures for lr in lrs for s in seeds]
    return configs, capped


def run(args: argparse.Namespace) -> Path:
    base = base_text_config(args)
    ks = _list(args.ks or DEFAULT_TEXT_KS, parse_negatives, "ks")
    seeds = _list(args.seeds, int, "seeds")
    temperatures = _list(args.temperatures, float, "temperatures") if args.temperatures else [base.temperature]
    lrs = _list(args.lrs, float, "lrs") if args.lrs else [base.lr]
    configs, effective = build_text_configs(base, ks, seeds, temperatures, lrs)
    train, _ = load_text_split(base.data, base.max_pairs, base.test_fraction, base.data_seed)  # data errors first
    if base.batch_size > len(train):
        raise ValueError(f"--batch-size {base.batch_size} exceeds the {len(train)} training pairs of {base.data!r}; lower it")
    name = base.data if not base.data.startswith("pairs:") else "pairs"
    out = Path(args.out or f"negbatch-runs/negatives-text-{name}")
    out.mkdir(parents=True, exist_ok=True)
    spec = {"study": "negatives", "data": base.data, "base": base.to_dict(), "ks": effective, "seeds": seeds,
            "temperatures": temperatures, "lrs": lrs, "runs": len(configs)}
    atomic_write_text(out / "study.json", json.dumps(spec, indent=1))
    print(f"negatives study on text ({base.data}): {len(configs)} runs into {out}", file=sys.stderr, flush=True)

    def progress(summary: dict[str, Any], done: int, total: int) -> None:
        c = summary["config"]
        print(f"[{done}/{total}] K={c['negatives']} t={c['temperature']} lr={c['lr']} seed={c['seed']}: "
              f"R@1 {summary['recall@1']:.3f} nDCG@10 {summary['ndcg@10']:.3f}", file=sys.stderr, flush=True)

    run_text_configs(configs, out, workers=args.workers, key_fields=("negatives", "temperature", "lr", "seed"), on_done=progress)
    report(out)
    return out


# ------------------------------------------------------------------------- report


def _select_best(rows: list[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    """Per K: the runs of the (temperature, lr) with the best mean nDCG@10 (optimistic, for every K alike)."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        groups[(r["negatives"], r["temperature"], r["lr"])].append(r)
    best: dict[Any, list] = {}
    score = lambda runs: sum(r["ndcg@10"] for r in runs) / len(runs)  # noqa: E731
    for (k, _, _), runs in groups.items():
        if k not in best or score(runs) > score(best[k]):
            best[k] = runs
    return best


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Welch's t-test p-value, or None when undefined (fewer than 2 values, no spread)."""
    if len(a) < 2 or len(b) < 2 or (len(set(a)) == 1 and len(set(b)) == 1):
        return None
    import warnings

    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return None if math.isnan(p) else float(p)


def report(folder: Path) -> Path:
    """Figure and ``report.md`` from a text negatives study folder."""
    from ..report import fmt_mean_std, markdown_table, mean_std, plt, save_figure

    folder = Path(folder)
    spec = json.loads((folder / "study.json").read_text())
    rows = read_results(folder)
    for r in rows:
        r["negatives"] = parse_negatives(r["negatives"])
    b = spec["base"]
    bs = b["batch_size"]
    position = lambda k: bs - 1 if k == "all" else int(k)  # noqa: E731
    label = lambda k: f"all ({bs - 1})" if k == "all" else str(k)  # noqa: E731
    best = _select_best(rows)
    order = sorted(best, key=position)

    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 4))
    xs = [position(k) for k in order]
    for key, marker in (("recall@1", "o"), ("recall@10", "s"), ("mrr@10", "^"), ("ndcg@10", "x")):
        st = [mean_std(r[key] for r in best[k]) for k in order]
        ax.errorbar(xs, [s[0] for s in st], yerr=[s[1] for s in st], marker=marker, capsize=3, label=key)
    base_st = mean_std(r["untrained_recall@1"] for r in rows)
    ax.axhline(base_st[0], color="grey", ls=":", label="untrained recall@1")
    ax.set_xscale("log")
    ax.set(xlabel="negatives per query K (rightmost: all)", ylabel="test retrieval metric",
           title=f"{spec['data']}: retrieval vs K (batch {bs}, mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig_name = save_figure(fig, folder / "retrieval_vs_k.png")

    sample = rows[0] if rows else {}
    table = [[label(k), len(best[k]), best[k][0]["temperature"], best[k][0]["lr"]]
             + [fmt_mean_std(r[m] for r in best[k]) for m in TEXT_METRICS]
             + [fmt_mean_std((r["final_loss"] for r in best[k]), 3)] for k in order]
    text = [
        "# Study: the number of negatives per query, on text pairs\n\n",
        f"Data `{spec['data']}`: {sample.get('num_train_pairs')} training pairs; {sample.get('num_test_queries')} test queries "
        f"searched among {sample.get('num_test_documents')} test documents (max_pairs {b['max_pairs']}, test fraction "
        f"{b['test_fraction']}, split seed {b['data_seed']}). Encoder: transformer, dim {b['dim']}, {b['depth']} layer(s), "
        f"{b['heads']} heads, dropout {b['dropout']}, vocabulary {b['vocab_size']}, max length {b['max_length']}. "
        f"InfoNCE (query_document, symmetric={b['symmetric']}), batch size {bs}, {b['steps']} steps of AdamW "
        f"(weight decay {b['weight_decay']}); seeds {spec['seeds']}; temperatures {spec['temperatures']}; learning rates "
        f"{spec['lrs']}. Mean ± sample std over seeds.\n",
        f"\nBaseline: the untrained encoder scores Recall@1 {fmt_mean_std(r['untrained_recall@1'] for r in rows)}, "
        f"nDCG@10 {fmt_mean_std(r['untrained_ndcg@10'] for r in rows)} (shared words; chance Recall@1 is "
        f"1/{sample.get('num_test_documents')}).\n",
    ]
    if len(spec["temperatures"]) > 1 or len(spec["lrs"]) > 1:
        text.append("Temperature and learning rate were swept; each K shows its best pair by mean test nDCG@10, "
                    "optimistic for every K alike.\n")
    text.append("\n" + markdown_table(["K", "seeds", "temperature", "lr", *TEXT_METRICS, "final loss"], table))
    text.append("\n## What the data show\n\n- " + _finding(order, best, label) + "\n")
    text.append(f"\n![retrieval vs K]({fig_name})\n\nResults per run: `results.csv` / `results.json`; "
                "per-step losses: `runs/*/metrics.jsonl`.\n")
    out = folder / "report.md"
    atomic_write_text(out, "".join(text))
    return out


def _finding(order: list, best: dict, label) -> str:
    from ..report import mean_std

    score = {k: [r["ndcg@10"] for r in best[k]] for k in order}
    means = {k: mean_std(v)[0] for k, v in score.items()}
    top, worst = max(order, key=means.get), min(order, key=means.get)
    if means[top] == means[worst]:
        return f"Every K scored the same mean nDCG@10 ({means[top]:.3f}): no effect of the number of negatives is visible at this scale."
    parts = [f"Best K = {label(top)} with nDCG@10 {means[top]:.3f}; worst K = {label(worst)} with {means[worst]:.3f} "
             f"(spread {means[top] - means[worst]:.3f})."]
    if "all" in score and top != "all":
        p = welch_p(score[top], score["all"])
        sure = p is not None and p < 0.05
        parts.append(f"Against all negatives ({means['all']:.3f}) the best K gains {means[top] - means['all']:+.3f}, "
                     + (f"beyond seed noise (Welch p = {p:.2g}; optimistic, the best K is picked after the fact)." if sure
                        else "within seed noise" + (f" (Welch p = {p:.2f})." if p is not None else " (too few seeds for a test).")))
        parts.append("So fewer negatives helped at this scale." if sure else "So this run does not show that fewer negatives help on text at this scale.")
    elif top == "all" and len(order) > 1:
        runner = max((k for k in order if k != "all"), key=means.get)
        p = welch_p(score["all"], score[runner])
        sure = p is not None and p < 0.05
        parts.append(f"All negatives scored highest, {means['all'] - means[runner]:+.3f} over K = {label(runner)}, "
                     + (f"beyond seed noise (Welch p = {p:.2g})" if sure else "within seed noise" + (f" (Welch p = {p:.2f})" if p is not None else "")) + ".")
        smallest = order[0]
        p1 = welch_p(score["all"], score[smallest])
        if smallest != runner and p1 is not None:
            parts.append(f"Against the fewest negatives (K = {label(smallest)}, {means[smallest]:.3f}) the gap is "
                         f"{means['all'] - means[smallest]:+.3f} (Welch p = {p1:.2g}).")
        parts.append("On text at this scale, more negatives do not hurt; there is no sign that fewer negatives help.")
    return " ".join(parts)
