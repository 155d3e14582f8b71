"""Run folders: files written atomically, and one folder per configuration.

Shared by the image trainer, the text runs and the study sweeps (which import
the trainer, so this lives below all of them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

SUMMARY = "summary.json"
CONFIG = "config.json"

__all__ = ["atomic_write_text", "atomic_torch_save", "claim_run_dir", "SUMMARY", "CONFIG"]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` through a temporary file and ``os.replace``: an interrupted
    save leaves the previous checkpoint whole."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def claim_run_dir(
    run_dir: Path,
    record: dict[str, Any],
    identity: dict[str, Any],
    saved_identity: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any] | None:
    """Make ``run_dir`` this configuration's folder.

    Returns the saved summary if the run already finished (nothing to do).
    Raises a ValueError naming the differing fields if the folder holds a run
    of another configuration (``saved_identity(saved config) != identity``).
    Otherwise records ``record`` as the folder's config and returns None.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / SUMMARY).exists():
        return json.loads((run_dir / SUMMARY).read_text())
    config_path = run_dir / CONFIG
    if config_path.exists():
        previous = saved_identity(json.loads(config_path.read_text()))
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise ValueError(
                f"{run_dir} holds a run of a different configuration (differs in {', '.join(changed)}); "
                "use another folder"
            )
    atomic_write_text(config_path, json.dumps(record, indent=2))
    return None
