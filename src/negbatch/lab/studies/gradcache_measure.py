"""The gradcache study's measurements: one training step's peak memory and
time, in a fresh process per measurement (:func:`measure_in_subprocess`).

A measurement is a dict ``spec`` (method, batch size, chunk, repeat, data,
model widths, device, threads) and a pool of training images saved by the
study; the measuring process builds the workload (:data:`DATA_KINDS`), takes a
tiny warm-up step, measures the peak memory of one step with
:func:`negbatch.lab.memory.peak_memory` and times ``spec["steps"]`` more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..memory import peak_memory

__all__ = ["Workload", "image_workload", "image_pool", "DATA_KINDS", "measure", "measure_in_subprocess"]

# --------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """What one measured step needs: a model, a loss called as the trainer
    calls it, and a maker of (index, view1, view2) batches of B pairs."""

    model: Any
    loss_fn: Any
    make_batch: Callable[[int, Any], Any]


def image_workload(spec: dict[str, Any], pool_path: Path, device) -> Workload:
    """The lab's image model and SimCLR InfoNCE on augmented views of a fixed
    pool of training images (drawn with replacement when B exceeds it)."""
    import torch

    from ...data import Augment
    from ..config import TrainConfig
    from ..tasks.image import Batch, build_loss, build_model

    pool = torch.load(pool_path, weights_only=True).to(device)
    cfg = TrainConfig(dataset=spec["data"], encoder=spec["encoder"], encoder_widths=tuple(spec["encoder_widths"]),
                      head_widths=tuple(spec["head_widths"]), temperature=spec["temperature"],
                      batch_size=spec["batch_size"])
    torch.manual_seed(0)
    model = build_model(cfg, tuple(pool.shape[1:])).to(device)
    augment = Augment(strength=0.5)

    def make_batch(b: int, g):
        if b <= pool.shape[0]:
            index = torch.randperm(pool.shape[0], generator=g)[:b]
        else:
            index = torch.randint(0, pool.shape[0], (b,), generator=g)
        x = pool[index.to(device)]
        return Batch(index, augment(x, g), augment(x, g))

    return Workload(model, build_loss(cfg).to(device), make_batch)


def image_pool(args: argparse.Namespace, size: int):
    """The images the measurements draw from: the first ``size`` training images."""
    from ...data import load_dataset

    data = load_dataset(args.data, args.data_dir)
    return data.x_train[:size].contiguous()


#: ``--data`` name -> (pool maker for the parent, workload builder for the
#: measuring process).
DATA_KINDS: dict[str, tuple[Callable, Callable]] = {
    "digits": (image_pool, image_workload),
    "fashion-mnist": (image_pool, image_workload),
}


# ---------------------------------------------------------- one measurement


def measure(spec: dict[str, Any], pool_path: Path) -> dict[str, Any]:
    """One fresh process's measurement: peak memory of the first step, then
    the time of ``spec["steps"]`` more steps (median)."""
    import torch

    from ..tasks.image import forward_backward

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    work = DATA_KINDS[spec["data"]][1](spec, pool_path, device)
    g = torch.Generator().manual_seed(spec["repeat"])
    loss_gen = torch.Generator().manual_seed(1)
    chunk = None if spec["method"] == "plain" else spec["chunk_size"]
    method = "cache" if spec["method"] == "plain" else spec["method"]
    work.model.train()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_step(batch) -> float:
        work.model.zero_grad(set_to_none=True)
        return float(forward_backward(work.model, work.loss_fn, batch, loss_gen, chunk, method))

    batches = [work.make_batch(spec["batch_size"], g) for _ in range(spec["steps"] + 1)]
    # A tiny step first: one-time costs (the autograd engine's first backward
    # alone adds ~35 MiB of RSS) must not count as the measured step's memory.
    one_step(work.make_batch(min(4, spec["batch_size"]), g))
    load_before = os.getloadavg()[0]
    with peak_memory(device) as memory:
        loss = one_step(batches[0])
    times = []
    for batch in batches[1:]:
        sync()
        start = time.perf_counter()
        one_step(batch)
        sync()
        times.append(time.perf_counter() - start)
    return {**spec, "peak_bytes": memory.peak_bytes, "base_bytes": memory.base_bytes, "step_bytes": memory.step_bytes,
            "memory_source": memory.source,
            "times": times, "time_s": statistics.median(times) if times else float("nan"), "loss": loss,
            "load": (load_before + os.getloadavg()[0]) / 2}


def _child_main(argv: list[str]) -> None:
    import warnings

    spec, pool = json.loads(argv[0]), Path(argv[1])
    warnings.simplefilter("ignore", UserWarning)  # BatchNorm per chunk: timing and memory are unaffected
    try:
        out = measure(spec, pool)
    except MemoryError:
        out = {**spec, "oom": True}
    except Exception as err:  # noqa: BLE001 - CUDA OOM is a RuntimeError subclass
        if "out of memory" not in str(err).lower():
            raise
        out = {**spec, "oom": True}
    print(json.dumps(out))


def measure_in_subprocess(spec: dict[str, Any], pool: Path) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process with ``spec["threads"]`` threads;
    ``{**spec, "oom": True}`` when the step ran out of memory."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    src = str(Path(__file__).resolve().parents[3])  # the folder holding the negbatch package
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    code = "import sys; from negbatch.lab.studies.gradcache_measure import _child_main; _child_main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(pool)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the measurement {spec['method']} B={spec['batch_size']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
