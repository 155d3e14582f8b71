"""Study: minibatch gradient bias and the bias-corrected global loss (Chen et al.
2022, "Why do we need large batch sizes in contrastive learning? A
gradient-bias perspective"; SogCLR).

Two parts, on the image data (digits by default; --dataset fashion-mnist when
its files are installed):

(a) bias: for the lab's model at initialisation and after training, the
    relative bias ||E[g_B] - g|| / ||g|| and variance of minibatch gradients
    against the exact global gradient g, per batch size, for the plain
    InfoNCE-style loss and the corrected one (nu exact; after training also
    the running nu of the trained GlobalInfoNCE), on fixed augmented views,
    model in eval mode, mean +- std over seeds with Monte-Carlo noise floors;
(b) training: the corrected (global) loss at half the batch size against the
    plain InfoNCE (SimCLR) loss at the full and at half the batch size, same
    epochs, several seeds; linear and kNN accuracy on the test split.

Default size (digits, batch 64 vs 32, 20 epochs, 3 seeds, 9 runs, 100
batches per bias point): 95 CPU-seconds, 81 s wall with --workers 2 on a
2-core machine (2026-12-03; the code of 2026-11-22 took 9 minutes there at
load 9). The bias part runs in this process with one torch thread, as the
runs train, so that its numbers do not depend on the machine's cores.
Rerunning skips finished runs and cached bias measurements.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..report import markdown_table, plt, save_figure, training_length
from ..folder import CHECKPOINT, atomic_write_text
from ..stats import fmt_mean_std, mean_std, per_seed, welch
from ..sweep import parse_list, read_results, run_key, torch_threads
from .base import ImageStudy, say

__all__ = ["BiasStudy", "build_configs", "measure_bias", "CONDITIONS"]

#: (label, loss, batch fraction): the three trained conditions.
CONDITIONS = (("InfoNCE, full batch", "simclr", "full"), ("InfoNCE, half batch", "simclr", "half"),
              ("global (corrected), half batch", "global", "half"))
DEFAULTS = {"batch_size": 64, "epochs": 20, "lr": 2e-3, "temperature": 0.1}
INIT_ESTIMATORS = ("plain", "corrected_exact")
TRAINED_ESTIMATORS = ("plain", "corrected", "corrected_fixed", "corrected_exact")
SHOWN = ("plain", "plain_paired", "corrected", "corrected_fixed", "corrected_exact")
ESTIMATOR_LABELS = {"plain": "plain minibatch", "plain_paired": "plain, paired with nu = Z (low noise)", "corrected": "corrected, running nu (E-step)",
                    "corrected_fixed": "corrected, running nu (no E-step)", "corrected_exact": "corrected, nu = Z exact"}


def build_configs(base: TrainConfig, batch_size: int, seeds: list[int]) -> list[tuple[str, TrainConfig]]:
    """The three conditions x seeds: (label, config)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 4:
        raise ValueError(f"--batch-size must be an int >= 4 (the half batch needs two samples), got {batch_size!r}")
    out = []
    for label, loss, part in CONDITIONS:
        b = batch_size if part == "full" else batch_size // 2
        for seed in seeds:
            out.append((label, base.replace(loss=loss, batch_size=b, seed=seed)))
    return out


