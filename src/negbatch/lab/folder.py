"""A run's folder and what keeps it safe: atomic writes, the lock, the
configuration and data identity checks, and the clean stop on SIGINT/SIGTERM.

Shared by every loop that writes a lab run folder: :func:`negbatch.lab.run.train`
and the sentence-transformers path (:mod:`negbatch.lab.minilm`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import distributed as nbdist
from .config import TrainConfig

__all__ = ["RunFolder", "read_metrics", "hold_lock", "atomic_write_text", "atomic_torch_save", "resolve_device",
           "main_process", "CONFIG", "DATA", "METRICS", "SUMMARY", "CHECKPOINT", "LOCK"]

CONFIG = "config.json"
DATA = "data.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
#: A study folder's description (negbatch.lab.studies): never a run's folder.
STUDY = "study.json"
CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"


# ------------------------------------------------------------------ files


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` through a temporary file and ``os.replace``: an interrupted
    save leaves the previous checkpoint whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The metric rows of a run folder (a last line cut short by an interruption is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break  # a line cut short by an interruption; resuming rewrites it
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({err}); delete the run folder to start again") \
                from None
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path} cannot be read ({exc}); it was not written by this version, or was damaged: "
            f"delete it (or the whole folder) to start that run again"
        ) from exc


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)))


class RunFolder:
    """A run's folder: its lock, its claim (config and data), its checkpoint and rows.

    Parameters
    ----------
    path : path
        The folder (created when locked).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file, not a folder; pass another output folder")

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunFolder"]:
        """Hold the folder's lock: a second process using it gets an error naming the first.

        The lock is an ``flock`` on ``.lock``: the kernel releases it when the
        holder exits, even by ``kill -9``, so a crash never leaves it stuck.
        """
        with hold_lock(self.path):
            yield self

    def check(self, config: TrainConfig, data: dict[str, Any],
              earlier: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None) -> dict[str, Any] | None:
        """Refuse a folder that holds another configuration or other data; return
        the summary of this run if it already finished, else None.

        ``earlier(saved)`` gives the identity an earlier version recorded for the same data
        (or None): a ``data.json`` equal to it is this run's, and is rewritten as ``data``
        (the only file this check writes)."""
        config_path, data_path = self.path / CONFIG, self.path / DATA
        # A run that failed before its first checkpoint left its config and data but nothing trained.
        fresh = "" if self.checkpoint.exists() or (self.path / SUMMARY).exists() else (
            " (nothing was trained there yet, no checkpoint: delete the folder to start this run in it)")
        if (self.path / STUDY).exists():
            raise ValueError(
                f"{self.path} holds a study (its study.json): a run would write over the study's report; use "
                "another folder (a study keeps its runs in runs/ below it)"
            )
        if config_path.exists():
            saved = _read_json(config_path)
            try:
                previous = TrainConfig.from_dict(saved).identity()
            except ValueError:
                previous = saved  # a config of another version: every key differs below
            if previous != config.identity():
                raise ValueError(
                    f"{self.path} holds a run of a different configuration (differs in "
                    f"{_differences(previous, config.identity())}); use another folder{fresh}"
                )
        if data_path.exists():
            saved = _read_json(data_path)
            if saved != data and earlier is not None and earlier(saved) == saved:
                atomic_write_text(data_path, json.dumps(data, indent=2))  # once: later checks compare it as is
            elif saved != data:
                raise ValueError(
                    f"{self.path} holds a run on other data (differs in {_differences(saved, data)}: "
                    f"{saved.get('name')!r} {saved.get('fingerprint', '')[:12]} there, {data.get('name')!r} "
                    f"{data.get('fingerprint', '')[:12]} here); use another folder{fresh}"
                )
        if (self.path / SUMMARY).exists():
            return _read_json(self.path / SUMMARY)
        return None

    def claim(self, config: TrainConfig, data: dict[str, Any]) -> None:
        """Make the folder this run's (once its set-up has passed every check)."""
        atomic_write_text(self.path / CONFIG, json.dumps(config.to_dict(), indent=2))
        atomic_write_text(self.path / DATA, json.dumps(data, indent=2))

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def load_checkpoint(self, map_location: Any) -> dict[str, Any] | None:
        """The checkpoint, or None; an error that names the file and says what to do when damaged."""
        if not self.checkpoint.exists():
            return None
        try:
            state = torch.load(self.checkpoint, weights_only=True, map_location=map_location)
        except Exception as exc:  # torch raises RuntimeError, pickle errors, EOFError ...
            raise ValueError(
                f"{self.checkpoint} cannot be loaded ({type(exc).__name__}: {_first_sentence(exc)}); the file is "
                f"damaged or incomplete: delete it to run again from the start (the metrics logged so far are "
                f"then rewritten)"
            ) from exc
        missing = [k for k in ("model", "optimizer", "schedule", "sampler", "progress", "rng") if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"{self.checkpoint} lacks {missing}: it was written by another version of negbatch; "
                             f"delete it to run again from the start")
        return state

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(self.checkpoint, state)

    def keep_rows_until(self, step: int) -> list[dict[str, Any]]:
        """Drop the rows logged after ``step`` (written after the last checkpoint)."""
        rows = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write_text(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def write_summary(self, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        _write_csv(self.path / "metrics.csv", rows)
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2))


