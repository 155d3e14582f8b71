"""Throughput of the lab's training loop against a minimal hand-written loop,
and the overhead of the gradient SNR tracker.

Both loops train the same model with the same loss (InfoNCE, all negatives),
optimizer (Adam) and augmentation, side by side in one process, in a fresh
random order every round (bench/_order.py; the first round warms up), keeping
the median:

* digits: the MLP encoder + head on 8x8 greyscale images, the greyscale
  augmentation (and the SNR tracker's overhead);
* cifar: CIFAR-sized RGB images (random uint8, 3x32x32: the throughput does
  not depend on the pixels), ResNet-18 with the CIFAR stem, SimCLR's
  augmentation batched on the device; also the augmentation's share of a step.
  With ``BENCH_DEVICE=cuda``: images/s and peak GPU memory, and a 2-epoch run.

Goals: our loop / minimal loop <= 1.10; minimal loop with SNR tracking /
without <= 1.10; the augmentation is not the bottleneck (well under half a step).

Usage: python bench/bench_trainer.py [EPOCHS] [REPEATS]   (defaults 3 and 3; EPOCHS applies to
the digits part, the cifar part times 1 epoch;
environment BENCH_BATCH=128, BENCH_WIDTH=256, BENCH_DATA=digits|cifar|both (both),
BENCH_DEVICE=cpu|cuda, BENCH_CIFAR_N=2560, BENCH_CIFAR_BATCH=256, BENCH_WIDTHS=16,32,64,128 on a CPU)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _order import rounds  # noqa: E402

from negbatch.data import Augment, ImageDataset, SimCLRAugment, load_digits, to_float_images  # noqa: E402
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


def minimal_rgb_loop(cfg: TrainConfig, data, device: torch.device) -> tuple[float, float]:
    """Seconds per step of the plainest loop of the image task on RGB data, and
    the seconds per step spent making the two views."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.image_shape).to(device)
    loss_fn = build_loss(cfg).loss
    opt = build_optimizer(cfg, model.parameters())
    aug = SimCLRAugment(strength=cfg.aug_strength, hflip=0.5)
    g = torch.Generator().manual_seed(0)
    x_all = data.x_train.to(device)
    steps = cfg.epochs * (len(x_all) // cfg.batch_size)
    aug_seconds = 0.0
    sync()
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x_all), generator=g)
        for b in range(len(x_all) // cfg.batch_size):
            x = to_float_images(x_all[order[b * cfg.batch_size : (b + 1) * cfg.batch_size].to(device)])
            t0 = time.perf_counter()
            v1, v2 = aug(x, g), aug(x, g)
            sync()
            aug_seconds += time.perf_counter() - t0
            z1, z2 = model(torch.cat([v1, v2])).chunk(2)
            opt.zero_grad(set_to_none=True)
            loss_fn(z1, z2, generator=g).backward()
            opt.step()
    sync()
    return (time.perf_counter() - start) / steps, aug_seconds / steps


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cifar_bench(epochs: int, repeats: int, device: torch.device) -> None:
    n = int(os.environ.get("BENCH_CIFAR_N", 2560))
    batch = int(os.environ.get("BENCH_CIFAR_BATCH", 256))
    rng = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n + 512, 3, 32, 32), dtype=torch.uint8, generator=rng)
    y = torch.arange(n + 512) % 10
    data = ImageDataset("cifar-sized", x[:n], y[:n], x[n:], y[n:])
    # The standard ResNet-18 on a GPU; a quarter of its widths on a CPU (a full one takes ~10 s a step there).
    widths = None if device.type == "cuda" else tuple(int(w) for w in os.environ.get("BENCH_WIDTHS", "16,32,64,128").split(","))
    cfg = TrainConfig(dataset="cifar10", batch_size=batch, epochs=epochs, encoder="resnet18", encoder_widths=widths,
                      head_widths=(512, 128), hflip=True, snr=False, device=str(device), evaluation="scale")
    times: dict[str, list[float]] = {"minimal": [], "ours": [], "augment": []}
    for rep, order in rounds(["minimal", "ours"], repeats):  # round 0 warms up
        if rep == 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for name in order:
            if name == "minimal":
                step, aug = minimal_rgb_loop(cfg, data, device)
                if rep:
                    times["minimal"].append(step)
                    times["augment"].append(aug)
            else:
                step = our_loop(cfg, data)
                if rep:
                    times["ours"].append(step)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nCIFAR-sized: {n} images 3x32x32 uint8, ResNet-18 (CIFAR stem, widths {widths or 'standard'}), SimCLR "
          f"augmentation on {device}, batch "
          f"{batch}, {epochs} epoch(s) x {n // batch} steps, median of {repeats}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':<14}{'ms/step':>10}{'images/s':>10}")
    for k in ("minimal", "ours"):
        print(f"{k:<14}{1000 * med[k]:>10.1f}{batch / med[k]:>10.0f}")
    ratio = med["ours"] / med["minimal"]
    share = med["augment"] / med["minimal"]
    print(f"our loop / minimal loop      = {ratio:.3f}  (goal <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")
    print(f"augmentation's share of a step = {share:.1%} (two views, {1000 * med['augment']:.1f} ms)")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        with tempfile.TemporaryDirectory() as d:
            s = train(cfg.replace(epochs=2), d, data=data)
        print(f"2-epoch run: {s['steps']} steps, {batch * s['steps'] / s['train_seconds']:.0f} images/s, "
              f"linear accuracy {s['linear_acc']:.3f} (random images: chance)")


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    which = os.environ.get("BENCH_DATA", "both")
    device = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
    if which in ("digits", "both"):
        digits_bench(epochs, repeats)
    if which in ("cifar", "both"):
        cifar_bench(1, repeats, device)


def digits_bench(epochs: int, repeats: int) -> None:
    batch = int(os.environ.get("BENCH_BATCH", 128))
    width = int(os.environ.get("BENCH_WIDTH", 256))
    data = load_digits()
    cfg = TrainConfig(batch_size=batch, epochs=epochs, encoder_widths=(width, width // 2), head_widths=(width, 64), snr=False)
    times: dict[str, list[float]] = {"minimal": [], "ours": [], "minimal+snr": []}
    loops = {"minimal": lambda: minimal_loop(cfg, data, False), "ours": lambda: our_loop(cfg, data),
             "minimal+snr": lambda: minimal_loop(cfg, data, True)}
    for rep, order in rounds(list(loops), repeats):  # round 0 warms up
        for name in order:
            step = loops[name]()
            if rep:
                times[name].append(step)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"digits, batch {batch}, MLP width {width}, {epochs} epochs x {len(data.x_train) // batch} steps, "
          f"median of {repeats}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; SNR off except in minimal+snr (summary every step)")
    print(f"{'variant':<14}{'ms/step':>10}")
    for k, v in med.items():
        print(f"{k:<14}{1000 * v:>10.2f}")
    loop_ratio = med["ours"] / med["minimal"]
    snr_ratio = med["minimal+snr"] / med["minimal"]
    print(f"our loop / minimal loop      = {loop_ratio:.3f}  (goal <= 1.10: {'met' if loop_ratio <= 1.10 else 'NOT met'})")
    print(f"with SNR tracker / without   = {snr_ratio:.3f}  (goal <= 1.10: {'met' if snr_ratio <= 1.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
