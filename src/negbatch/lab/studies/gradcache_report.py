"""The gradcache study's tables and report, from its folder alone: the
measurements aggregated per (batch size, method) -- median and min-max over
repeats -- and the accuracy of its short trainings."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..report import markdown_table, plt, save_figure
from ..folder import atomic_write_text
from ..stats import fmt_mean_std, mean_std, welch_p

__all__ = ["METHODS", "MIB", "aggregate", "write_table", "report"]

METHODS = ("plain", "accumulate", "cache")
MIB = 2.0**20


def _load_measurements(folder: Path) -> list[dict[str, Any]]:
    """The measurements of the study's plan (``study.json``: its batch sizes, methods and repeats);
    those of an earlier invocation with other ones stay in ``measurements/`` for a rerun of it."""
    found = [json.loads(p.read_text()) for p in sorted((folder / "measurements").glob("*.json"))]
    path = folder / "study.json"
    if not path.exists():
        return found
    plan = json.loads(path.read_text())
    return [m for m in found if m["batch_size"] in plan["batch_sizes"] and m["method"] in plan["methods"]
            and m.get("repeat", 0) < plan["repeats"]]


def aggregate(folder: Path) -> list[dict[str, Any]]:
    """One row per (batch size, method): median and min-max over repeats."""
    groups: dict[tuple[int, str], list] = {}
    for m in _load_measurements(folder):
        groups.setdefault((m["batch_size"], m["method"]), []).append(m)
    rows = []
    for (b, method), ms in sorted(groups.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1]))):
        ok = [m for m in ms if not m.get("oom")]
        row: dict[str, Any] = {"batch_size": b, "method": method, "repeats": len(ms), "oom": len(ms) - len(ok),
                               "chunk_size": ms[0]["chunk_size"] if method != "plain" else None}
        for key, scale in (("step_bytes", MIB), ("peak_bytes", MIB), ("time_s", 1.0), ("load", 1.0)):
            vals = [m[key] / scale for m in ok]
            name = {"step_bytes": "step_mib", "peak_bytes": "peak_mib"}.get(key, key)
            row[name] = statistics.median(vals) if vals else None
            if key != "load":
                row[name + "_min"] = min(vals) if vals else None
                row[name + "_max"] = max(vals) if vals else None
        rows.append(row)
    return rows


def write_table(folder: Path) -> list[dict[str, Any]]:
    import csv
    import io

    rows = aggregate(folder)
    atomic_write_text(folder / "results.json", json.dumps(rows, indent=1))
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_text(folder / "results.csv", buf.getvalue())
    return rows


# ------------------------------------------------------------------------ report


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _spread(row: dict[str, Any], key: str, spec: str) -> str:
    if row.get(key) is None:
        return "OOM" if row.get("oom") else "n/a"
    return f"{_fmt(row[key], spec)} [{_fmt(row[key + '_min'], spec)}–{_fmt(row[key + '_max'], spec)}]"


def report(folder: Path) -> Path:
    """Figures and ``report.md`` from the study folder's measurements and trainings."""
    folder = Path(folder)
    study = json.loads((folder / "study.json").read_text())
    rows = write_table(folder)
    spec = study["measure"]
    by = {(r["batch_size"], r["method"]): r for r in rows}
    batches = sorted({r["batch_size"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    chunk = spec["chunk_size"]
    pyplot = plt()

    # Figures 1-2: memory and time against batch size, per method (median, min-max bars).
    names = {}
    for key, label, fname in (("step_mib", "peak memory of one step over its baseline (MiB)", "memory_vs_batch.png"),
                              ("time_s", "time per step (s)", "time_vs_batch.png")):
        fig, ax = pyplot.subplots(figsize=(6, 4))
        for m in methods:
            pts = [(b, by[(b, m)]) for b in batches if (b, m) in by and by[(b, m)][key] is not None]
            if not pts:
                continue
            ys = [r[key] for _, r in pts]
            err = [[y - r[key + "_min"] for y, (_, r) in zip(ys, pts)], [r[key + "_max"] - y for y, (_, r) in zip(ys, pts)]]
            ax.errorbar([b for b, _ in pts], ys, yerr=err, marker="o", capsize=3, label=m)
        ax.set(xscale="log", yscale="log", xlabel="batch size B (pairs)", ylabel=label,
               title=f"{spec['data']}/{spec['encoder']}, chunk {chunk}, {spec['device']} (median, min–max)")
        ax.legend()
        names[key] = save_figure(fig, folder / fname)

    # The loss's own memory: one (2B x 2B) float32 logits matrix, and the
    # representations with their cached gradients (2B x d, twice).
    d = spec["head_widths"][-1]
    table = []
    for b in batches:
        line = [b]
        for m in methods:
            r = by.get((b, m))
            line += [_spread(r, "step_mib", ".1f") if r else "n/a", _spread(r, "time_s", ".4f") if r else "n/a"]
        cache, plain, accum = by.get((b, "cache")), by.get((b, "plain")), by.get((b, "accumulate"))
        ratio = lambda a, c, k: _fmt(a[k] / c[k], ".2f") if a and c and a.get(k) and c.get(k) else "n/a"  # noqa: E731
        line += [ratio(cache, plain, "time_s"), ratio(cache, accum, "time_s"), ratio(cache, plain, "step_mib"),
                 _fmt((2 * b) ** 2 * 4 / MIB, ".1f"), _fmt(2 * 2 * b * d * 4 / MIB, ".1f"),
                 _fmt(statistics.median([r["load"] for r in (plain, accum, cache) if r and r.get("load") is not None] or [float("nan")]), ".1f")]
        table.append(line)
    header = ["B"]
    for m in methods:
        header += [f"{m} MiB", f"{m} s"]
    header += ["cache/plain time", "cache/accum time", "cache/plain memory", "logits MiB (1 copy)", "reps+grads MiB", "load avg"]

    text = [
        "# Study: gradient caching — memory and time against batch size\n\n",
        f"Data `{spec['data']}`, the lab's `{spec['encoder']}` encoder {spec['encoder_widths']} with head {spec['head_widths']}, "
        f"SimCLR InfoNCE (all negatives, temperature {spec['temperature']}), device `{spec['device']}`, "
        f"{spec['threads']} torch thread(s). Chunk size {chunk} pairs for accumulation and caching. Each cell: median "
        f"[min–max] over {study['repeats']} fresh processes; memory is the peak of one step over the memory just before it "
        f"({_memory_source(folder)}), time the median of {spec['steps']} further steps. "
        "`plain`: both views in one pass, one loss; `accumulate`: a loss per chunk, so where B > "
        f"{chunk} each anchor sees only 2·{chunk}−2 negatives (fewer than the plain step's 2B−2: a different objective, "
        f"not a cheaper way to the same one; at B ≤ {chunk} one chunk holds the batch: the plain step); "
        "`cache`: GradCache, the plain step's loss and gradient (exact for encoders without BatchNorm; the lab's encoders "
        "normalise each chunk by its own statistics, as accumulation does).\n\n",
        markdown_table(header, table),
        f"\nThe last columns are the loss's share, which no chunking removes: one copy of the (2B×2B) logits and the "
        f"representations with their cached gradients (d = {d}). Machine load: the 1-minute load average during the "
        "measurements (timings on a shared machine are noisy; the ratios, measured side by side, are the robust part).\n",
    ]
    text.append("\n## What the data show\n\n" + "\n".join(f"- {f}" for f in _findings(by, batches, chunk, d)) + "\n")
    text.append(f"\n![memory vs batch]({names['step_mib']})\n\n![time vs batch]({names['time_s']})\n")

    acc_rows = _accuracy_rows(folder)
    if acc_rows:
        acc = study["accuracy"]
        groups: dict[tuple[int, str], list[float]] = {}
        for r in acc_rows:
            m = "plain" if r["chunk_size"] in (None, "", "None") else r["chunk_method"]
            groups.setdefault((int(r["batch_size"]), m), []).append(float(r["linear_acc"]))
        acc_batches = sorted({b for b, _ in groups})
        fig, ax = pyplot.subplots(figsize=(6, 4))
        for m in METHODS:
            pts = [(b, mean_std(groups[(b, m)])) for b in acc_batches if (b, m) in groups]
            ax.errorbar([b for b, _ in pts], [s[0] for _, s in pts], yerr=[s[1] for _, s in pts], marker="o", capsize=3, label=m)
        ax.set(xscale="log", xlabel="batch size B (pairs)", ylabel="test linear accuracy",
               title=f"{acc['epochs']} epoch{'s' if acc['epochs'] != 1 else ''}, chunk {acc['chunk_size']} "
                     f"(mean ± std over seeds)")
        ax.legend()
        fig_acc = save_figure(fig, folder / "accuracy_vs_batch.png")
        t = [[b] + [fmt_mean_std(groups.get((b, m), [])) for m in METHODS] for b in acc_batches]
        epochs = f"{acc['epochs']} epoch{'s' if acc['epochs'] != 1 else ''}"
        text.append(f"\n## Downstream linear accuracy\n\nShort trainings ({epochs}, Adam lr {acc['lr']}, "
                    f"seeds {acc['seeds']}; the same number of epochs at every B, so larger batches take fewer steps) "
                    f"with plain steps, accumulation and caching over chunks of {acc['chunk_size']} pairs; linear probe on "
                    "the test split, mean ± sample std over seeds.\n\n")
        text.append(markdown_table(["B", "plain", "accumulate", "cache"], t))
        text.append("\n" + "\n".join(f"- {f}" for f in _accuracy_findings(groups, acc_batches, acc["chunk_size"])) + "\n")
        text.append(f"\n![accuracy vs batch]({fig_acc})\n")
    text.append("\nRaw measurements: `measurements/*.json`; table: `results.csv` / `results.json`"
                + ("; trainings: `accuracy/results.csv`, `accuracy/runs/*`" if acc_rows else "") + ".\n")
    out = folder / "report.md"
    atomic_write_text(out, "".join(text))
    return out


def _memory_source(folder: Path) -> str:
    sources = {m.get("memory_source") for m in _load_measurements(folder) if not m.get("oom")}
    return ", ".join(sorted(s for s in sources if s)) or "n/a"


def _findings(by: dict, batches: list[int], chunk: int, d: int) -> list[str]:
    out = []
    full = [b for b in batches if by.get((b, "cache"), {}).get("time_s") and by.get((b, "plain"), {}).get("time_s")]
    if full:
        big = max(full)
        c, p = by[(big, "cache")], by[(big, "plain")]
        ratio = c["time_s"] / p["time_s"]
        overlap = c["time_s_min"] <= p["time_s_max"] and p["time_s_min"] <= c["time_s_max"]
        out.append(f"At the largest batch both ran (B = {big}) the cached step took {ratio:.2f}× the plain step's time"
                   + (" (their min–max ranges over repeats overlap: within the noise)" if overlap else "")
                   + f" — negbatch's own target ≤ 1.35: {'met' if ratio <= 1.35 else 'not met'}; the cost is the second "
                   f"forward of every chunk, plus a per-chunk overhead that weighs more for a small encoder — and "
                   f"{c['step_mib'] / max(p['step_mib'], 1e-9):.2f}× its memory.")
        small_b = [b for b in full if b > chunk]
        if small_b and min(small_b) != big:
            b0 = min(small_b)
            r0 = by[(b0, "cache")]["time_s"] / by[(b0, "plain")]["time_s"]
            trend = ("fell as the loss (which runs once in every method) took a larger share of the step" if ratio < r0
                     else "did not fall with B")
            out.append(f"The cache/plain time ratio {trend}: {r0:.2f}× at B = {b0}, {ratio:.2f}× at B = {big}.")
        a = by.get((big, "accumulate"))
        if a and a.get("time_s"):
            same = ("; at this B one chunk holds the whole batch, so accumulation is the plain step" if big <= chunk
                    else f"; accumulation is cheaper but optimises a different loss (negatives from its chunk of "
                         f"{chunk} pairs only)")
            out.append(f"Against gradient accumulation over the same chunks, caching took {c['time_s'] / a['time_s']:.2f}× "
                       f"the time (the paper reports about 1.2×){same}.")
    small = min(batches)
    s = by.get((small, "plain"))
    bigs = [b for b in batches if by.get((b, "cache"), {}).get("step_mib") is not None]
    if s and s.get("step_mib") and bigs:
        big = max(bigs)
        c = by[(big, "cache")]
        p = by.get((big, "plain"))
        logits = (2 * big) ** 2 * 4 / MIB
        line = (f"Memory: the cached step at B = {big} used {c['step_mib']:.1f} MiB, {c['step_mib'] / max(s['step_mib'], 1e-9):.1f}× "
                f"the plain step at B = {small} ({s['step_mib']:.1f} MiB)")
        if p and p.get("step_mib"):
            line += f" and {c['step_mib'] / p['step_mib']:.2f}× the plain step at B = {big} ({p['step_mib']:.1f} MiB)"
        budget = s["step_mib"] + logits + 2 * 2 * big * d * 4 / MIB
        line += (f". One copy of the B = {big} logits is {logits:.2g} MiB and the loss holds several (logits, softmax, "
                 f"their gradient); against the plain step at B = {small} plus one copy of the logits and the cached "
                 f"representations and gradients ({budget:.0f} MiB) the cached step is {c['step_mib'] / budget:.2f}× "
                 f"(negbatch's own target ≤ 1.25: {'met' if c['step_mib'] <= 1.25 * budget else 'not met'}). ")
        if p and p.get("step_mib") and c["step_mib"] > 0.7 * p["step_mib"]:
            line += ("For this encoder the loss, not the encoder's activations, dominates a large step, so caching saves "
                     "little here; it pays off when the encoder's activations per sample are large (a conv net, a "
                     "transformer) — try `--encoder conv --data fashion-mnist`.")
        else:
            line += "The encoder's activations dominated the plain step, and caching removed them."
        out.append(line)
    return out


def _accuracy_rows(folder: Path) -> list[dict[str, Any]]:
    path = folder / "accuracy" / "results.json"
    return json.loads(path.read_text()) if path.exists() else []


def _accuracy_findings(groups: dict, batches: list[int], chunk: int) -> list[str]:
    out = []
    for b in batches:
        c, a = groups.get((b, "cache")), groups.get((b, "accumulate"))
        if not c or not a or b <= chunk:
            continue
        p = welch_p(c, a)
        diff = mean_std(c)[0] - mean_std(a)[0]
        sure = ("beyond seed noise (Welch p < 0.05)" if p is not None and p < 0.05
                else "within seed noise" + (f" (Welch p = {p:.2f})" if p is not None else " (too few seeds or no spread for a test)"))
        out.append(f"B = {b}: caching minus accumulation = {diff:+.3f} linear accuracy, {sure}.")
    cached = [b for b in batches if (b, "cache") in groups]
    if len(cached) >= 2:
        lo, hi = min(cached), max(cached)
        m_lo, m_hi = mean_std(groups[(lo, "cache")])[0], mean_std(groups[(hi, "cache")])[0]
        p = welch_p(groups[(hi, "cache")], groups[(lo, "cache")])
        sure = p is not None and p < 0.05
        verdict = (f"Welch p = {p:.2g}" if p is not None else "too few seeds for a test")
        if m_hi > m_lo and sure:
            claim = "larger batches through the cache helped here, as the paper reports."
        elif m_hi < m_lo and sure:
            claim = ("larger batches were worse here (at a fixed number of epochs they also take fewer optimizer steps): "
                     "the paper's gain from larger batches does not reproduce at this scale.")
        elif p is None:  # one seed (or no spread): nothing to judge against
            claim = "with one seed per batch size there is no test: run several --seeds to judge the paper's claim."
        else:
            claim = ("no difference beyond seed noise: the paper's gain from larger batches does not show at this scale.")
        out.append(f"With caching, B = {hi} scored {m_hi:.3f} against {m_lo:.3f} at B = {lo} ({verdict}): {claim}")
    return out

