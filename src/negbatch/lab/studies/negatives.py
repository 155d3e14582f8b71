"""Study: how many negatives per anchor? (Mitrovic et al., "Less can be more
in contrastive learning".)

At a fixed batch size, train SimCLR (InfoNCE) and ReLIC with K negatives per
anchor for each K in a list (``all`` = every candidate of the batch; K larger
than the candidates is capped to ``all``), several seeds each, optionally
sweeping temperature and learning rate and keeping the best per K as the paper
does. Measured per run: linear-probe and kNN accuracy, silhouette and
intra-class distance of the representation, gradient SNR over training.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..report import training_length
from ..config import TrainConfig, load_config_file, parse_negatives
from ..folder import atomic_write_text, read_metrics
from ..stats import fmt_mean_std, mean_std, spearman, welch_p
from ..sweep import parse_list, read_results
from ..tasks.image import negative_candidates
from .base import ImageStudy, say

__all__ = ["ImageNegatives", "build_configs", "cap_ks", "add_sweep_arguments", "DEFAULT_KS"]

DEFAULT_KS = "1,2,5,10,50,100,all"


def cap_ks(ks: list, available: int, of: str | None = None) -> list:
    """K values in order, each K >= the ``available`` candidates turned into ``"all"``, repeats dropped.
    With ``of`` (whose candidates they are), say which K were run as all."""
    capped: list = []
    for k in ks:
        k = "all" if k == "all" or k >= available else k
        if k not in capped:
            capped.append(k)
    merged = [str(k) for k in ks if k != "all" and k >= available]
    if of is not None and merged:
        say(f"--ks {','.join(merged)}: at or above the {available} candidates {of}, so run as all")
    return capped


def add_sweep_arguments(g: argparse._ArgumentGroup, ks: str, temperature: str, per: str) -> None:
    """``--ks``, ``--temperatures`` and ``--lrs`` (the negatives study on either modality)."""
    g.add_argument("--ks", default=ks, help=f"negatives per {per} to sweep; 'all' and K at or above the batch's "
                   f"candidates mean all (default: {ks})")
    g.add_argument("--temperatures", default=None,
                   help=f"comma list; with several, the best per K is reported (default: temperature of --config, "
                        f"else {temperature})")
    g.set_defaults(default_temperature=temperature)
    g.add_argument("--lrs", default=None, help="comma list of learning rates; with several, the best per K is "
                   "reported (default: lr of --config, else 0.001)")


def swept_temperatures(args: argparse.Namespace) -> list[float]:
    """``--temperatures``; else the ``--config`` file's temperature (it was
    ignored for the study's default), else the study's default."""
    if args.temperatures is not None:
        return parse_list(args.temperatures, float, "temperatures")
    from_file = load_config_file(args.config) if getattr(args, "config", None) else {}
    from_file = {str(k).replace("-", "_"): v for k, v in from_file.items()}
    if "temperature" in from_file:
        return [float(from_file["temperature"])]
    return parse_list(args.default_temperature, float, "temperatures")


def build_configs(base: TrainConfig, losses: list[str], ks: list, seeds: list[int], temperatures: list[float], lrs: list[float]) -> tuple[list[TrainConfig], dict[str, list]]:
    """Every (loss, K, temperature, lr, seed) configuration; K capped by the batch per loss."""
    configs, effective = [], {}
    for loss in losses:
        if loss not in ("simclr", "relic"):
            raise ValueError(f"--losses: unknown loss {loss!r}; expected simclr or relic")
        capped = effective[loss] = cap_ks(ks, negative_candidates(loss, base.batch_size),
                                          f"of {loss} at batch size {base.batch_size}")
        for k in capped:
            for t in temperatures:
                for lr in lrs:
                    for seed in seeds:
                        configs.append(base.replace(loss=loss, negatives=k, temperature=t, lr=lr, seed=seed))
    return configs, effective


class ImageNegatives(ImageStudy):
    """The negatives study on images (SimCLR and ReLIC, K negatives per anchor)."""

    name = "negatives"
    summary = "how many negatives per anchor? (images: SimCLR, ReLIC; text pairs: InfoNCE)"
    swept = ("loss", "negatives", "seed", "temperature", "lr")

    fixed_options = {
        "queue_size": ((0,), "a queue adds negatives beyond the K this study varies"),
        "key_momentum": ((0, 0.0, None), "a momentum encoder's keys are not what this study compares"),
        "learnable_temperature": ((None, False), "the study sweeps --temperatures"),
    }
    key_fields = ("loss", "negatives", "temperature", "lr", "seed")

    def add_study_arguments(self, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--losses", default="simclr,relic", help="comma list of simclr, relic (default: simclr,relic)")
        add_sweep_arguments(g, DEFAULT_KS, "0.2", "anchor")

    def plan(self, args: argparse.Namespace) -> tuple[Path, list[TrainConfig]]:
        base = self.base_config(args)
        losses = parse_list(args.losses, str, "losses", unique=True)
        ks = parse_list(args.ks, parse_negatives, "ks")
        seeds = self.seeds(args)
        temperatures = swept_temperatures(args)
        lrs = parse_list(args.lrs, float, "lrs") if args.lrs else [base.lr]
        configs, effective = build_configs(base, losses, ks, seeds, temperatures, lrs)
        self.load(base)  # data errors before the folder is made
        out = self.out_folder(args, base.dataset)
        self.write_spec(out, {"base": base.to_dict(), "losses": losses, "ks": effective, "seeds": seeds,
                              "temperatures": temperatures, "lrs": lrs, "runs": len(configs),
                              "raw_pixel_linear_acc": self.raw_pixel_baseline(base, out)}, configs)
        return out, configs

    def line(self, summary: dict[str, Any]) -> str:
        c = summary["config"]
        return (f"{c['loss']} K={c['negatives']} t={c['temperature']} lr={c['lr']} seed={c['seed']}: "
                f"linear {summary['linear_acc']:.3f} kNN {summary['knn_acc']:.3f}")

    def report(self, folder: Path) -> Path:
        return report(folder)


# ------------------------------------------------------------------------- report


def _k_position(k: Any, loss: str, batch_size: int) -> int:
    return negative_candidates(loss, batch_size) if k == "all" else int(k)


def _k_label(k: Any, loss: str, batch_size: int) -> str:
    return f"all ({negative_candidates(loss, batch_size)})" if k == "all" else str(k)


def _select_best(rows: list[dict[str, Any]]) -> dict[tuple[str, Any], list[dict[str, Any]]]:
    """Per (loss, K): the runs of the (temperature, lr) with the best mean linear accuracy."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        groups[(r["loss"], r["negatives"], r["temperature"], r["lr"])].append(r)
    best: dict[tuple[str, Any], list] = {}
    for (loss, k, _, _), runs in groups.items():
        mean = sum(r["linear_acc"] for r in runs) / len(runs)
        if (loss, k) not in best or mean > sum(r["linear_acc"] for r in best[(loss, k)]) / len(best[(loss, k)]):
            best[(loss, k)] = runs
    return best


