"""One training run, whatever its task: :func:`train`.

Read :func:`train` top to bottom: it locks the run folder, loads the data
(through the task), checks the folder against the configuration and the
data, builds the model, optimizer and random streams, resumes from the last
checkpoint, loops over epochs and batches (logging, checkpointing, stopping
cleanly on Ctrl-C or SIGTERM) and finally evaluates. Everything that differs
between images and text pairs is behind a :class:`~negbatch.lab.tasks.Task`
(see :mod:`negbatch.lab.tasks`): the data, the model, the batches, one step,
the evaluation.

A run folder holds ``config.json`` (the configuration), ``data.json`` (what
identifies the data), ``metrics.jsonl`` / ``metrics.csv`` (one row per
``log_every`` steps), ``checkpoint.pt`` (every ``checkpoint_minutes`` and
``checkpoint_every`` steps, and at the end) and ``summary.json`` (the final
metrics). Each file is written atomically, so an interruption at any moment
leaves the last good checkpoint and rows that resuming truncates to it.
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
from typing import Any, Iterator

import torch

from ..diagnostics import GradientSNR
from .config import TrainConfig
from .optim import build_optimizer, build_schedule
from .precision import Precision
from .processes import Processes

__all__ = ["train", "RunFolder", "RandomStreams", "read_metrics", "CHECKPOINT", "METRICS", "SUMMARY", "CONFIG",
           "DATA", "atomic_write_text", "atomic_torch_save", "resolve_device"]

CONFIG = "config.json"
DATA = "data.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
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

    def check(self, config: TrainConfig, data: dict[str, Any]) -> dict[str, Any] | None:
        """Refuse a folder that holds another configuration or other data; return
        the summary of this run if it already finished, else None. Writes nothing."""
        config_path, data_path = self.path / CONFIG, self.path / DATA
        if config_path.exists():
            saved = _read_json(config_path)
            try:
                previous = TrainConfig.from_dict(saved).identity()
            except ValueError:
                previous = saved  # a config of another version: every key differs below
            if previous != config.identity():
                raise ValueError(
                    f"{self.path} holds a run of a different configuration (differs in "
                    f"{_differences(previous, config.identity())}); use another folder"
                )
        if data_path.exists():
            saved = _read_json(data_path)
            if saved != data:
                raise ValueError(
                    f"{self.path} holds a run on other data (differs in {_differences(saved, data)}: "
                    f"{saved.get('name')!r} {saved.get('fingerprint', '')[:12]} there, {data.get('name')!r} "
                    f"{data.get('fingerprint', '')[:12]} here); use another folder"
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
def hold_lock(folder: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on ``folder/.lock`` (creating the folder).

    Raises a ValueError naming the process that holds it. Platforms without
    ``fcntl`` run without the lock.
    """
    folder.mkdir(parents=True, exist_ok=True)
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
        yield
    finally:
        handle.close()  # releases the lock


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------- random streams