class BiasStudy(ImageStudy):
    """The bias study (images only): the bias curves and the three trained conditions."""

    name = "bias"
    summary = "minibatch gradient bias and the bias-corrected global loss (images)"
    swept = ("loss", "batch_size", "seed")

    fixed_options = {
        "negatives": (("all",), "the study compares InfoNCE over all in-batch negatives with the global loss"),
        "queue_size": ((0,), "a queue's negatives are not the minibatch estimate whose bias the study measures"),
        "key_momentum": ((0, 0.0, None), "a momentum encoder's keys are not the minibatch estimate the study measures"),
        "chunk_method": (("cache",), "accumulation over chunks is another loss (each chunk's own negatives)"),
    }
    defaults = DEFAULTS
    key_fields = ("loss", "batch_size", "seed")

    def add_study_arguments(self, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--batch-size", dest="full_batch_size", type=int, default=None,
                       help="the full batch size B; the half-batch runs use B // 2 (default: batch_size of --config, "
                            f"else {DEFAULTS['batch_size']})")
        g.add_argument("--bias-batch-sizes", default="8,16,32,64,128,256",
                       help="batch sizes of the bias curves; those above the bias set are dropped (default: "
                            "8,16,32,64,128,256)")
        g.add_argument("--num-batches", type=int, default=100,
                       help="random batches per bias point; the noise floor shrinks as 1/sqrt of it (default: 100)")
        g.add_argument("--bias-samples", type=int, default=2000,
                       help="the bias is measured on the first N training samples (exact gradient: O(N^2)) "
                            "(default: 2000)")
        g.add_argument("--skip-bias", action="store_true", help="only the training part (b)")

    def plan(self, args: argparse.Namespace) -> tuple[Path, list[TrainConfig]]:
        base = self.base_config(args)
        seeds = self.seeds(args)
        sizes = parse_list(args.bias_batch_sizes, int, "bias-batch-sizes")
        if min(sizes) < 2:  # they were dropped without a word
            raise ValueError(f"--bias-batch-sizes must all be >= 2 (an anchor needs a negative), got {sizes}")
        if args.num_batches < 2:
            raise ValueError(f"--num-batches must be >= 2, got {args.num_batches}")
        if args.bias_samples < 4:
            raise ValueError(f"--bias-samples must be >= 4, got {args.bias_samples}")
        full = args.full_batch_size if args.full_batch_size is not None else base.batch_size
        labelled = build_configs(base, full, seeds)
        self.load(base, full)  # data errors before the folder is made
        out = self.out_folder(args, base.dataset)
        runs = {run_key(c, self.key_fields): label for label, c in labelled}
        self.write_spec(out, {"base": base.to_dict(), "batch_size": full, "seeds": seeds,
                              "bias_batch_sizes": sizes, "num_batches": args.num_batches,
                              "bias_samples": args.bias_samples, "skip_bias": bool(args.skip_bias),
                              "conditions": runs}, [c for _, c in labelled])
        return out, [c for _, c in labelled]

    def line(self, summary: dict[str, Any]) -> str:
        c = summary["config"]
        return (f"{c['loss']} B={c['batch_size']} seed={c['seed']}: linear {summary['linear_acc']:.3f} "
                f"kNN {summary['knn_acc']:.3f}")

    def after_training(self, args: argparse.Namespace, out: Path) -> None:
        """Part (a): the bias of the initial and the trained global runs' models, per seed (cached)."""
        if args.skip_bias:
            return
        spec = json.loads((out / "study.json").read_text())
        base = TrainConfig.from_dict(spec["base"])
        rows = []
        for label, trained in build_configs(base, spec["batch_size"], spec["seeds"]):
            if trained.loss == "global":
                rows += measure_bias(trained, out / "runs" / run_key(trained, self.key_fields), out / "bias",
                                     spec["bias_batch_sizes"], spec["num_batches"], spec["bias_samples"])
        _write_table(out, "bias_results", rows)

    def report(self, folder: Path) -> Path:
        return report(folder)


# --------------------------------------------------------------------- bias part


