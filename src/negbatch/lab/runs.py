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

__all__ = [
    "atomic_write_text", "atomic_torch_save", "finished_run", "record_run", "load_checkpoint", "SUMMARY", "CONFIG"
]


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


def finished_run(
    run_dir: Path,
    identity: dict[str, Any],
    saved_identity: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any] | None:
    """Check ``run_dir`` for this configuration, writing nothing.

    Raises a ValueError naming the differing fields if the folder holds a run
    (finished or not) of another configuration (``saved_identity(saved
    config) != identity``). Returns the saved summary if this configuration's
    run already finished (nothing to do), else None. Call :func:`record_run`
    once the run's set-up has passed its checks, so that a run refused for bad
    input does not claim the folder.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a folder; pass another output folder")
    config_path = run_dir / CONFIG
    if config_path.exists():
        previous = saved_identity(_read_json(config_path))
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise ValueError(
                f"{run_dir} holds a run of a different configuration (differs in {', '.join(changed)}); "
                "use another folder"
            )
    if (run_dir / SUMMARY).exists():
        return _read_json(run_dir / SUMMARY)
    return None


def record_run(run_dir: Path, record: dict[str, Any]) -> None:
    """Make ``run_dir`` this configuration's folder (its ``config.json``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG, json.dumps(record, indent=2))


def load_checkpoint(path: Path, map_location: Any, required: tuple[str, ...]) -> dict[str, Any]:
    """``torch.load`` of a run's checkpoint, with an error that names the file
    and says what to do when it is damaged or from another version."""
    import torch

    try:
        state = torch.load(path, weights_only=True, map_location=map_location)
    except Exception as exc:  # torch raises RuntimeError, pickle errors, EOFError ...
        raise ValueError(
            f"{path} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); delete it to run again from the "
            f"start (metrics logged so far are then rewritten)"
        ) from exc
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(
            f"{path} lacks {missing}: it was written by another version of negbatch; delete it to run again "
            f"from the start"
        )
    return state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path} cannot be read ({exc}); it was not written by this version, or was damaged: "
            f"delete it (or the whole folder) to start that run again"
        ) from exc
