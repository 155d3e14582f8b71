"""Report helpers: Markdown tables, matplotlib (Agg) figures written
atomically, and the report of one training run.

Studies import these (and the statistics of :mod:`negbatch.lab.stats`);
nothing here imports a study: the dispatch from a folder to its study's
report lives with the registry (:func:`negbatch.lab.studies.report_folder`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .folder import SUMMARY, atomic_write_text, read_metrics

__all__ = ["run_report", "plt", "save_figure", "markdown_table"]


def plt():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save_figure(fig, path: Path) -> str:
    """Save atomically; returns the file name (for Markdown links)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    plt().close(fig)
    return path.name


def training_length(config: dict[str, Any]) -> str:
    """``"2 epochs"`` or, for a run given by steps, ``"30 steps"`` (a report's header)."""
    if config.get("epochs") is not None:
        return f"{config['epochs']} epoch{'s' if config['epochs'] != 1 else ''}"
    return f"{config.get('steps')} steps"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_report(run_dir: Path) -> Path:
    """Report of one training run: loss / SNR curves and the final metrics."""
    summary = json.loads((run_dir / SUMMARY).read_text())
    rows = read_metrics(run_dir)
    pyplot = plt()
    # Rows before the first step an fp16 scaler took carry no SNR: the curve starts at the first that does.
    # The first ~1/(1 - beta) steps estimate the variance from too few gradients (one gradient: SNR
    # 1/sqrt(eps) = 1e6, which flattened the curve), as the studies' figures leave them out.
    burn_in = 1.0 / (1.0 - float(summary.get("config", {}).get("snr_beta", 0.95)))
    snr_rows = [r for r in rows if "snr_mean" in r]
    settled = [r for r in snr_rows if r["step"] > burn_in]
    snr_rows = settled or snr_rows  # a run shorter than the burn-in: every estimate (the title says so)
    # A run without SNR (snr = false) gets no SNR panel: an empty one titled by the burn-in said otherwise.
    fig, axes = pyplot.subplots(1, 2 if snr_rows else 1, figsize=(10 if snr_rows else 5, 3.5), squeeze=False)
    axes = axes[0]
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["loss"] for r in rows])
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    if snr_rows:
        snr_steps = [r["step"] for r in snr_rows]
        axes[1].plot(snr_steps, [r["snr_mean"] for r in snr_rows], label="mean over parameters")
        axes[1].plot(snr_steps, [r["snr_std"] for r in snr_rows], label="std across parameters")
        axes[1].legend()
        title = f"gradient SNR (from step {int(burn_in) + 1})" if settled else "gradient SNR (all within its burn-in)"
        axes[1].set(xlabel="step", ylabel="gradient SNR", title=title)
    name = save_figure(fig, run_dir / "curves.png")
    metrics = {k: v for k, v in summary.items() if k not in ("config", "data")}
    text = (
        f"# Training run `{run_dir.name}`\n\n"
        + markdown_table(["metric", "value"], [[k, f"{v:.4g}" if isinstance(v, float) else v] for k, v in metrics.items()])
        + f"\n![curves]({name})\n\n## Configuration\n\n```json\n{json.dumps(summary['config'], indent=1)}\n```\n"
        + f"\n## Data\n\n```json\n{json.dumps(summary.get('data'), indent=1)}\n```\n"
    )
    out = run_dir / "report.md"
    atomic_write_text(out, text)
    return out
