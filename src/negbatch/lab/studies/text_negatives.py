"""The negatives study on text pairs (``negbatch study negatives --data bible``).

At a fixed batch size, a dual encoder is trained with
``InfoNCE(form="query_document")`` and K negatives per query drawn uniformly
from the B - 1 other documents of the batch and, with a hard-negatives column,
the batch's hard negatives (``all`` = every one of them), for
each K and seed; each run reports Recall@1/5/10, MRR@10 and nDCG@10 of the test
queries against the whole test corpus. The default on bible (8,000 pairs, 12
runs of 120 steps) took 16 min on a shared 2-core CPU at load average 6-9
(0.17 s per step at low load).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..config import TrainConfig, parse_negatives
from ..report import markdown_table, plt, save_figure, training_length
from ..folder import atomic_write_text
from ..stats import fmt_mean_std, mean_std, per_seed, welch_p
from ..sweep import parse_list, read_results
from ..tasks.text import TEXT_METRICS, check_negatives, pretrained
from .base import TextStudy
from .negatives import add_sweep_arguments, cap_ks, swept_temperatures

__all__ = ["TextNegatives", "build_text_configs", "DEFAULT_TEXT_KS"]

DEFAULT_TEXT_KS = "1,4,16,all"


def build_text_configs(base: TrainConfig, ks: list, seeds: list[int], temperatures: list[float],
                       lrs: list[float], hard_negatives: int = 0) -> tuple[list[TrainConfig], list]:
    """Every (K, temperature, lr, seed) configuration; K >= a query's candidates becomes ``all``.

    A query's candidates are the batch's B - 1 other documents and, with a hard-negatives column of
    ``hard_negatives`` per pair, the batch's B * H hard negatives: K = B - 1 is then a sampled K, not
    all (it ran as all, labelled as K). A K the training refuses (above B - 1 with the symmetric term)
    is refused here, before anything is written."""
    b = base.batch_size
    hard = f" and {b * hard_negatives} hard negatives" if hard_negatives else ""
    capped = cap_ks(ks, b - 1 + b * hard_negatives, f"of a query ({b - 1} other documents{hard}) at batch size {b}")
    for k in capped:
        check_negatives(base.replace(negatives=k), hard_negatives)
    configs = [base.replace(negatives=k, temperature=t, lr=lr, seed=s) for k in capped for t in temperatures
               for lr in lrs for s in seeds]
    return configs, capped


class TextNegatives(TextStudy):
    """The negatives study on text pairs (InfoNCE, K negatives per query)."""

    name = "negatives"
    summary = "how many negatives per query? (text pairs)"
    swept = ("negatives", "seed", "temperature", "lr")

    fixed_options = {
        "loss": ((None, "infonce"), "the text study trains InfoNCE (query-document); compare losses with "
                                     "negbatch study batch-size --data bible"),
        "queue_size": ((0,), "a queue adds negatives beyond the K this study varies"),
        "key_momentum": ((0, 0.0, None), "a momentum encoder's keys are not what this study compares"),
        "learnable_temperature": ((None, False), "the study sweeps --temperatures"),
    }
    key_fields = ("negatives", "temperature", "lr", "seed")

    def add_study_arguments(self, g: argparse._ArgumentGroup) -> None:
        add_sweep_arguments(g, DEFAULT_TEXT_KS, "0.05", "query")

    def plan(self, args: argparse.Namespace) -> tuple[Path, list[TrainConfig]]:
        base = self.base_config(args)
        ks = parse_list(args.ks, parse_negatives, "ks")
        seeds = self.seeds(args)
        temperatures = swept_temperatures(args)
        lrs = parse_list(args.lrs, float, "lrs") if args.lrs else [base.lr]
        train, _ = self.load(base)  # data errors before the folder is made
        configs, effective = build_text_configs(base, ks, seeds, temperatures, lrs, train.num_hard_negatives)
        out = self.out_folder(args, base.dataset)
        candidates = base.batch_size - 1 + base.batch_size * train.num_hard_negatives  # a query's "all"
        self.write_spec(out, {"base": base.to_dict(), "ks": effective, "seeds": seeds, "temperatures": temperatures,
                              "lrs": lrs, "runs": len(configs), "query_candidates": candidates}, configs)
        return out, configs

    def line(self, summary: dict[str, Any]) -> str:
        c = summary["config"]
        return (f"K={c['negatives']} t={c['temperature']} lr={c['lr']} seed={c['seed']}: "
                f"R@1 {summary['recall@1']:.3f} nDCG@10 {summary['ndcg@10']:.3f}")

    def report(self, folder: Path) -> Path:
        return report(folder)


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


def report(folder: Path) -> Path:
    """Figure and ``report.md`` from a text negatives study folder."""
    folder = Path(folder)
    spec = json.loads((folder / "study.json").read_text())
    rows = read_results(folder)
    for r in rows:
        r["negatives"] = parse_negatives(r["negatives"])
    b = spec["base"]
    bs = b["batch_size"]
    every = spec.get("query_candidates", bs - 1)  # B - 1, plus the batch's hard negatives (older folders: B - 1)
    position = lambda k: every if k == "all" else int(k)  # noqa: E731
    label = lambda k: f"all ({every})" if k == "all" else str(k)  # noqa: E731
    best = _select_best(rows)
    order = sorted(best, key=position)

    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 4))
    xs = [position(k) for k in order]
    for key, marker in (("recall@1", "o"), ("recall@10", "s"), ("mrr@10", "^"), ("ndcg@10", "x")):
        st = [mean_std(r[key] for r in best[k]) for k in order]
        ax.errorbar(xs, [s[0] for s in st], yerr=[s[1] for s in st], marker=marker, capsize=3, label=key)
    base_st = mean_std(per_seed(rows, "untrained_recall@1"))
    ax.axhline(base_st[0], color="grey", ls=":",
               label=f"{'before fine-tuning' if pretrained(b.get('encoder')) else 'untrained'} recall@1")
    ax.set_xscale("log")
    ax.set(xlabel="negatives per query K (rightmost: all)", ylabel="test retrieval metric",
           title=f"{b['dataset']}: retrieval vs K (batch {bs}, mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig_name = save_figure(fig, folder / "retrieval_vs_k.png")

    sample = rows[0] if rows else {}
    table = [[label(k), len(best[k]), best[k][0]["temperature"], best[k][0]["lr"]]
             + [fmt_mean_std(r[m] for r in best[k]) for m in TEXT_METRICS]
             + [fmt_mean_std((r["final_loss"] for r in best[k]), 3)] for k in order]
    text = [
        "# Study: the number of negatives per query, on text pairs\n\n",
        TextStudy.describe(b, sample) + " ",
        f"{TextStudy.objective(b, swept=('negatives', 'temperature'))}, batch size {bs}, {training_length(b)} of "
        f"{TextStudy.optimizer(b)}; seeds {spec['seeds']}; temperatures {spec['temperatures']}; learning rates "
        f"{spec['lrs']}. Mean ± sample std over seeds.\n",
        f"\nBaseline: {TextStudy.before_training(b)} scores Recall@1 "
        f"{fmt_mean_std(per_seed(rows, 'untrained_recall@1'))}, nDCG@10 "
        f"{fmt_mean_std(per_seed(rows, 'untrained_ndcg@10'))} ("
        f"{'' if pretrained(b.get('encoder')) else 'shared words; '}chance Recall@1 is "
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
                     + (f"beyond seed noise (Welch p = {p:.2g})" if sure else "within seed noise" + (
                         f" (Welch p = {p:.2f})" if p is not None else " (too few seeds for a test)")) + ".")
        smallest = order[0]
        p1 = welch_p(score["all"], score[smallest])
        if smallest != runner and p1 is not None:
            parts.append(f"Against the fewest negatives (K = {label(smallest)}, {means[smallest]:.3f}) the gap is "
                         f"{means['all'] - means[smallest]:+.3f} (Welch p = {p1:.2g}).")
        parts.append("On text at this scale, more negatives do not hurt; there is no sign that fewer negatives help.")
    return " ".join(parts)