def measure_bias(
    cfg: TrainConfig, run_dir: Path, cache_dir: Path, batch_sizes: list[int], num_batches: int, bias_samples: int
) -> list[dict[str, Any]]:
    """Bias rows of one seed: the model of ``cfg`` at initialisation (the
    trainer's seeded init) and after training (``run_dir``'s checkpoint, with
    its running nu). Cached in ``cache_dir`` per seed; a rerun with the same
    settings reads the cache. Measured with one torch thread, as the runs
    train, so that the numbers do not depend on the machine's cores (the
    caller's thread count is restored after)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Version 4: measured with one thread (version 3 ran at the process's count, the machine's cores).
    settings = {"version": 4, "config": cfg.identity(), "batch_sizes": batch_sizes, "num_batches": num_batches,
                "bias_samples": bias_samples}
    cache = cache_dir / f"seed={cfg.seed}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        # A cache of before 2026-12-03 holds the configuration's former identity (log_every and device in it).
        if saved.get("settings") in (settings, {**settings, "config": cfg.former_identity()}):
            say(f"bias seed={cfg.seed}: measured earlier (read from {cache})")
            return saved["rows"]
    with torch_threads(1):
        rows = _measure_bias(cfg, run_dir, batch_sizes, num_batches, bias_samples)
    atomic_write_text(cache, json.dumps({"settings": settings, "rows": rows}, indent=1))
    return rows


def _measure_bias(cfg: TrainConfig, run_dir: Path, batch_sizes: list[int], num_batches: int,
                  bias_samples: int) -> list[dict[str, Any]]:
    """:func:`measure_bias` without its cache, at the caller's thread count."""
    from ...data import Augment
    from ..tasks.image import load_image_data
    from ...diagnostics import exact_global_gradient, gradient_bias
    from ...losses import GlobalInfoNCE
    from ..tasks.image import build_loss, build_model

    data = load_image_data(cfg).subset(cfg.n_train, cfg.n_test)
    n_train = data.x_train.shape[0]
    n = min(bias_samples, n_train)
    x = data.x_train[:n]
    g = torch.Generator().manual_seed(cfg.seed + 11)
    augment = Augment(strength=cfg.aug_strength, hflip=cfg.hflip)
    views = (augment(x, g), augment(x, g))  # fixed views: row i is sample i
    sizes = [b for b in batch_sizes if 2 <= b <= n]
    if not sizes:
        raise ValueError(f"--bias-batch-sizes {batch_sizes}: none lies in [2, {n}] (the bias set's size); give smaller ones")
    trained_gamma = build_loss(cfg, num_samples=n_train).loss.gamma
    rows = []
    for phase in ("init", "trained"):
        torch.manual_seed(cfg.seed)  # the trainer's initialisation
        model = build_model(cfg, data.image_shape)
        # A learned temperature is part of the objective: its start value at init, its learned one after.
        # sync_state=False: measured in this process alone (rank 0 under torchrun), whose E-steps must not
        # wait for the other processes' (it did, and the study failed after its training).
        loss = GlobalInfoNCE(n, temperature=cfg.temperature, gamma=trained_gamma,
                             learnable_temperature=bool(cfg.learnable_temperature), sync_state=False)
        estimators = INIT_ESTIMATORS
        if phase == "trained":
            ckpt = torch.load(run_dir / CHECKPOINT, weights_only=True, map_location="cpu")
            model.load_state_dict(ckpt["model"])
            state = ckpt["loss"]
            loss.load_state_dict({"log_nu": state["loss.log_nu"][:n], "visited": state["loss.visited"][:n],
                                  "num_updates": state["loss.num_updates"]}, strict=loss.logit_scale is None)
            if loss.logit_scale is not None:
                with torch.no_grad():
                    loss.logit_scale.log_scale.copy_(state["loss.logit_scale.log_scale"])
            estimators = TRAINED_ESTIMATORS
        model.eval()  # BatchNorm on running statistics: each embedding depends on its sample only
        say(f"bias seed={cfg.seed} {phase}: N={n}, batch sizes {sizes}")
        exact = exact_global_gradient(model, loss, views)
        estimates = [gradient_bias(model, loss, views, b, num_batches, estimator=e, seed=cfg.seed, exact=exact)
                     for b in sizes for e in estimators]
        estimates += [_paired_bias(model, loss, views, exact, b, num_batches, cfg.seed) for b in sizes]
        extra: dict[str, float] = {}
        if phase == "trained":
            # How far the running nu is from the exact Z of these (fixed, eval-mode) views.
            offset = (loss.log_nu - exact.log_normalizers.to(loss.log_nu))[loss.visited]
            extra = {"global_loss": exact.loss, "log_nu_minus_log_z_mean": float(offset.mean()),
                     "log_nu_minus_log_z_abs": float(offset.abs().mean())}
        for est in estimates:
            rows.append({"phase": phase, "seed": cfg.seed, "n": n, **est.as_dict(), **extra})
    return rows


