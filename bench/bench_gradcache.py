"""Gradient caching: step time and peak memory against a plain step.

(1) Time, side by side in this process: a cached step (GradCache), a plain
    step (whole batch, one graph) and gradient accumulation (the same chunks,
    the loss per chunk: fewer negatives), for an MLP and a small transformer
    encoder, at each power of two from --min-batch up to the largest batch
    the plain step handles (up to --max-batch): on CUDA, the largest that
    does not run out of GPU memory; on CPU, the largest that runs with its
    data segment limited to --memory-budget GiB (default: half the machine's
    memory), probed in child processes, which stands in for a device's
    memory. --batch N times one batch size instead. The chunk is B/8 unless
    --chunk is given.
    Goal: cached / plain <= 1.35 at the largest batch.
(2) Memory, each variant in its own process: peak RSS (CPU, ru_maxrss) or
    torch.cuda.max_memory_allocated (GPU) of one step of the MLP at
    B = --mem-batch with chunk --mem-chunk, of a plain step at B = --mem-chunk
    and at B = --mem-batch, and of the loss alone at B = --mem-batch.
    Goal: cached <= 1.25 x (plain at B=chunk + representation cache + logits).
    On CPU the RSS includes the interpreter, torch, the model and the inputs
    (reported as "baseline": the RSS just before the step; the peak is reset
    there through /proc/self/clear_refs where Linux allows it, otherwise
    ru_maxrss: negbatch.lab.memory, the instrument of the gradcache study),
    so the ratios are also printed on the step's own increase.

(3) Decomposition (MLP at B = --decompose-batch, same process, side by
    side): the loss alone, the no-grad forward and the encoder's
    forward+backward unchunked and at chunk sizes B/8..B, and the cached step
    at each: what the chunk size costs on this machine beyond the extra
    forward.

Usage: python bench/bench_gradcache.py [--quick] [--only time|decompose|memory] [--batch N] [--chunk N] [--repeats N]
       [--min-batch N] [--max-batch N] [--memory-budget GIB] [--decompose-batch N]
       [--mem-batch N] [--mem-chunk N] [--device cpu|cuda]
       [--models mlp transformer] [--mem-model mlp|transformer]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the tests load this file as a module
from _agree import check_same_gradients  # noqa: E402
from _order import rounds  # noqa: E402

import torch
from torch import nn

from negbatch import GradCache, InfoNCE
from negbatch.lab.memory import peak_memory

DIM_OUT = 128


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Dropout(0.1), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, DIM_OUT)
    )


class TinyTransformer(nn.Module):
    def __init__(self, vocab=1000, d=128, layers=2, length=32):
        super().__init__()
        self.length = length
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, DIM_OUT)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


MODELS = {"mlp": mlp, "transformer": TinyTransformer}


def make_views(model: str, b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if model == "transformer":
        return tuple(torch.randint(0, 1000, (b, 32), device=device) for _ in range(2))
    return tuple(torch.randn(b, 256, device=device) for _ in range(2))


def plain_step(enc, loss_fn, v1, v2):
    loss = loss_fn(enc(v1), enc(v2))
    loss.backward()


def accumulation_step(enc, loss_fn, v1, v2, chunk):
    n = (v1.shape[0] + chunk - 1) // chunk
    for a, b in zip(v1.split(chunk), v2.split(chunk)):
        (loss_fn(enc(a), enc(b)) / n).backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def plain_fits(model: str, b: int, device, budget_bytes: int) -> bool:
    """Whether one plain step at batch ``b`` runs: on CUDA, without running out
    of GPU memory; on CPU, in a child process whose data segment is limited to
    ``budget_bytes`` (RLIMIT_DATA), so that an allocation past the budget fails
    the way a GPU allocation past the card's memory does."""
    if device.type == "cpu":
        out = subprocess.run(
            [sys.executable, __file__, "--fits-child", model, str(b), str(budget_bytes)],
            capture_output=True, text=True,
        )
        return out.returncode == 0
    enc = MODELS[model]().to(device)
    try:
        plain_step(enc, InfoNCE(temperature=0.1), *make_views(model, b, device))
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del enc
        torch.cuda.empty_cache()


