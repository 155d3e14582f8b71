"""One training run, whatever its task: :func:`train`.

Read :func:`train` top to bottom: it locks the run folder, loads the data
(through the task), checks the folder against the configuration and the
data, builds the model, optimizer and random streams, resumes from the last
checkpoint, loops over epochs and batches (logging, checkpointing, stopping
cleanly on Ctrl-C or SIGTERM) and finally evaluates. Everything that differs
between images and text pairs is behind a :class:`~negbatch.lab.tasks.Task`
(see :mod:`negbatch.lab.tasks`): the data, the model, the batches, one step,
the evaluation.

A run folder (:mod:`negbatch.lab.folder`) holds ``config.json`` (the configuration), ``data.json`` (what
identifies the data), ``metrics.jsonl`` / ``metrics.csv`` (one row per
``log_every`` steps), ``checkpoint.pt`` (every ``checkpoint_minutes`` and
``checkpoint_every`` steps, and at the end) and ``summary.json`` (the final
metrics). Each file is written atomically, so an interruption at any moment
leaves the last good checkpoint and rows that resuming truncates to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from typing import Any

import torch

from ..allocator import freed_memory_kept
from ..diagnostics import GradientSNR
from .config import TrainConfig
from .folder import (CHECKPOINT, CONFIG, DATA, METRICS, SUMMARY, RunFolder, _differences, _say, _StopRequest,
                     atomic_torch_save, atomic_write_text, hold_lock, read_metrics, resolve_device)
from .optim import build_optimizer, build_schedule
from .precision import Precision
from .processes import Processes

# The folder's helpers are re-exported: negbatch.lab.run was their home before negbatch.lab.folder.
__all__ = ["train", "RunFolder", "RandomStreams", "read_metrics", "CHECKPOINT", "METRICS", "SUMMARY", "CONFIG",
           "DATA", "atomic_write_text", "atomic_torch_save", "resolve_device", "hold_lock"]

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
    GPUs) the run equals a single-process run of the same global batch (but
    for ``chunk_method="accumulate"``, whose chunks then hold other samples).

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
    # On a CPU each step's activations come back from the heap, not from fresh pages (allocator.py).
    with freed_memory_kept(resolve_device(cfg.device)):
        if cfg.encoder == "minilm":  # sentence-transformers' trainer runs the loop, in the same kind of folder
            from .minilm import train_minilm

            return train_minilm(cfg, run_dir, data=data, stop_after=stop_after)
        procs = Processes.start(cfg.device)
        try:
            folder = RunFolder(run_dir)
            with folder.locked() if procs.is_main else contextlib.nullcontext(), procs.warnings_on_main():
                return _train(cfg, folder, procs, data, stop_after)
        finally:
            procs.close()


def _train(cfg: TrainConfig, folder: RunFolder, procs: Processes, data: Any, stop_after: int | None):
    from .tasks import make_task

    procs.check_all(lambda: procs.check_shares(cfg))  # before the data: loading ImageNet to refuse B = 6 on 4 GPUs
    device = procs.device(cfg.device)
    task = procs.check_all(lambda: make_task(cfg, device, data))  # loads the data: errors about it come first
    _check_one_run(cfg, task, procs)
    finished = procs.on_main(lambda: folder.check(cfg, task.data_identity, task.earlier_data_identity))
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
    if snr is not None:
        # Inside optimizer.step(): in fp16 the scaler has unscaled the gradients
        # by then, and a step it skips (inf or NaN gradients) is not recorded.
        snr.attach(optimizer)
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
                "schedule": schedule.state_dict(), "sampler": task.sampler.state_dict(position=progress["position"],
                                                                    epoch=progress["epoch"]),
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
                    lr = optimizer.param_groups[0]["lr"]
                    logs_now = ((progress["step"] + 1) % cfg.log_every == 0 or progress["step"] + 1 == total_steps
                                or bool(epoch_row))
                    # Read before the optimizer moves them: the temperature and bias this step's loss used.
                    metrics = task.step_metrics() if logs_now else {}
                    # Each rank's values are of its rows (the global loss's InfoNCE of its share of the
                    # batch): their mean is the batch's, as the loss column's is.
                    metrics = procs.mean_each(metrics, loss.device) if logs_now else metrics
                    precision.step(optimizer)
                    task.after_step()
                    with warnings.catch_warnings():
                        # fp16: a GradScaler that skips the first steps (inf gradients at its initial scale)
                        # leaves optimizer.step() uncalled, and torch warns that the schedule steps first. The
                        # schedule counts the loop's steps, taken or skipped, as the step counter does: intended.
                        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                        schedule.step()
                    progress["step"] += 1
                    progress["position"] += 1
                    progress["seconds"] = seconds_before + time.perf_counter() - session_start
                    step = progress["step"]
                    if logs_now:
                        row = {"step": step, "epoch": epoch, "loss": procs.mean(loss), "lr": lr,
                               "seconds": progress["seconds"], **metrics,
                               **(snr.summary() if snr is not None and snr.steps else {}), **epoch_row}
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


def _check_one_run(cfg: TrainConfig, task, procs: Processes) -> None:
    """Every process trains one configuration on one data set, or every process refuses.

    Each process reads its own options (a configuration file on each node): a process given another
    batch size trained mismatched batches without a word, then failed in a collective with a bare
    gloo/NCCL error. ``data_dir`` may differ between nodes; the data's fingerprint may not."""
    if not procs.several:
        return
    # log_every too (it decides which steps take the metrics' collectives) and device (the backend): not
    # part of the run's identity, but the processes must agree on them.
    shared = {**cfg.identity(), "log_every": cfg.log_every, "device": cfg.device}
    mine = {"config": {k: v for k, v in shared.items() if k != "data_dir"},
            "data": task.data_identity.get("fingerprint")}
    everyone = procs.gather(mine)
    for rank, other in enumerate(everyone):
        if other == everyone[0]:
            continue
        what = _differences(everyone[0]["config"], other["config"])
        what = ", ".join(filter(None, [what, "the data (fingerprint)" if other["data"] != everyone[0]["data"] else ""]))
        raise ValueError(
            f"the processes were not given one run: rank {rank} differs from rank 0 in {what}; give every process "
            f"the same options (the same --config file and data on every node)"
        )


def _check_world_size(ckpt: dict[str, Any], procs: Processes, task, folder: RunFolder) -> None:
    saved = ckpt.get("world_size", 1)
    if saved != procs.world_size and not task.world_size_invariant:
        raise ValueError(
            f"{folder.checkpoint} was written by {saved} process(es) and this run has {procs.world_size}: its "
            f"training depends on the number of processes (dropout drawn in each process, BatchNorm over each "
            f"process's rows, or gradient accumulation's chunks of chunk_size / N rows per process), so it cannot "
            f"continue exactly on another "
            f"number; resume it with {saved} process(es) (torchrun --nproc-per-node {saved}), or use another folder"
        )



def _progress_bar(cfg: TrainConfig, total: int, initial: int, name: str):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, leave=False)