def _paired_bias(model, loss, views, exact, batch_size: int, num_batches: int, seed: int):
    """The plain estimator's bias measured against the exact-nu corrected
    estimator on the same batches: d_B = g_plain(B) - g_exact(B) has mean
    E[g_plain] - g (the corrected one is unbiased at nu = Z), and a variance
    far below either gradient's, because the two share the batch's noise.
    Same batches as :func:`gradient_bias` with the same seed."""
    import copy

    from ...diagnostics import BiasEstimate, minibatch_gradient

    exact_loss = copy.deepcopy(loss)
    exact_loss.set_log_normalizers(exact.log_normalizers.to(exact_loss.log_nu))
    n = views[0].shape[0]
    batches = torch.Generator().manual_seed(seed)
    negatives = torch.Generator().manual_seed(seed + 1)
    target = exact.gradient.double()
    mean, m2 = torch.zeros_like(target), 0.0
    for t in range(num_batches):
        batch = torch.randperm(n, generator=batches)[:batch_size]
        d = (minibatch_gradient(model, loss, views, batch, estimator="plain", generator=negatives).double()
             - minibatch_gradient(model, exact_loss, views, batch, estimator="corrected_fixed", generator=negatives).double())
        delta = d - mean
        mean += delta / (t + 1)
        m2 += float(delta @ (d - mean))
    trace_cov = m2 / (num_batches - 1)
    norm = float(target.norm())
    bias_sq = float(mean.pow(2).sum())
    return BiasEstimate(estimator="plain_paired", batch_size=batch_size, num_batches=num_batches,
                        relative_bias=math.sqrt(bias_sq) / norm, noise_floor=math.sqrt(trace_cov / num_batches) / norm,
                        relative_bias_debiased=math.sqrt(max(0.0, bias_sq - trace_cov / num_batches)) / norm,
                        relative_variance=trace_cov / norm**2, gradient_norm=norm, mean_gradient=mean)