def fits_child(model: str, b: int, budget_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (budget_bytes, budget_bytes))
    try:
        plain_step(MODELS[model](), InfoNCE(temperature=0.1), *make_views(model, b, torch.device("cpu")))
    except (RuntimeError, MemoryError) as e:  # torch's CPU allocator raises RuntimeError
        print(e, file=sys.stderr)
        sys.exit(3)


def largest_plain_batch(model: str, args, device) -> int:
    """The largest power of two from --min-batch up to --max-batch whose plain step runs."""
    b = args.min_batch
    while 2 * b <= args.max_batch and plain_fits(model, 2 * b, device, args.budget_bytes):
        b *= 2
    return b


def interleaved_medians(variants: dict, enc: nn.Module, repeats: int, device) -> dict:
    """Median time of each variant over ``repeats`` rounds, the variants
    interleaved against drift; a first round warms up and is dropped."""
    times = {k: [] for k in variants}
    for _, order in rounds(list(variants), repeats):
        for name in order:  # a fresh order every round (see _order.py)
            enc.zero_grad(set_to_none=True)
            times[name].append(timed(variants[name], device))
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def time_model(model: str, b: int, chunk: int, repeats: int, device) -> dict:
    torch.manual_seed(0)
    enc = MODELS[model]().to(device)
    loss_fn = InfoNCE(temperature=0.1)
    cache = GradCache(enc, loss_fn, chunk)
    v1, v2 = make_views(model, b, device)
    variants = {
        "plain": lambda: plain_step(enc, loss_fn, v1, v2),
        "accumulation": lambda: accumulation_step(enc, loss_fn, v1, v2, chunk),
        "cached": lambda: cache.step(v1, v2),
    }
    check_cached_is_plain(f"{model} B={b} cached / plain", enc, variants["cached"], variants["plain"])
    return interleaved_medians(variants, enc, repeats, device)


def check_cached_is_plain(label: str, enc: nn.Module, cached, plain) -> None:
    """Before timing: the cached step gives the plain step's gradients (dropout
    off: the two steps draw different masks). Accumulation is another loss
    (fewer negatives per chunk) and is not compared."""
    grads = []
    enc.eval()
    try:
        for step in (cached, plain):
            enc.zero_grad(set_to_none=True)
            step()
            grads.append([None if p.grad is None else p.grad.clone() for p in enc.parameters()])
    finally:
        enc.zero_grad(set_to_none=True)
        enc.train()
    print(f"# {check_same_gradients(label, *grads)}", flush=True)


def decompose(model: str, b: int, chunks: list[int], repeats: int, device) -> dict:
    """Where a cached step's time goes, side by side: the plain step, the loss
    alone, the no-grad forward and the forward+backward of the encoder (with
    a fixed upstream gradient) unchunked and at each chunk size, and the
    cached step at each chunk size. ``ideal`` = (plain + unchunked no-grad
    forward) / plain: the ratio if chunked products ran as fast as whole-batch ones."""
    torch.manual_seed(0)
    enc = MODELS[model]().to(device)
    loss_fn = InfoNCE(temperature=0.1)
    v1, v2 = make_views(model, b, device)
    z = [torch.randn(b, DIM_OUT, device=device, requires_grad=True) for _ in range(2)]

    def forward(size):
        with torch.no_grad():
            for v in (v1, v2):
                for part in v.split(size):
                    enc(part)

    def forward_backward(size):
        for v in (v1, v2):
            for part in v.split(size):
                out = enc(part)
                out.backward(torch.ones_like(out))

    variants = {
        "plain": lambda: plain_step(enc, loss_fn, v1, v2),
        "loss": lambda: torch.autograd.grad(loss_fn(*z), z),
        f"forward {b}": lambda: forward(b),
        f"forward+backward {b}": lambda: forward_backward(b),
    }
    for c in chunks:
        variants[f"forward {c}"] = lambda c=c: forward(c)
        variants[f"forward+backward {c}"] = lambda c=c: forward_backward(c)
        variants[f"cached {c}"] = lambda c=c, cache=GradCache(enc, loss_fn, c): cache.step(v1, v2)
    return interleaved_medians(variants, enc, repeats, device)


