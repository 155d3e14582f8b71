"""Helpers for tests of training runs."""

TIMES = ("seconds", "embed_seconds", "order_seconds", "gap_seconds")


def without_times(rows):
    """Metric rows without their wall-clock entries (the only values a resumed run may change)."""
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def figures_not_drawn(monkeypatch):
    """Figures built but not rasterised (an empty file stands for each PNG), for a report whose figures
    were drawn and checked already: earlier in the same test, or by the tests of that report. The
    figures are still built from the folder's data, so a missing or malformed value still fails;
    matplotlib's drawing (up to a second a figure on a busy 2-core machine) would check nothing new."""

    from pathlib import Path

    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, fname, **kwargs: Path(fname).write_bytes(b""))