def _write_table(folder: Path, name: str, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    atomic_write_text(folder / f"{name}.json", json.dumps(rows, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(folder / f"{name}.csv", buf.getvalue())


# ------------------------------------------------------------------------- report


def _comparison(name_a: str, a: list[float], name_b: str, b: list[float]) -> str:
    ma, mb = mean_std(a)[0], mean_std(b)[0]
    p, ci = _welch(a, b)
    if p is None:
        return f"{name_a} {ma:.4f} vs {name_b} {mb:.4f}: difference {ma - mb:+.4f}, no test (too few seeds or no spread)."
    if p < 0.05:
        verdict = "higher" if ma > mb else "lower"
        return (f"{name_a} {ma:.4f} vs {name_b} {mb:.4f}: difference {ma - mb:+.4f} (95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}], "
                f"Welch p = {p:.3f}): significantly {verdict}.")
    return (f"{name_a} {ma:.4f} vs {name_b} {mb:.4f}: difference {ma - mb:+.4f} (95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}], "
            f"Welch p = {p:.2f}): not distinguishable from seed noise.")


def _welch(a: list[float], b: list[float]) -> tuple[float | None, tuple[float, float] | None]:
    """Welch's p and 95% interval of mean(a) - mean(b), or (None, None) where undefined."""
    result = welch(a, b)
    return (None, None) if result is None else (result.p, (result.low, result.high))


def _pm(stat: tuple[float, float, int]) -> str:
    """A :func:`mean_std` as ``"m ± s"``, or ``"m"`` for one seed (no spread to show)."""
    m, sd, n = stat
    return f"{m:.3f} ± {sd:.3f}" if n > 1 else f"{m:.3f}"


def _bias_summary(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, tuple[float, float, int]]]:
    groups: dict[tuple[str, str, int], list] = defaultdict(list)
    for r in rows:
        groups[(r["phase"], r["estimator"], r["batch_size"])].append(r)
    out = {k: {m: mean_std(r[m] for r in v) for m in ("relative_bias_debiased", "relative_bias", "noise_floor", "relative_variance")}
           for k, v in groups.items()}
    for k, v in groups.items():
        if all("log_nu_minus_log_z_mean" in r for r in v):
            out[k]["log_nu_offset"] = (mean_std(r["log_nu_minus_log_z_mean"] for r in v)[0],
                                       mean_std(r["log_nu_minus_log_z_abs"] for r in v)[0])
    return out


def report(folder: Path) -> Path:
    """Figures and ``report.md`` from the study folder."""
    folder = Path(folder)
    spec = json.loads((folder / "study.json").read_text())
    b = spec["base"]
    full, half = spec["batch_size"], spec["batch_size"] // 2
    label_of = spec["conditions"]
    results = [r for r in read_results(folder) if r["run"] in label_of]
    by_label: dict[str, list] = defaultdict(list)
    for r in results:
        by_label[label_of[r["run"]]].append(r)
    labels = [c[0] for c in CONDITIONS if c[0] in by_label]
    pyplot = plt()
    text = [
        "# Study: minibatch gradient bias and the bias-corrected global loss\n\n",
        f"Data `{b['dataset']}` (train {b['n_train'] or 'all'}, test {b['n_test'] or 'all'}), encoder `{b['encoder']}` "
        f"{b['encoder_widths']}, head {b['head_widths']}, temperature {b['temperature']}, {training_length(b)}, "
        f"optimizer {b['optimizer']} lr {b['lr']} (the same for every condition), augmentation strength {b['aug_strength']}; "
        f"global loss: gamma {b['gamma']} ({b['gamma_schedule']}). Seeds {spec['seeds']}; mean ± sample std over seeds.\n",
    ]

    # (b) training.
    figures = []
    if labels:
        fig, ax = pyplot.subplots(figsize=(6.5, 3.6))
        for j, (metric, marker) in enumerate((("linear_acc", "o"), ("knn_acc", "s"))):
            st = [mean_std(r[metric] for r in by_label[l]) for l in labels]
            ax.errorbar([i + 0.12 * (j - 0.5) for i in range(len(labels))], [s[0] for s in st], yerr=[s[1] for s in st],
                        marker=marker, ls="", capsize=4, label=metric.replace("_acc", ""))
        ax.set_xticks(range(len(labels)), [l.replace(", ", "\n") for l in labels], fontsize=8)
        ax.set(ylabel="test accuracy", title=f"B = {full} (full), {half} (half); mean ± std over seeds")
        ax.legend()
        figures.append(("accuracy", save_figure(fig, folder / "accuracy.png")))
        table = []
        for l in labels:
            runs = by_label[l]
            table.append([l, runs[0]["loss"], runs[0]["batch_size"], len(runs), fmt_mean_std((r["linear_acc"] for r in runs), 4),
                          fmt_mean_std((r["knn_acc"] for r in runs), 4), ", ".join(f"{r['linear_acc']:.4f}" for r in sorted(runs, key=lambda r: r["seed"]))])
        text.append("\n## (b) Training: corrected loss at half the batch vs plain InfoNCE\n\n" + markdown_table(
            ["condition", "loss", "batch", "seeds", "linear acc", "kNN acc", "linear acc per seed"], table))
        acc = {l: [r["linear_acc"] for r in by_label[l]] for l in labels}
        knn = {l: [r["knn_acc"] for r in by_label[l]] for l in labels}
        p_full, p_half, g_half = (c[0] for c in CONDITIONS)
        findings = []
        if g_half in acc and p_full in acc:
            findings.append("Headline (corrected loss at half the batch vs plain at the full batch), linear: "
                            + _comparison(f"global B={half}", acc[g_half], f"InfoNCE B={full}", acc[p_full]))
            findings.append("Same, kNN: " + _comparison(f"global B={half}", knn[g_half], f"InfoNCE B={full}", knn[p_full]))
            findings.append(_verdict(acc[g_half], acc[p_full]))
        if g_half in acc and p_half in acc:
            findings.append("Correction at the same batch (global vs InfoNCE, both B=" + f"{half}), linear: "
                            + _comparison(f"global B={half}", acc[g_half], f"InfoNCE B={half}", acc[p_half]))
        if p_full in acc and p_half in acc:
            findings.append("Batch size for plain InfoNCE, linear: "
                            + _comparison(f"InfoNCE B={full}", acc[p_full], f"InfoNCE B={half}", acc[p_half]))
            p, _ = _welch(acc[p_full], acc[p_half])
            if not (p is not None and p < 0.05 and mean_std(acc[p_full])[0] > mean_std(acc[p_half])[0]):
                findings.append("The premise of the comparison, that plain InfoNCE loses accuracy when the batch is halved, "
                                "does not hold measurably here; so this setting cannot show the correction recovering it.")
        text.append("\n" + "\n".join(f"- {f}" for f in findings) + "\n")

    # (a) bias.
    bias_path = folder / "bias_results.json"
    rows = json.loads(bias_path.read_text()) if bias_path.exists() else []
    if rows:
        summary = _bias_summary(rows)
        phases = [p for p in ("init", "trained") if any(k[0] == p for k in summary)]
        for metric, name, ylabel in (("relative_bias_debiased", "bias_vs_batch", "relative bias ||E g_B - g|| / ||g|| (noise removed)"),
                                     ("relative_variance", "variance_vs_batch", "relative variance tr Cov(g_B) / ||g||^2")):
            fig, axes = pyplot.subplots(1, len(phases), figsize=(5.5 * len(phases), 4), squeeze=False)
            for ax, phase in zip(axes[0], phases):
                ests = [e for e in SHOWN if any(k[:2] == (phase, e) for k in summary)
                        and not (e == "plain_paired" and metric == "relative_variance")]  # a difference's variance
                for i, est in enumerate(ests):
                    keys = sorted(k for k in summary if k[:2] == (phase, est))
                    xs = [k[2] * (1 + 0.04 * (i - 2)) for k in keys]
                    st = [summary[k][metric] for k in keys]
                    # Error bars clipped at 0: both quantities are non-negative.
                    yerr = [[min(s[1], s[0]) for s in st], [s[1] for s in st]]
                    line = ax.errorbar(xs, [s[0] for s in st], yerr=yerr, marker="o", capsize=3, label=ESTIMATOR_LABELS[est],
                                       color=f"C{SHOWN.index(est)}")  # one colour per estimator in every panel
                    if metric == "relative_bias_debiased":
                        ax.plot(xs, [summary[k]["noise_floor"][0] for k in keys], ls=":", color=line[0].get_color(), alpha=0.7)
                ax.set_xscale("log", base=2)
                if metric == "relative_bias_debiased":
                    ax.set_yscale("symlog", linthresh=1e-2)
                    ax.set_ylim(bottom=0)
                else:
                    ax.set_yscale("log")
                ax.set(xlabel="batch size", ylabel=ylabel, title=f"{'at initialisation' if phase == 'init' else 'after training (global, B=' + str(half) + ')'}")
                ax.legend(fontsize=7)
            if metric == "relative_bias_debiased":
                fig.suptitle("dotted: Monte-Carlo noise floor of the same estimator (mean over seeds)", fontsize=8)
            figures.append((name, save_figure(fig, folder / f"{name}.png")))
        n = rows[0]["n"]
        text.append(f"\n## (a) Gradient bias against batch size\n\nOn the first {n} training samples with two fixed augmented "
                    f"views each (model in eval mode), {spec['num_batches']} random batches per point; the exact global "
                    f"gradient over all {n} samples. `bias` = sqrt(max(0, ||mean g_B − g||² − tr Cov/M)) / ||g|| (the "
                    "Monte-Carlo noise removed), `floor` = sqrt(tr Cov/M)/||g|| (what a bias-free estimator would show "
                    "before that correction), `var` = tr Cov(g_B)/||g||². The paired column measures the plain bias as "
                    "mean(g_plain(B) − g_exact-nu(B)) on the same batches (the exact-nu estimator is unbiased), whose "
                    "noise is far smaller; its `var` is that difference's. Mean ± std over seeds (one model per seed).\n")
        for phase in phases:
            ests = [e for e in SHOWN if any(k[:2] == (phase, e) for k in summary)]
            sizes = sorted({k[2] for k in summary if k[0] == phase})
            table = [[s] + [f"{_pm(summary[(phase, e, s)]['relative_bias_debiased'])} "
                            f"(floor {summary[(phase, e, s)]['noise_floor'][0]:.3f}; var {summary[(phase, e, s)]['relative_variance'][0]:.3g})"
                            for e in ests] for s in sizes]
            title = "At initialisation" if phase == "init" else f"After training (the global loss's run at B={half}; its running nu)"
            if phase == "trained":
                gl = mean_std(per_seed((r for r in rows if r["phase"] == "trained" and "global_loss" in r),
                                       "global_loss"))
                title += f", global loss {_pm(gl)}"
            text.append(f"\n### {title}\n\n" + markdown_table(["batch"] + [ESTIMATOR_LABELS[e] for e in ests], table))
        text.append("\n" + "\n".join(f"- {f}" for f in _bias_findings(summary, phases, half)) + "\n")
    text.append("\n" + "\n\n".join(f"![{name}]({path})" for name, path in figures) + "\n")
    bias_rows = ("; bias rows: `bias_results.csv` / `bias_results.json`" if (folder / "bias_results.json").exists()
                 else "")
    text.append("\nPer run: `results.csv` / `results.json` and `runs/*/metrics.jsonl` (the global runs log the surrogate as "
                f"`loss`, the batch InfoNCE as `infonce`){bias_rows}.\n")
    out = folder / "report.md"
    atomic_write_text(out, "".join(text))
    return out


def _verdict(corrected: list[float], plain_full: list[float]) -> str:
    diff = mean_std(corrected)[0] - mean_std(plain_full)[0]
    p, ci = _welch(corrected, plain_full)
    if p is not None and p < 0.05:
        word = "reproduces (the corrected loss at half the batch beats the plain loss at the full batch)" if diff > 0 else \
            "does not reproduce (the corrected loss at half the batch is worse than the plain loss at the full batch)"
        return f"**Verdict**: the paper's headline {word}, at this scale."
    if p is None:
        return "**Verdict**: too few seeds (or no spread) for a test."
    return (f"**Verdict**: at this scale the corrected loss at half the batch is not distinguishable from the plain loss at "
            f"the full batch (difference {diff:+.4f}, 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]): consistent with 'matches' only "
            f"within that interval; no evidence that it beats it.")


def _bias_findings(summary, phases, half) -> list[str]:
    out = []
    for phase in phases:
        sizes = sorted({k[2] for k in summary if k[:2] == (phase, "plain")})
        if not sizes:
            continue
        lo, hi = sizes[0], sizes[-1]
        p_lo, p_hi = summary[(phase, "plain", lo)], summary[(phase, "plain", hi)]
        where = "At initialisation" if phase == "init" else "After training"
        s = (f"{where}, the plain minibatch gradient's relative bias (noise removed) is "
             f"{_pm(p_lo['relative_bias_debiased'])} at batch "
             f"{lo} (raw {p_lo['relative_bias'][0]:.3f}, noise floor {p_lo['noise_floor'][0]:.3f}) and "
             f"{p_hi['relative_bias_debiased'][0]:.3f} at batch {hi} (floor {p_hi['noise_floor'][0]:.3f})")
        paired = [(b, summary[(phase, "plain_paired", b)]) for b in sizes if (phase, "plain_paired", b) in summary]
        if paired:
            # Against the exact-nu estimator on the same batches: most of the
            # batch noise cancels. Resolved: the raw value at least twice the
            # value a bias-free difference would show.
            resolved = [b for b, e in paired if e["relative_bias"][0] >= 2 * e["noise_floor"][0]]
            s += ". Paired with the exact-nu estimator on the same batches (most of the batch noise cancels), the "
            s += "plain bias is " + ", ".join(f"{e['relative_bias_debiased'][0]:.3f} (floor {e['noise_floor'][0]:.3f})"
                                              f" at {b}" for b, e in paired)
            s += (f": resolved (raw ≥ 2 floors) at batch sizes {resolved}" if resolved else
                  ": not resolved at any batch size (raw < 2 floors)")
            first, last = paired[0][1]["relative_bias_debiased"][0], paired[-1][1]["relative_bias_debiased"][0]
            s += "; it shrinks as the batch grows." if first > last else "; it does not shrink with the batch here."
        else:
            s += "."
        exact = [summary[(phase, "corrected_exact", b)] for b in sizes if (phase, "corrected_exact", b) in summary]
        if exact:
            worst = max(e["relative_bias_debiased"][0] / max(e["noise_floor"][0], 1e-12) for e in exact)
            s += (f" With nu = Z exactly the bias is at most {worst:.1f} noise floors at any batch size "
                  + ("(unbiased within the Monte-Carlo error)." if worst <= 1.5 else "(a residual beyond the Monte-Carlo error)."))
        if phase == "trained":
            off = [summary[k].get("log_nu_offset") for k in summary if k[0] == "trained" and summary[k].get("log_nu_offset")]
            if off:
                s += (f" The running log nu differs from the exact log Z of the measured views by {off[0][0]:+.3f} on average "
                      f"(mean |difference| {off[0][1]:.3f}): it tracked the model in training mode on fresh augmentations.")
            for est in ("corrected", "corrected_fixed"):
                if (phase, est, half) in summary and (phase, "plain", half) in summary:
                    s += (f" At batch {half}, {ESTIMATOR_LABELS[est]}: {summary[(phase, est, half)]['relative_bias_debiased'][0]:.3f} "
                          f"against plain {summary[(phase, 'plain', half)]['relative_bias_debiased'][0]:.3f}.")
        out.append(s)
    return out