class RandomStreams:
    """Every random stream of a run, saved and restored together.

    * torch's global generator (and CUDA's): model initialisation, dropout;
    * ``augment``: the views of each batch (seeded ``seed + 1``);
    * ``loss``: sampled negatives (seeded ``seed + 2``).

    The batch order is the sampler's own state.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.augment = torch.Generator().manual_seed(seed + 1)
        self.loss = torch.Generator().manual_seed(seed + 2)

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "augment": self.augment.get_state(), "loss": self.loss.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        self.augment.set_state(state["augment"])
        self.loss.set_state(state["loss"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available; a CUDA device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device='cpu'")
    return torch.device(name)


# ----------------------------------------------------------- interruption


class _StopRequest:
    """Turns the first SIGINT / SIGTERM into a request to stop after the
    current step (with a checkpoint); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if hasattr(signal, "pthread_kill") and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (with a checkpoint); interrupt again to stop at once", file=sys.stderr,
              flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------- train


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    data: Any = None,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """Train one configuration in ``run_dir``, resuming from its checkpoint.

    A finished run is not trained again: its summary is returned. A folder
    holding another configuration or other data is refused, as is a folder
    another process is using.

    Under ``torchrun`` (or in an initialised process group) every process
    calls this function: the model is wrapped in DistributedDataParallel, each
    process trains on its share of every global batch of ``batch_size``, the
    losses contrast with every process's embeddings (``gather=True``), and
    rank 0 alone writes the folder. With ``norm="none"`` (or ``"sync"`` on
    GPUs) the run equals a single-process run of the same global batch.

    Parameters
    ----------
    cfg : TrainConfig
        Images or text pairs, by ``cfg.dataset``.
    run_dir : path
    data : optional
        Use this data set instead of loading ``cfg.dataset``: an
        :class:`~negbatch.data.ImageDataset` for images (``n_train`` /
        ``n_test`` still apply), a ``(train, test)`` pair of
        :class:`~negbatch.data.text.TextPairs` for text.
    stop_after : int, optional
        Stop (with a checkpoint) once this many steps are done, as an
        interruption would; returns None. For tests and time-sliced runs.

    Returns
    -------
    dict or None: the summary (config, data, evaluation metrics, losses, time),
    on every process.

    Examples
    --------
    >>> import tempfile
    >>> from negbatch.lab import TrainConfig, train
    >>> cfg = TrainConfig(n_train=128, n_test=64, batch_size=32, epochs=1,
    ...                   encoder_widths=(32,), head_widths=(32, 16))
    >>> summary = train(cfg, tempfile.mkdtemp())
    >>> 0.0 <= summary["linear_acc"] <= 1.0
    True
    """
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    if cfg.encoder == "minilm":  # sentence-transformers' trainer runs the loop, in the same kind of folder
        from .minilm import train_minilm

        return train_minilm(cfg, run_dir, data=data, stop_after=stop_after)
    procs = Processes.start(cfg.device)
    try:
        folder = RunFolder(run_dir)
        with folder.locked() if procs.is_main else contextlib.nullcontext():
            return _train(cfg, folder, procs, data, stop_after)
    finally:
        procs.close()


