"""Helpers for tests of training runs."""

TIMES = ("seconds", "embed_seconds", "order_seconds", "gap_seconds")


def without_times(rows):
    """Metric rows without their wall-clock entries (the only values a resumed run may change)."""
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def figures_not_drawn(monkeypatch):
    """A report drawn again after its figures were checked: the figures are still built from the
    folder's data, but not rasterised (an empty file stands for each PNG). matplotlib's drawing is
    about a second a figure on a busy 2-core machine, and this drawing checked nothing new: the
    first report came from the same folder through the same code."""
    from pathlib import Path

    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, fname, **kwargs: Path(fname).write_bytes(b""))