def _first_sentence(exc: BaseException, limit: int = 200) -> str:
    """The first sentence of an error's message, on one line (torch's run on for several)."""
    text = " ".join(str(exc).split())
    end = text.find(". ")
    text = text if end < 0 else text[:end]
    return text if len(text) <= limit else text[: text.rfind(" ", 0, limit)] + " [...]"


@contextlib.contextmanager
def hold_lock(folder: Path, *, reentrant: bool = False) -> Iterator[None]:
    """An exclusive, non-blocking lock on ``folder/.lock`` (creating the folder).

    Raises a ValueError naming the process that holds it. With ``reentrant``
    a lock this process already holds is taken again (a study holds its folder
    from its first write to its report, and the sweep inside it takes it too);
    otherwise a second holder in the same process is refused like any other.
    Platforms without ``fcntl`` run without the lock.
    """
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder: give another --out (a new or existing folder)")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if reentrant and key in _HELD:
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks of this kind
        yield
        return
    handle = open(folder / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(f"{folder} is in use by {holder}; wait for it to finish or stop it "
                             f"(or use another folder)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        handle.close()  # releases the lock
        if created:
            _remove_if_only_the_lock(folder)


def _remove_if_only_the_lock(folder: Path) -> None:
    """A folder made for a lock that holds nothing else when the lock ends (a run or study refused
    while setting up) is removed, so that a refused command leaves no empty folder behind."""
    if [p.name for p in folder.iterdir()] == [LOCK]:
        with contextlib.suppress(OSError):
            (folder / LOCK).unlink()
            folder.rmdir()


#: Folders this process holds the lock of (see :func:`hold_lock`).
_HELD: set[str] = set()


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available; a CUDA device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device='cpu'")
    device = torch.device(name)
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= count:
        # torch accepts the name and fails at the first tensor moved there, with a RuntimeError.
        raise ValueError(f"device={name!r} but this machine has {count} CUDA device{'s' if count != 1 else ''} "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); use device='cuda:0'")
    return device


# ----------------------------------------------------------- interruption


#: Set in a study's worker processes (:func:`stop_runs_when`): the event by
#: which the study asks the worker's run to stop after its step.
_study_stop: Any = None


def stop_runs_when(event: Any) -> None:
    """Make every run of this process stop after its current step (with a
    checkpoint) once ``event`` (a ``multiprocessing.Event``) is set: how a
    study stops its workers' runs whatever signal reached the study alone."""
    global _study_stop
    _study_stop = event


#: The signal that last asked this process to stop (None: none did); the
#: command's exit status is 128 + it, as a shell reports a process ended by it.
_stop_signal: int | None = None


def note_stop_signal(signum: int | None) -> None:
    """Remember that ``signum`` (SIGINT, SIGTERM) asked this process to stop;
    None forgets it (a command starting)."""
    global _stop_signal
    _stop_signal = None if signum is None else int(signum)


def stop_signal() -> int | None:
    """The signal that last asked this process to stop, or None."""
    return _stop_signal


def study_stopping() -> bool:
    """Whether this process's study asked its runs to stop (:func:`stop_runs_when`)."""
    return _study_stop is not None and _study_stop.is_set()


class _StopRequest:
    """Turns the first SIGINT / SIGTERM (or the study's event, see
    :func:`stop_runs_when`) into a request to stop after the current step
    (with a checkpoint); a second signal interrupts at once.

    Processes forked inside (DataLoader workers) inherit the handler; there it
    does nothing: the training process decides, and its workers end with it.
    """

    def __init__(self) -> None:
        self._signalled = False
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self._signalled or study_stopping()

    def __enter__(self) -> "_StopRequest":
        if hasattr(signal, "pthread_kill") and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked worker: Ctrl-C reaches it too, and it printed the message once more per worker
        note_stop_signal(signum)
        if self._signalled:
            raise KeyboardInterrupt
        self._signalled = True
        # Ctrl-C reaches every process of a torchrun, and a study's workers: the line once, by rank 0 or
        # by the study's process (which says how many runs stop), not once per process.
        if main_process() and _study_stop is None:
            print("\nstopping after this step (with a checkpoint); interrupt again to stop at once", file=sys.stderr,
                  flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def main_process() -> bool:
    """Whether this process speaks for the command: rank 0 of a process group (or of torchrun's
    variables, before the group exists), or a process alone. Every process runs the same code, so
    what one prints (a note, a warning, the stop line) the others would print N - 1 times more.
    (Here, not in :mod:`negbatch.lab.processes`, which imports this module: the stop request asks it.)"""
    if nbdist.is_distributed():
        return nbdist.rank() == 0
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0"


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()



def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