def run_decomposition(args, device) -> None:
    b = args.decompose_batch
    chunk = args.chunk or max(1, b // 8)
    chunks = sorted({chunk, *[c for c in (2 * chunk, 4 * chunk, b) if c <= b]})
    t = decompose("mlp", b, chunks, args.repeats, device)
    plain = t["plain"]
    print(f"\n# where the MLP's cached step goes, B={b}, device={device}, median of {args.repeats}, "
          f"times / plain step ({plain:.4f} s)")
    print(f"loss alone {t['loss'] / plain:.2f}; unchunked: no-grad forward {t[f'forward {b}'] / plain:.2f}, "
          f"forward+backward {t[f'forward+backward {b}'] / plain:.2f}; "
          f"ideal cached/plain {(plain + t[f'forward {b}']) / plain:.2f}")
    print(f"{'chunk':>6} {'no-grad fwd':>12} {'fwd+bwd':>9} {'fwd+bwd / unchunked':>20} {'cached/plain':>13}")
    for c in chunks:
        print(f"{c:>6} {t[f'forward {c}'] / plain:>12.2f} {t[f'forward+backward {c}'] / plain:>9.2f} "
              f"{t[f'forward+backward {c}'] / t[f'forward+backward {b}']:>20.2f} {t[f'cached {c}'] / plain:>13.2f}")


# ------------------------------------------------------------------ memory


def memory_child(variant: str, b: int, chunk: int, device_name: str, model: str) -> None:
    device = torch.device(device_name)
    torch.manual_seed(0)
    enc = MODELS[model]().to(device)
    loss_fn = InfoNCE(temperature=0.1)
    v1, v2 = make_views(model, b, device)
    if variant == "loss_only":
        z1, z2 = (torch.randn(b, DIM_OUT, device=device, requires_grad=True) for _ in range(2))
    with peak_memory(device) as memory:
        if variant == "plain":
            plain_step(enc, loss_fn, v1, v2)
        elif variant == "cached":
            GradCache(enc, loss_fn, chunk).step(v1, v2)
        elif variant == "loss_only":
            loss_fn(z1, z2).backward()
    peak, base = memory.peak_bytes, memory.base_bytes
    print(json.dumps({"peak": peak, "base": base}))


def measure_memory(variant: str, b: int, chunk: int, device: str, model: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", variant, str(b), str(chunk), device, model],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None,
                   help="time this one batch size (default: every power of two from --min-batch up to the "
                        "largest batch the plain step handles)")
    p.add_argument("--min-batch", type=int, default=1024, help="smallest batch of the time sweep")
    p.add_argument("--max-batch", type=int, default=65536, help="largest batch tried")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="CPU: the memory a plain step may use, standing in for a device's memory "
                        "(default: half the machine's memory)")
    p.add_argument("--decompose-batch", type=int, default=1024, help="batch of the decomposition")
    p.add_argument("--chunk", type=int, default=None, help="rows per chunk of the time comparison (default: B/8)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mem-batch", type=int, default=4096)
    p.add_argument("--mem-chunk", type=int, default=64)
    p.add_argument("--mem-model", choices=tuple(MODELS), default="mlp", help="encoder of the memory part")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS), help="encoders timed")
    p.add_argument("--only", choices=("time", "decompose", "memory"), help="run one of the three parts")
    p.add_argument("--memory-child", nargs=5, metavar=("VARIANT", "B", "CHUNK", "DEVICE", "MODEL"), help=argparse.SUPPRESS)
    p.add_argument("--fits-child", nargs=3, metavar=("MODEL", "B", "BYTES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        variant, b, chunk, device, model = args.memory_child
        memory_child(variant, int(b), int(chunk), device, model)
        return
    if args.fits_child:
        model, b, budget = args.fits_child
        fits_child(model, int(b), int(budget))
        return
    if args.quick:
        args.batch, args.chunk, args.repeats, args.mem_batch, args.mem_chunk = 256, args.chunk or 64, 2, 1024, 64
        args.decompose_batch = 256
    for name in ("batch", "min_batch", "max_batch", "decompose_batch", "chunk", "repeats", "mem_batch", "mem_chunk"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.memory_budget is None:
        args.memory_budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 / 2**30
    if args.memory_budget <= 0:
        p.error(f"--memory-budget must be > 0 GiB, got {args.memory_budget}")
    args.budget_bytes = int(args.memory_budget * 2**30)
    device = torch.device(args.device)

    if args.only in (None, "time"):
        run_time(args, device)
    if args.only in (None, "decompose"):
        run_decomposition(args, device)
    if args.only in (None, "memory"):
        run_memory(args, device)


def run_time(args, device) -> None:
    limit = ("GPU memory" if device.type == "cuda"
             else f"a data segment of {args.memory_budget:.1f} GiB (--memory-budget)")
    sizes = (f"B = {args.batch} (--batch)" if args.batch is not None else
             f"B up to the largest power of two <= {args.max_batch} whose plain step runs in {limit}")
    print(f"# time per step, device={device}, median of {args.repeats} (interleaved), InfoNCE two_view; {sizes}")
    print(f"{'model':<12} {'B':>6} {'chunk':>6} {'plain s':>9} {'accum s':>9} {'cached s':>9} "
          f"{'cached/plain':>13} {'cached/accum':>13}  goal cached/plain <= 1.35 at the largest batch")
    for model in args.models:
        if args.batch is not None:
            batches = [args.batch]
        else:
            largest = largest_plain_batch(model, args, device)
            batches = [args.min_batch]
            while batches[-1] < largest:
                batches.append(2 * batches[-1])
        for b in batches:
            chunk = args.chunk or max(1, b // 8)
            t = time_model(model, b, chunk, args.repeats, device)
            ratio = t["cached"] / t["plain"]
            verdict = ("met" if ratio <= 1.35 else "NOT met") if b == batches[-1] else ""
            print(f"{model:<12} {b:>6} {chunk:>6} {t['plain']:>9.4f} {t['accumulation']:>9.4f} {t['cached']:>9.4f} "
                  f"{ratio:>13.2f} {t['cached'] / t['accumulation']:>13.2f}  {verdict}", flush=True)


def run_memory(args, device) -> None:
    B, c = args.mem_batch, args.mem_chunk
    print(f"\n# peak memory of one {args.mem_model} step, each in its own process, device={device} "
          f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'peak RSS'})")
    runs = {
        f"plain B={c}": measure_memory("plain", c, c, args.device, args.mem_model),
        f"plain B={B}": measure_memory("plain", B, B, args.device, args.mem_model),
        f"cached B={B} chunk={c}": measure_memory("cached", B, c, args.device, args.mem_model),
        f"loss only B={B}": measure_memory("loss_only", B, c, args.device, args.mem_model),
    }
    mib = 2.0**20
    print(f"{'variant':<24} {'peak MiB':>10} {'baseline MiB':>13} {'step MiB':>10}")
    for name, r in runs.items():
        print(f"{name:<24} {r['peak'] / mib:>10.1f} {r['base'] / mib:>13.1f} {(r['peak'] - r['base']) / mib:>10.1f}")
    # Representation cache: 2B embeddings and their gradients; logits: one (2B x 2B) float32 matrix.
    cache_bytes = 2 * (2 * B * DIM_OUT * 4)
    logits_bytes = (2 * B) ** 2 * 4
    small, big, cached = runs[f"plain B={c}"], runs[f"plain B={B}"], runs[f"cached B={B} chunk={c}"]
    loss_only = runs[f"loss only B={B}"]
    budget = small["peak"] + cache_bytes + logits_bytes
    print(f"representation cache {cache_bytes / mib:.1f} MiB, logits {logits_bytes / mib:.1f} MiB (one copy)")
    # The goal is judged on the step's own increase: the total peak also counts the interpreter and
    # torch (some 250 MiB of RSS on the CPU), the same on both sides, which pulls the ratio towards 1.
    step = lambda r: r["peak"] - r["base"]  # noqa: E731
    own = step(cached) / (step(small) + cache_bytes + logits_bytes)
    print(f"on the step's own increase: cached / (plain B={c} + cache + logits) = {own:.2f}  "
          f"goal <= 1.25: {'met' if own <= 1.25 else 'NOT met'}; "
          f"cached / (plain B={c} + loss alone at B={B}) = {step(cached) / max(1, step(small) + step(loss_only)):.2f}")
    print(f"on the total peak (with the process's own memory): cached / (plain B={c} + cache + logits) = "
          f"{cached['peak'] / budget:.2f}")
    print(f"cached B={B} / plain B={B} (peak) = {cached['peak'] / big['peak']:.2f}; "
          f"on the step's increase = {step(cached) / max(1, step(big)):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
