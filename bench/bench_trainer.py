"""Throughput of the lab's training loop against a minimal hand-written loop,
and the overhead of the gradient SNR tracker.

Both loops train the same model (MLP encoder + head) with the same loss
(InfoNCE, all negatives), optimizer (Adam) and augmentations on the digits,
side by side in one process, alternating repeats and keeping the median.

Goals: our loop / minimal loop <= 1.10; minimal loop with SNR tracking /
without <= 1.10.

Usage: python bench/bench_trainer.py [EPOCHS] [REPEATS]   (defaults 3 and 3;
environment BENCH_BATCH=128, BENCH_WIDTH=256)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from negbatch.data import Augment, load_digits  # noqa: E402
from negbatch.diagnostics import GradientSNR  # noqa: E402
from negbatch.lab import TrainConfig, train  # noqa: E402
from negbatch.lab.optim import build_optimizer, build_schedule  # noqa: E402
from negbatch.lab.tasks.image import build_loss, build_model  # noqa: E402


def minimal_loop(cfg: TrainConfig, data, snr: bool) -> float:
    """Seconds per step of the plainest loop of the same computation."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.image_shape)
    loss_fn = build_loss(cfg).loss  # the bare InfoNCE module
    opt = build_optimizer(cfg, model.parameters())
    steps_per_epoch = len(data.x_train) // cfg.batch_size
    sched = build_schedule(cfg, opt, cfg.epochs * steps_per_epoch)
    aug = Augment(strength=cfg.aug_strength)
    g = torch.Generator().manual_seed(0)
    tracker = GradientSNR(model, beta=cfg.snr_beta) if snr else None
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(data.x_train), generator=g)
        for b in range(steps_per_epoch):
            x = data.x_train[order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
            z1, z2 = model(torch.cat([aug(x, g), aug(x, g)])).chunk(2)
            opt.zero_grad(set_to_none=True)
            loss_fn(z1, z2, generator=g).backward()
            if tracker is not None:
                tracker.update()
                if b % cfg.log_every == 0:
                    tracker.summary()
            opt.step()
            sched.step()
    return (time.perf_counter() - start) / (cfg.epochs * steps_per_epoch)


def our_loop(cfg: TrainConfig, data) -> float:
    with tempfile.TemporaryDirectory() as d:
        summary = train(cfg, d, data=data)
    # train_seconds covers the loop only (not the final evaluation).
    return summary["train_seconds"] / summary["steps"]


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    batch = int(os.environ.get("BENCH_BATCH", 128))
    width = int(os.environ.get("BENCH_WIDTH", 256))
    data = load_digits()
    cfg = TrainConfig(batch_size=batch, epochs=epochs, encoder_widths=(width, width // 2), head_widths=(width, 64), snr=False)
    times: dict[str, list[float]] = {"minimal": [], "ours": [], "minimal+snr": []}
    minimal_loop(cfg, data, False)  # warm-up
    for _ in range(repeats):
        times["minimal"].append(minimal_loop(cfg, data, False))
        times["ours"].append(our_loop(cfg, data))
        times["minimal+snr"].append(minimal_loop(cfg, data, True))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"digits, batch {batch}, MLP width {width}, {epochs} epochs x {len(data.x_train) // batch} steps, "
          f"median of {repeats}, torch threads {torch.get_num_threads()}; SNR off except in minimal+snr (summary every step)")
    print(f"{'variant':<14}{'ms/step':>10}")
    for k, v in med.items():
        print(f"{k:<14}{1000 * v:>10.2f}")
    loop_ratio = med["ours"] / med["minimal"]
    snr_ratio = med["minimal+snr"] / med["minimal"]
    print(f"our loop / minimal loop      = {loop_ratio:.3f}  (goal <= 1.10: {'met' if loop_ratio <= 1.10 else 'NOT met'})")
    print(f"with SNR tracker / without   = {snr_ratio:.3f}  (goal <= 1.10: {'met' if snr_ratio <= 1.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
