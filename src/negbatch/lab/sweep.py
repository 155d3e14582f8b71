"""Run many configurations into one study folder (images or text alike).

* each configuration trains in ``<study>/runs/<key>/`` where ``key`` is a
  readable prefix plus a hash of the full configuration, so a rerun finds the
  runs it already finished (``summary.json`` present) and skips them, and an
  interrupted run resumes from its checkpoint;
* runs execute with one torch thread each, in this process or in several
  worker processes (``workers > 1``), so that a run's results do not depend
  on the number of workers;
* the results table (``results.json`` and ``results.csv``, one row per run:
  its configuration and its metrics) is rewritten atomically after every run,
  so an interruption loses nothing already written.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import TrainConfig
from .processes import Processes
from .folder import (_main_thread, _say, atomic_write_text, hold_lock, note_stop_signal, stop_runs_when,
                     study_stopping)
from .run import train

__all__ = ["RunStopped", "torch_threads", "run_key", "former_run_key", "adopt_earlier_runs", "run_configs", "run_jobs",
           "write_results", "read_results", "parse_list"]

KEY_FIELDS = ("loss", "negatives", "temperature", "lr", "seed")


def run_key(cfg: TrainConfig, fields: tuple[str, ...] = KEY_FIELDS) -> str:
    """Folder name of a run: the named fields, then 10 hex digits of the config's identity's hash."""
    return _key(cfg, fields, cfg.identity())


def former_run_key(cfg: TrainConfig, fields: tuple[str, ...] = KEY_FIELDS) -> str:
    """The folder name :func:`run_key` gave until 2026-12-03, when the hash took ``log_every`` and
    ``device`` too (:meth:`~negbatch.lab.config.TrainConfig.former_identity`)."""
    return _key(cfg, fields, cfg.former_identity())


def _key(cfg: TrainConfig, fields: tuple[str, ...], identity: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    prefix = "-".join(f"{f}={getattr(cfg, f)}" for f in fields)
    return f"{prefix}-{digest}".replace("/", "_")


def adopt_earlier_runs(study_dir: str | os.PathLike, configs: list[TrainConfig],
                       fields: tuple[str, ...] = KEY_FIELDS) -> int:
    """Rename the run folders of ``configs`` still named by their former key (:func:`former_run_key`) to
    their key, and their rows of the results table with them, so that a rerun skips what they finished
    and resumes what they did not; returns how many. The caller holds the study folder's lock."""
    runs = Path(study_dir) / "runs"
    renamed: dict[str, str] = {}
    for cfg in configs if runs.is_dir() else ():
        old, new = runs / former_run_key(cfg, fields), runs / run_key(cfg, fields)
        if old.is_dir() and not new.exists():
            with hold_lock(old):  # a run another process still trains there is refused, not moved
                os.replace(old, new)
            renamed[old.name] = new.name
    path = Path(study_dir) / "results.json"
    if renamed and path.exists():
        try:
            rows = json.loads(path.read_text())
        except ValueError:
            return len(renamed)  # a damaged table: the runs rewrite it
        _write_rows(Path(study_dir), [{**r, "run": renamed.get(r.get("run"), r.get("run"))} if isinstance(r, dict)
                                      else r for r in rows])
    return len(renamed)


@contextlib.contextmanager
def torch_threads(threads: int = 1) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the caller's count.

    A float result of torch depends on the thread count (how a reduction is
    split): a measurement that a report quotes runs under one thread, as every
    run does, so that it does not depend on the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class RunStopped(KeyboardInterrupt):
    """A run stopped on request (SIGINT / SIGTERM) after writing its checkpoint:
    the study stops too, as on Ctrl-C; rerunning it resumes that run."""