def _train(cfg: TrainConfig, folder: RunFolder, procs: Processes, data: Any, stop_after: int | None):
    from .tasks import make_task

    device = procs.device(cfg.device)
    task = procs.check_all(lambda: make_task(cfg, device, data))  # loads the data: errors about it come first
    finished = procs.on_main(lambda: folder.check(cfg, task.data_identity))
    if finished is not None:
        return finished

    # Model, objective, batches, optimisation: every check passes before the folder is claimed.
    torch.manual_seed(cfg.seed)
    precision = Precision(cfg.precision, device)
    task.precision = precision
    procs.check_all(task.build)
    task.net = _network(cfg, task.model, procs, device)
    optimizer = build_optimizer(cfg, task.parameters())
    total_steps = cfg.total_steps(len(task.sampler))
    schedule = build_schedule(cfg, optimizer, total_steps)
    streams = RandomStreams(cfg.seed, device)
    snr = GradientSNR(task.model, beta=cfg.snr_beta) if cfg.snr else None
    if procs.is_main:
        folder.claim(cfg, task.data_identity)

    # Resume every piece of state, or start: the task's pre-training work, then the seed again,
    # so that training draws the same numbers whatever that work consumed.
    progress = {"step": 0, "epoch": 0, "position": 0, "seconds": 0.0}
    ckpt = procs.on_main(lambda: folder.load_checkpoint("cpu"))
    if ckpt is not None:
        _check_world_size(ckpt, procs, task, folder)
        task.model.load_state_dict(ckpt["model"])
        task.sampler.load_state_dict(ckpt["sampler"])
        task.load_state_dict(ckpt)
        if snr is not None:
            snr.load_state_dict(ckpt["snr"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        precision.load_state_dict(ckpt.get("precision", {}))
        rng = ckpt["rng"]  # rank 0's streams: all a one-process run needs
        if procs.several and ckpt.get("world_size", 1) == procs.world_size:
            rng = {**rng, **ckpt["rng_ranks"][procs.rank]}  # each process's own torch (and CUDA) stream
        streams.load_state_dict(rng)
        progress = dict(ckpt["progress"])
        if procs.is_main:
            _say(f"{folder.path}: resuming from step {progress['step']} of {total_steps}")
    else:
        task.before_training()
        torch.manual_seed(cfg.seed)
    rows = folder.keep_rows_until(progress["step"]) if procs.is_main else []

    def save_checkpoint() -> None:
        # The augmentation and loss streams are the same on every process; torch's own (dropout) is not.
        own_rng = {k: v for k, v in streams.state_dict().items() if k in ("torch", "cuda")}
        rng_ranks = procs.gather(own_rng) if procs.several else None
        if procs.is_main:
            folder.save_checkpoint({
                "model": task.model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "sampler": task.sampler.state_dict(position=progress["position"]),
                "snr": snr.state_dict() if snr is not None else {}, "rng": streams.state_dict(),
                **({"rng_ranks": rng_ranks} if rng_ranks else {}), "world_size": procs.world_size,
                "precision": precision.state_dict(),
                "progress": dict(progress), "step": progress["step"], "config": cfg.to_dict(), **task.state_dict(),
            })

    bar = _progress_bar(cfg, total_steps, progress["step"], folder.path.name) if procs.is_main else None
    log = open(folder.path / METRICS, "a") if procs.is_main else None
    session_start = time.perf_counter()
    seconds_before = progress["seconds"]
    last_save = time.monotonic()
    stopped = False
    try:
        with _StopRequest() as stop:
            task.model.train()
            while progress["step"] < total_steps:
                epoch = progress["epoch"]
                task.sampler.set_epoch(epoch)
                epoch_row = task.start_epoch(epoch) if progress["position"] == 0 else {}
                for batch in task.batches(streams):
                    optimizer.zero_grad(set_to_none=True)
                    loss = task.step(batch, streams)
                    if snr is not None:
                        snr.update()
                    lr = optimizer.param_groups[0]["lr"]
                    precision.step(optimizer)
                    schedule.step()
                    progress["step"] += 1
                    progress["position"] += 1
                    progress["seconds"] = seconds_before + time.perf_counter() - session_start
                    step = progress["step"]
                    if step % cfg.log_every == 0 or step == total_steps or epoch_row:
                        row = {"step": step, "epoch": epoch, "loss": procs.mean(loss), "lr": lr,
                               "seconds": progress["seconds"], **task.step_metrics(),
                               **(snr.summary() if snr is not None else {}), **epoch_row}
                        epoch_row = {}  # the epoch's diagnostics go with its first logged step
                        if log is not None:
                            rows.append(row)
                            log.write(json.dumps(row) + "\n")
                            log.flush()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{float(loss):.3f}")
                    if progress["position"] == len(task.sampler):
                        progress["epoch"], progress["position"] = epoch + 1, 0
                    if step == total_steps:
                        break
                    # Rank 0's clock and any rank's signal decide, for all ranks together.
                    due, stop_now = procs.any(
                        bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                        or bool(cfg.checkpoint_minutes and time.monotonic() - last_save >= 60 * cfg.checkpoint_minutes),
                        stop.requested or (stop_after is not None and step >= stop_after))
                    if due:
                        save_checkpoint()
                        last_save = time.monotonic()
                    if stop_now:
                        stopped = True
                        break
                if stopped:
                    break
                if progress["step"] < total_steps and progress["position"] != 0:
                    # The sampler ended before its length: a partial epoch must not repeat.
                    raise RuntimeError(f"the sampler yielded {progress['position']} of {len(task.sampler)} batches")
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
    save_checkpoint()
    if stopped:
        if procs.is_main:
            _say(f"{folder.path}: stopped at step {progress['step']} of {total_steps}; "
                 "run the same command again to resume")
        return None

    def finish() -> dict[str, Any]:
        summary: dict[str, Any] = {"config": cfg.to_dict(), "data": task.data_identity, "steps": progress["step"],
                                   "world_size": procs.world_size}
        summary.update(task.evaluate())
        summary.update(task.summarize(rows))
        if snr is not None:
            summary.update({"snr_mean": rows[-1].get("snr_mean"), "snr_std": rows[-1].get("snr_std")})
        summary["train_seconds"] = progress["seconds"]
        summary["seconds_per_step"] = progress["seconds"] / max(progress["step"], 1)
        folder.write_summary(summary, rows)
        return summary

    return procs.on_main(finish)


def _network(cfg: TrainConfig, model: torch.nn.Module, procs: Processes, device: torch.device) -> torch.nn.Module:
    """The module a training step calls: the model, in channels-last memory,
    wrapped for DDP, compiled -- each only when asked for."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = model
    if procs.several:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    return net


def _check_world_size(ckpt: dict[str, Any], procs: Processes, task, folder: RunFolder) -> None:
    saved = ckpt.get("world_size", 1)
    if saved != procs.world_size and not task.world_size_invariant:
        raise ValueError(
            f"{folder.checkpoint} was written by {saved} process(es) and this run has {procs.world_size}: its "
            f"training draws random numbers in each process (dropout), so it cannot continue exactly on another "
            f"number; resume it with {saved} process(es) (torchrun --nproc-per-node {saved}), or use another folder"
        )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress_bar(cfg: TrainConfig, total: int, initial: int, name: str):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, leave=False)