def report(folder: Path) -> Path:
    """Figures and ``report.md`` from the study folder's results."""
    from ..report import markdown_table, plt, save_figure

    folder = Path(folder)
    spec = json.loads((folder / "study.json").read_text())
    rows = [r for r in read_results(folder) if r["loss"] in spec["losses"]]
    if not rows:
        raise ValueError(f"{folder} has no finished run of this study's settings yet (losses {spec['losses']}); "
                         f"run the study to the end of one run first")
    for r in rows:
        r["negatives"] = parse_negatives(r["negatives"])
    bs = spec["base"]["batch_size"]
    best = _select_best(rows)
    losses = [l for l in spec["losses"] if any(k[0] == l for k in best)]
    order = {l: sorted([k for (ll, k) in best if ll == l], key=lambda k: _k_position(k, l, bs)) for l in losses}
    pyplot = plt()

    # Figure 1: linear accuracy vs K.
    fig, ax = pyplot.subplots(figsize=(6, 4))
    for loss in losses:
        xs = [_k_position(k, loss, bs) for k in order[loss]]
        stats = [mean_std(r["linear_acc"] for r in best[(loss, k)]) for k in order[loss]]
        ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=f"{loss} linear")
        knn = [mean_std(r["knn_acc"] for r in best[(loss, k)]) for k in order[loss]]
        ax.errorbar(xs, [s[0] for s in knn], yerr=[s[1] for s in knn], marker="x", ls="--", capsize=3, alpha=0.6, label=f"{loss} kNN")
    ax.set_xscale("log")
    ax.set(xlabel="negatives per anchor K (rightmost: all)", ylabel="test accuracy", title=f"accuracy vs K (batch {bs}, mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig_acc = save_figure(fig, folder / "accuracy_vs_k.png")

    # Figure 2: gradient SNR over training per K (mean over parameters, std across parameters).
    fig, axes = pyplot.subplots(len(losses), 2, figsize=(10, 3.6 * len(losses)), squeeze=False, layout="constrained")
    for i, loss in enumerate(losses):
        for k in order[loss]:
            curves = [read_metrics(folder / "runs" / r["run"]) for r in best[(loss, k)]]
            # Rows before the first step an fp16 scaler took carry no SNR; the curves are aligned by step.
            curves = [[row for row in c if "snr_mean" in row] for c in curves]
            common = set.intersection(*({row["step"] for row in c} for c in curves)) if curves else set()
            curves = [[row for row in c if row["step"] in common] for c in curves if common]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            # The first ~1/(1 - beta) steps estimate the variance from too few
            # gradients (one gradient has zero variance): not shown.
            burn_in = 1.0 / (1.0 - spec["base"]["snr_beta"])
            keep = [j for j in range(n) if curves[0][j]["step"] > burn_in]
            steps = [curves[0][j]["step"] for j in keep]
            for col, key in enumerate(("snr_mean", "snr_std")):
                axes[i][col].plot(steps, [sum(c[j][key] for c in curves) / len(curves) for j in keep], label=f"K={_k_label(k, loss, bs)}")
        for col, what in enumerate(("mean over parameters", "std across parameters")):
            axes[i][col].set(xlabel="step", ylabel="gradient SNR", yscale="log", title=f"{loss}: SNR {what} (mean of seeds)")
            axes[i][col].legend(fontsize=7)
    fig_snr = save_figure(fig, folder / "snr_over_training.png")

    # Figure 3: intra-class concentration per K.
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.5))
    for loss in losses:
        xs = [_k_position(k, loss, bs) for k in order[loss]]
        for col, key in enumerate(("silhouette", "intra_class_distance")):
            st = [mean_std(r[key] for r in best[(loss, k)]) for k in order[loss]]
            axes[col].errorbar(xs, [s[0] for s in st], yerr=[s[1] for s in st], marker="o", capsize=3, label=loss)
    for col, key in enumerate(("silhouette (higher: tighter classes)", "intra-class mean pairwise distance")):
        axes[col].set_xscale("log")
        axes[col].set(xlabel="negatives per anchor K", title=key)
        axes[col].legend()
    fig_geo = save_figure(fig, folder / "geometry_vs_k.png")

    b = spec["base"]
    swept = len(spec["temperatures"]) > 1 or len(spec["lrs"]) > 1
    text = [
        "# Study: the number of negatives per anchor\n\n",
        f"Data `{b['dataset']}` (train {b['n_train'] or 'all'}, test {b['n_test'] or 'all'}), encoder `{b['encoder']}` "
        f"{b['encoder_widths']}, head {b['head_widths']}, batch size {bs}, {training_length(b)}, optimizer {b['optimizer']}, "
        f"augmentation strength {b['aug_strength']}; seeds {spec['seeds']}; temperatures {spec['temperatures']}; "
        f"learning rates {spec['lrs']}. Accuracy is on the held-out test split; mean ± sample std over seeds.\n",
    ]
    if spec.get("raw_pixel_linear_acc") is not None:
        text.append(f"\nBaseline: the same linear probe on the raw pixels scores {spec['raw_pixel_linear_acc']:.3f}.\n")
    if swept:
        text.append("Temperature and learning rate were swept; each K shows its best pair by mean test linear accuracy "
                    "(as the paper reports), which is optimistic for every K alike.\n")
    findings = []
    for loss in losses:
        table = []
        for k in order[loss]:
            runs = best[(loss, k)]
            table.append([
                _k_label(k, loss, bs), len(runs), runs[0]["temperature"], runs[0]["lr"],
                fmt_mean_std(r["linear_acc"] for r in runs), fmt_mean_std(r["knn_acc"] for r in runs),
                fmt_mean_std(r["silhouette"] for r in runs), fmt_mean_std(r["intra_class_distance"] for r in runs),
                fmt_mean_std((r["snr_mean"] for r in runs), 3),
            ])
        text.append(f"\n## {loss}\n\n" + markdown_table(
            ["K", "seeds", "temperature", "lr", "linear acc", "kNN acc", "silhouette", "intra-class dist.", "final SNR mean"], table))
        findings.append(_finding(loss, order[loss], best, bs))
    text.append("\n## What the data show\n\n" + "\n".join(f"- {f}" for f in findings) + "\n")
    text.append(f"\n![accuracy vs K]({fig_acc})\n\n![SNR over training]({fig_snr})\n\n![geometry vs K]({fig_geo})\n")
    text.append("\nResults per run: `results.csv` / `results.json`; per-step metrics: `runs/*/metrics.jsonl`.\n")
    out = folder / "report.md"
    atomic_write_text(out, "".join(text))
    return out


