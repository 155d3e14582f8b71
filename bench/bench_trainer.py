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
  On a CPU with glibc, a third variant: the minimal loop in a fresh process
  under glibc's own allocator settings, against the two loops, which keep
  freed memory in the process as ``train()`` does on a CPU
  (``negbatch.allocator``); page faults per step for each.

Both loops run under the same allocator settings: before they did not (the
lab's loop kept glibc's, the minimal loop's allocations left glibc a higher
mmap threshold), and the ratio read 1.16-1.20 for what was the allocator's
doing (400,000 page faults a step against 220,000).

Goals: our loop / minimal loop <= 1.10; minimal loop with SNR tracking /
without <= 1.10; the augmentation is not the bottleneck (well under half a step).

Usage: python bench/bench_trainer.py [EPOCHS] [REPEATS]   (defaults 10 and 9 for the digits part:
at 3 epochs (27 steps, under 0.2 s a run) two runs of the same code read 0.83 and 1.19; the cifar
part times 1 epoch, 5 repeats (BENCH_CIFAR_REPEATS: its steps take ~2 s on a 2-core CPU and vary
by 10-20% from run to run);
environment BENCH_BATCH=128, BENCH_WIDTH=256, BENCH_DATA=digits|cifar|both (both),
BENCH_DEVICE=cpu|cuda, BENCH_CIFAR_N=2560, BENCH_CIFAR_BATCH=256, BENCH_WIDTHS=16,32,64,128 on a CPU)
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
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
from negbatch import allocator  # noqa: E402
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
    sched = build_schedule(cfg, opt, steps)
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
            sched.step()
    sync()
    return (time.perf_counter() - start) / steps, aug_seconds / steps


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cifar_setup(epochs: int, device: torch.device) -> tuple[ImageDataset, TrainConfig, tuple[int, ...] | None]:
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
    return data, cfg, widths


def faults() -> int:
    """Page faults of this process so far (minor: a fresh page mapped and zeroed)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def minimal_with_glibc_defaults(cfg: TrainConfig) -> tuple[float, float]:
    """(seconds, page faults) per step of the minimal loop in a fresh process whose allocator keeps
    glibc's own settings (this process's have been set: glibc cannot go back to its dynamic ones);
    its first run warms up, the second is timed."""
    out = subprocess.run([sys.executable, __file__, "--glibc-defaults"], capture_output=True, text=True, check=True,
                         env={**os.environ, "BENCH_CIFAR_EPOCHS": str(cfg.epochs)})
    seconds, per_step = out.stdout.split()[-2:]
    return float(seconds), float(per_step)


def cifar_bench(epochs: int, repeats: int, device: torch.device) -> None:
    data, cfg, widths = cifar_setup(epochs, device)
    n, batch = len(data.x_train), cfg.batch_size
    steps = epochs * (n // batch)
    # Both loops keep freed memory in the process (negbatch.allocator): train() does on a CPU,
    # the minimal loop here, so that the ratio compares the loops, not two states of glibc's heap.
    # A third variant, the minimal loop under glibc's own settings, measures what that is worth.
    variants = ["minimal", "ours"] + (["minimal, glibc's defaults"] if device.type == "cpu" and allocator._glibc()
                                      else [])
    times: dict[str, list[float]] = {k: [] for k in variants + ["augment"]}
    per_step_faults: dict[str, list[float]] = {k: [] for k in variants}
    for rep, order in rounds(variants, repeats):  # round 0 warms up
        if rep == 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for name in order:
            if name == "minimal, glibc's defaults":
                if rep:
                    step, per_step = minimal_with_glibc_defaults(cfg)
                    times[name].append(step)
                    per_step_faults[name].append(per_step)
                continue
            before = faults()
            if name == "minimal":
                step, aug = kept(minimal_rgb_loop, cfg, data, device)
                if rep:
                    times["augment"].append(aug)
            else:
                step = our_loop(cfg, data)  # (its faults include the final evaluation's)
            if rep:
                times[name].append(step)
                per_step_faults[name].append((faults() - before) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nCIFAR-sized: {n} images 3x32x32 uint8, ResNet-18 (CIFAR stem, widths {widths or 'standard'}), SimCLR "
          f"augmentation on {device}, batch "
          f"{batch}, {epochs} epoch(s) x {n // batch} steps, median of {repeats}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':<27}{'ms/step':>10}{'images/s':>10}{'page faults/step':>18}")
    for k in variants:
        print(f"{k:<27}{1000 * med[k]:>10.1f}{batch / med[k]:>10.0f}{statistics.median(per_step_faults[k]):>18.0f}")
    ratio = med["ours"] / med["minimal"]
    share = med["augment"] / med["minimal"]
    print(f"our loop / minimal loop      = {ratio:.3f}  (goal <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")
    if "minimal, glibc's defaults" in med:
        gain = med["minimal, glibc's defaults"] / med["minimal"]
        print(f"minimal loop, glibc's defaults / freed memory kept = {gain:.3f}")
    print(f"augmentation's share of a step = {share:.1%} (two views, {1000 * med['augment']:.1f} ms)")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        with tempfile.TemporaryDirectory() as d:
            s = train(cfg.replace(epochs=2), d, data=data)
        print(f"2-epoch run: {s['steps']} steps, {batch * s['steps'] / s['train_seconds']:.0f} images/s, "
              f"linear accuracy {s['linear_acc']:.3f} (random images: chance)")


def glibc_defaults_main() -> None:
    """The minimal loop twice in this fresh process (the first warms up): its seconds and page faults per step."""
    data, cfg, _ = cifar_setup(int(os.environ.get("BENCH_CIFAR_EPOCHS", 1)), torch.device("cpu"))
    minimal_rgb_loop(cfg, data, torch.device("cpu"))
    before = faults()
    step, _ = minimal_rgb_loop(cfg, data, torch.device("cpu"))
    print(step, (faults() - before) / (cfg.epochs * (len(data.x_train) // cfg.batch_size)))


def main() -> None:
    if sys.argv[1:] == ["--glibc-defaults"]:
        return glibc_defaults_main()
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    which = os.environ.get("BENCH_DATA", "both")
    device = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
    if which in ("digits", "both"):
        digits_bench(epochs, repeats)
    if which in ("cifar", "both"):
        cifar_bench(1, int(os.environ.get("BENCH_CIFAR_REPEATS", 5)), device)


def kept(loop, *args):
    """A minimal loop with freed memory kept in the process, as train() keeps it on a CPU."""
    with allocator.freed_memory_kept():
        return loop(*args)


def digits_bench(epochs: int, repeats: int) -> None:
    batch = int(os.environ.get("BENCH_BATCH", 128))
    width = int(os.environ.get("BENCH_WIDTH", 256))
    data = load_digits()
    cfg = TrainConfig(batch_size=batch, epochs=epochs, encoder_widths=(width, width // 2), head_widths=(width, 64), snr=False)
    times: dict[str, list[float]] = {"minimal": [], "ours": [], "minimal+snr": []}
    loops = {"minimal": lambda: kept(minimal_loop, cfg, data, False), "ours": lambda: our_loop(cfg, data),
             "minimal+snr": lambda: kept(minimal_loop, cfg, data, True)}
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