def _train_one(cfg_dict: dict[str, Any], run_dir: str, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    summary = train(TrainConfig.from_dict(cfg_dict), run_dir)
    if summary is None:
        raise RunStopped(f"{run_dir} stopped on request with a checkpoint")
    return {**summary, "run": Path(run_dir).name}


def _flatten(summary: dict[str, Any]) -> dict[str, Any]:
    """The run's results, then its configuration's fields: ``steps`` is the
    number of steps the run took, also when the configuration gave epochs."""
    row = {k: v for k, v in summary.items() if k != "config"}
    for k, v in summary["config"].items():
        row.setdefault(k, ",".join(map(str, v)) if isinstance(v, list) else v)
    return row


def write_results(study_dir: Path, summaries: list[dict[str, Any]]) -> None:
    """``results.json`` and ``results.csv``: one flat row per run (config + metrics)."""
    _write_rows(study_dir, sorted((_flatten(s) for s in summaries), key=lambda r: r["run"]))


def keep_results(study_dir: Path, runs: set[str]) -> int:
    """Rewrite the results table with only the rows of ``runs`` (the runs of this
    invocation's plan that finished earlier); returns how many rows left it."""
    path = Path(study_dir) / "results.json"
    if not path.exists():
        return 0
    try:
        rows = json.loads(path.read_text())
    except ValueError:
        return 0
    kept = [r for r in rows if isinstance(r, dict) and r.get("run") in runs]
    if not kept:  # no finished run of this plan: no table, as before its first run
        for name in ("results.json", "results.csv"):
            (Path(study_dir) / name).unlink(missing_ok=True)
    elif len(kept) != len(rows):
        _write_rows(study_dir, kept)
    return len(rows) - len(kept)


def _write_rows(study_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(Path(study_dir) / "results.json", json.dumps(rows, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(Path(study_dir) / "results.csv", buf.getvalue())


def read_results(study_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(study_dir) / "results.json"
    rebuild = ("run the study's command again (it skips the finished runs and rewrites the table), then "
               "report")
    if not path.exists():
        if (Path(study_dir) / "study.json").exists():
            finished = sum(1 for _ in (Path(study_dir) / "runs").glob("*/summary.json"))
            if finished:  # the table deleted, or a rerun with other options stopped before its first run ended
                raise ValueError(f"{study_dir} has no finished run in its table (no results.json), though "
                                 f"{finished} run(s) under {Path(study_dir) / 'runs'} finished (the table deleted, "
                                 f"or runs of an earlier command with other options): {rebuild}")
            raise ValueError(f"{study_dir} has no finished run yet (no results.json): run the study until one "
                             f"run has finished, then report")
        raise ValueError(f"{study_dir} has no results.json: is it a study folder?")
    try:
        rows = json.loads(path.read_text())
    except ValueError as err:  # cut short (a full disk, a copy killed half-way) or edited by hand
        raise ValueError(f"{path} is damaged (not valid JSON: {err}): {rebuild}") from None
    if not rows:
        raise ValueError(f"{study_dir} has no finished run yet: run the study until one run has finished, then "
                         f"report")
    return rows


def run_configs(
    configs: list[TrainConfig],
    study_dir: str | os.PathLike,
    *,
    workers: int = 1,
    key_fields: tuple[str, ...] = KEY_FIELDS,
    on_done: Callable[[dict[str, Any], int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every configuration (skipping finished ones) and keep the results table current.

    Parameters
    ----------
    configs : list of TrainConfig
        Image or text configurations (a study may mix them).
    study_dir : path
    workers : int, default 1
        Worker processes (spawned; each uses one torch thread). 1 runs in this process.
    key_fields : tuple of str
        The fields that name each run's folder (before its hash).
    on_done : callable(summary, done, total), optional
        Called after each run (progress reporting).

    Returns
    -------
    list of dict: one summary per configuration, with its folder name under ``"run"``.

    Examples
    --------
    >>> import tempfile
    >>> from negbatch.lab import TrainConfig
    >>> base = TrainConfig(dataset="builtin", test_fraction=0.25, batch_size=8, steps=1, text_dim=16, text_heads=2,
    ...                    vocab_size=600)
    >>> rows = run_configs([base, base.replace(seed=1)], tempfile.mkdtemp())
    >>> len(rows)
    2
    """
    study_dir = Path(study_dir)
    if Processes.current().is_main and (study_dir / "runs").is_dir():
        with hold_lock(study_dir, reentrant=True):
            adopt_earlier_runs(study_dir, configs, key_fields)
    jobs = [(c.to_dict(), str(study_dir / "runs" / run_key(c, key_fields))) for c in configs]
    return run_jobs(jobs, study_dir, _train_one, workers=workers, on_done=on_done)


def run_jobs(
    jobs: list[tuple[dict[str, Any], str]],
    study_dir: str | os.PathLike,
    train_one: Callable[[dict[str, Any], str, int | None], dict[str, Any]],
    *,
    workers: int = 1,
    on_done: Callable[[dict[str, Any], int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``train_one(config_dict, run_dir, threads)`` for every job, in this
    process or in ``workers`` spawned processes (one torch thread each, in
    either case), and rewrite the study's results table atomically after
    each run.

    ``train_one`` must be a module-level function (it is pickled for the
    workers) that skips a finished run folder and returns the run's summary.
    """
    check_workers(workers)
    study_dir = Path(study_dir)
    if len({d for _, d in jobs}) != len(jobs):
        raise ValueError("two configurations of the study are identical; remove the duplicates")
    procs = Processes.current()
    with hold_lock(study_dir, reentrant=True) if procs.is_main else contextlib.nullcontext():
        return _run_jobs(jobs, study_dir, train_one, workers, on_done, procs.is_main)


def check_workers(workers: object, name: str = "workers") -> None:
    """``workers`` (the option ``name``) is a positive int, and 1 under torchrun, whose processes
    train each run together."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{name} must be a positive int, got {workers!r}")
    procs = Processes.current()
    if procs.several and workers > 1:
        raise ValueError(f"workers={workers} under {procs.world_size} torchrun processes: the processes train each run "
                         "together, one run at a time; use workers=1")


def _run_jobs(jobs, study_dir: Path, train_one, workers: int, on_done, writes: bool) -> list[dict[str, Any]]:
    if writes:
        (study_dir / "runs").mkdir(parents=True, exist_ok=True)
    summaries: list[dict[str, Any]] = []

    def done(summary: dict[str, Any]) -> None:
        summaries.append(summary)
        if not writes:  # under torchrun: every process trains, rank 0 keeps the table
            return
        write_results(study_dir, summaries)
        if on_done is not None:
            on_done(summary, len(summaries), len(jobs))

    if workers == 1:
        # One torch thread here too, as in a worker: a run's float results
        # depend on the thread count, and must not on the number of workers.
        with torch_threads(1):
            for cfg_dict, run_dir in jobs:
                done(train_one(cfg_dict, run_dir, 1))
    else:
        ctx = multiprocessing.get_context("spawn")
        stopping, running = ctx.Event(), ctx.Value("i", 0)
        with cf.ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_start_worker,
            initargs=(os.getpid(), stopping, running)
        ) as pool:
            try:
                with _sigint_blocked():  # the workers start (in the first submits) with Ctrl-C blocked
                    futures = [pool.submit(_unless_stopping, train_one, c, d, 1) for c, d in jobs]
                with terminate_as_interrupt():
                    for fut in cf.as_completed(futures):
                        done(fut.result())
            except BaseException:
                # Ctrl-C reaches every process of the terminal's group, but a signal to this process alone
                # (kill, a scheduler) or a worker's stopped run must stop the study too: the running runs
                # stop after their step, with a checkpoint, and no other starts.
                stopping.set()
                workers = list((getattr(pool, "_processes", None) or {}).values())  # shutdown drops them
                # The pool cancels what no worker took (a future cancelled by hand stayed in its table, and a
                # worker ended below made it fail on it: "InvalidStateError: CANCELLED", a traceback).
                pool.shutdown(wait=False, cancel_futures=True)
                _end_workers(workers, running)
                raise
    return summaries


def _end_workers(workers: list, running: Any) -> None:
    """Wait for the workers of a stopping study, or end them.

    With no run in progress (``running``: the workers' count), nothing needs a checkpoint: the
    workers end now. Those still starting would import torch for seconds (silent; a minute on a
    busy machine) only to learn that the study stopped, and a second Ctrl-C meanwhile left the
    study's process gone and them failing to start, a traceback each. With runs in progress, their
    runs stop after their step with a checkpoint; a second interrupt ends every worker at once (a
    run keeps its last checkpoint, written atomically). Either way the workers are gone when the
    study's process ends: none outlives it, none holds a run folder's lock."""
    if running.value == 0:
        _signal_workers(workers, signal.SIGTERM)  # a worker in set-up, or idle, ends silently on it
    else:
        _say(f"stopping: {running.value} running run(s) stop after their step, with a checkpoint; interrupt again "
             "to stop at once")
    try:
        for process in workers:
            process.join()
    except KeyboardInterrupt:
        _signal_workers(workers, signal.SIGKILL)
        for process in workers:
            process.join()


def _signal_workers(workers: list, signum: int) -> None:
    for process in workers:
        with contextlib.suppress(ProcessLookupError, TypeError):  # ended already (no pid: never started)
            os.kill(process.pid, signum)


#: In a worker: the study's count of runs in progress (see :func:`_end_workers`).
_running: Any = None


def _unless_stopping(train_one, cfg_dict: dict[str, Any], run_dir: str, threads: int | None) -> dict[str, Any]:
    """``train_one``, in a worker, unless the study is stopping (a run the
    pool had already handed to the worker); counted as running meanwhile."""
    if study_stopping():
        raise RunStopped(f"{run_dir} not started: the study is stopping")
    _count_running(+1)
    try:
        return train_one(cfg_dict, run_dir, threads)
    finally:
        _count_running(-1)


def _count_running(change: int) -> None:
    if _running is not None:
        with _running.get_lock():
            _running.value += change


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (a scheduler's, ``kill``'s) raises KeyboardInterrupt here, as
    SIGINT does, so that a study stops its workers' runs cleanly, and a
    command anywhere outside a training loop keeps what finished, instead of
    dying at once."""
    if not _main_thread():
        yield
        return

    def interrupt(signum, frame):
        note_stop_signal(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread for the block: the processes it spawns
    inherit the mask through exec, so a Ctrl-C while they import torch waits
    for them (see :func:`_start_worker`) instead of killing them mid-import
    with a traceback each. Here a Ctrl-C is delivered when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_worker(parent_pid: int, stopping: Any, running: Any = None) -> None:
    """Worker initializer: its runs stop after their step once the study sets
    ``stopping``, and count themselves in ``running`` while they train; the
    worker ends with the study's process.

    Outside a run the worker ignores SIGINT (a Ctrl-C reaches every process of
    the terminal's group): the study's process takes it and sets ``stopping``.
    A worker that took it while idle, or while starting, died with a
    traceback and broke the pool. A run still takes it (its stop request
    installs its own handler), to stop after its step."""
    if hasattr(signal, "pthread_sigmask"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # first: a Ctrl-C pending since the spawn is then dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    stop_runs_when(stopping)
    global _running
    _running = running
    _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    """End this worker when the study's process ends.

    Without it, a study killed with ``kill``, ``timeout`` or a scheduler leaves
    its workers training on (orphans), and a rerun would train the same run
    folders beside them. Linux only (``prctl(PR_SET_PDEATHSIG)``); the runs'
    checkpoints are written atomically, so the rerun resumes them.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent was gone before prctl took effect
        os._exit(1)


def parse_list(text: str, convert: Callable[[str], Any], name: str, *, unique: bool = False) -> list:
    """A study option's comma list (``"1,2,all"``), converted item by item.

    Errors name the option (``--name``): a value ``convert`` rejects, an empty
    list, or (with ``unique``) a value given twice.
    """
    items = str(text).replace(" ", "").split(",")
    if not any(items):
        raise ValueError(f"--{name} must list at least one value")
    if "" in items:  # '0,,1' or '0,': a value lost in typing, not one to drop silently
        raise ValueError(f"--{name}: an empty value in {text!r} (two commas in a row, or one at an end); "
                         "separate the values by single commas")
    try:
        out = [convert(t) for t in items]
    except ValueError as err:
        raise ValueError(f"--{name}: {err}") from None
    if unique and len(set(out)) != len(out):
        raise ValueError(f"--{name} lists a value twice: {text}")
    return out
