"""Helpers for tests of training runs."""

TIMES = ("seconds", "embed_seconds", "order_seconds", "gap_seconds")


def without_times(rows):
    """Metric rows without their wall-clock entries (the only values a resumed run may change)."""
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]