def _finding(loss: str, ks: list, best: dict, bs: int) -> str:
    acc = {k: [r["linear_acc"] for r in best[(loss, k)]] for k in ks}
    means = {k: mean_std(v)[0] for k, v in acc.items()}
    top = max(ks, key=lambda k: means[k])
    worst = min(ks, key=lambda k: means[k])
    m_top, _, n_top = mean_std(acc[top])
    if means[top] == means[worst]:
        parts = [f"**{loss}**: every K gave the same mean linear accuracy, {m_top:.3f} (n={n_top})."]
    else:
        parts = [f"**{loss}**: best K = {_k_label(top, loss, bs)} with linear accuracy {fmt_mean_std(acc[top])}"
                 + (f" (n={n_top})" if n_top > 1 else "") + f"; worst K = {_k_label(worst, loss, bs)} with "
                 f"{means[worst]:.3f}."]
    if "all" in acc and top != "all":
        m_all = mean_std(acc["all"])[0]
        p = welch_p(acc[top], acc["all"])
        verdict = ("a difference beyond the seed-to-seed noise (Welch p < 0.05, optimistic: the best K was picked after the fact)" if p is not None and p < 0.05
                   else f"not distinguishable from seed noise (Welch p = {p:.2f})" if p is not None
                   else "untested (too few seeds for a test)")
        parts.append(f"Against all negatives ({fmt_mean_std(acc['all'])}) the gain is {m_top - m_all:+.3f}: {verdict}. "
                     + ("So at this scale fewer negatives did help." if p is not None and p < 0.05
                        else "So this run does not show that fewer negatives help at this scale."))
    elif top == "all" and len(ks) > 1 and means[top] != means[worst]:
        runner_up = max((k for k in ks if k != "all"), key=lambda k: means[k])
        m_all = mean_std(acc["all"])[0]
        p = welch_p(acc["all"], acc[runner_up])
        noise = ("beyond seed noise (Welch p < 0.05)" if p is not None and p < 0.05
                 else f"within seed noise (Welch p = {p:.2f})" if p is not None else "untested (too few seeds for a test)")
        parts.append(f"All negatives scored highest, {m_all - means[runner_up]:+.3f} over the next best K = "
                     f"{_k_label(runner_up, loss, bs)}, {noise}: no evidence at this scale that fewer negatives help.")
    spread = means[top] - means[worst]
    parts.append(f"The spread between best and worst K is {spread:.3f}.")
    runs = [(math.log(_k_position(k, loss, bs)), r) for k in ks for r in best[(loss, k)]]
    if len(ks) > 2 and len(runs) > 3:
        for key, what in (("intra_class_distance", "intra-class distance"), ("silhouette", "silhouette"), ("snr_mean", "final gradient SNR")):
            pairs = [(x, r[key]) for x, r in runs if r.get(key) is not None]
            if len(pairs) < 4:
                continue
            result = spearman([a for a, _ in pairs], [b for _, b in pairs])
            if result is None:
                continue
            rho, p = result
            trend = "rises" if rho > 0 else "falls" if rho < 0 else "does not change"
            sure = "significant" if p < 0.05 else "not significant"
            parts.append(f"Across runs, {what} {trend} with K (Spearman rho = {rho:+.2f}, p = {p:.2g}, {sure}).")
    return " ".join(parts)
