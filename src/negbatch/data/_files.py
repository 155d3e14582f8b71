"""Helpers shared by the file-format loaders: locating a data set's folder,
the message for a missing or damaged one, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, BinaryIO


class DatasetNotFoundError(FileNotFoundError):
    """A data set's folder lacks files. The message names the folder, the files
    expected and where to get them."""


class DatasetDamagedError(ValueError):
    """A data set's file cannot be read as its format says (truncated, wrong
    size, not the format, or refused as unsafe). The message names the file,
    the files expected and where to get them again."""


def find_folder(root: str | os.PathLike, subfolder: str, marker: str) -> Path:
    """``root`` itself if it holds ``marker``, else ``root/subfolder`` if that
    does (the folder an official archive unpacks to); else ``root``."""
    root = Path(root).expanduser()
    if not (root / marker).exists() and (root / subfolder / marker).exists():
        return root / subfolder
    return root


def missing_files(
    folder: Path, dataset: str, expected: Iterable[str], url: str, *, damaged: str | None = None
) -> DatasetNotFoundError | DatasetDamagedError:
    expected = list(expected)
    if damaged is not None:
        what = f"{dataset} in {folder} is damaged: {damaged}"
    else:
        missing = [f + (" (a folder there, not a file)" if (folder / f).is_dir() else "")
                   for f in expected if not (folder / f).is_file()]
        where = "does not exist" if not folder.exists() else f"lacks {', '.join(missing)}"
        what = f"{dataset} not found: {folder} {where}"
    error = DatasetDamagedError if damaged is not None else DatasetNotFoundError
    return error(
        f"{what}. Expected the files {', '.join(expected)} in that folder (or in the sub-folder the "
        f"official archive unpacks to). Get them from {url} and unpack the archive there; "
        "negbatch does not download data sets."
    )


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then
    rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
