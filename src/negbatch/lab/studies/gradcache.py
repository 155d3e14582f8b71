"""Study: memory and time of gradient caching against batch size (Gao et al.
2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", in the spirit of its Table 1).

For each batch size B and each of three ways to take one training step --
a plain step (both views in one pass), gradient accumulation (chunks of
--chunk-size pairs, a loss per chunk: each anchor sees only its chunk's
negatives, 2c-2 instead of 2B-2) and gradient caching (the same chunks, the
loss of the whole batch) -- one fresh process measures, after a tiny warm-up
step, the peak memory of one step (CPU: peak RSS over a baseline taken just
before the step; CUDA: torch.cuda.max_memory_allocated over the allocation
before it) and the time of the next --steps steps. Every measurement is repeated --repeats times (a new
process each); the report gives the median and the spread (min-max). Then,
optionally, short trainings at a few batch sizes compare the downstream linear
accuracy of plain steps, accumulation and caching (mean ± std over seeds).

Defaults (digits, the lab's MLP, B = 64..4096, 3 repeats, accuracy at
B = 64, 256, 1024 with 2 seeds) took 14 minutes on a shared 2-core CPU at
load average 9 (about two thirds of it the measurements); --repeats 1 and
--accuracy-batch-sizes none give a quick look.

The measurements are in :mod:`~negbatch.lab.studies.gradcache_measure`, the
tables and report in :mod:`~negbatch.lab.studies.gradcache_report`. On text
pairs (``--data bible|builtin|pairs:PATH``) the study is
:mod:`negbatch.lab.studies.text_gradcache`.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..folder import atomic_write_text, resolve_device
from ..sweep import adopt_earlier_runs, parse_list, run_key
from .base import ImageStudy, keep_plan_results, say
from .gradcache_measure import DATA_KINDS, measure_in_subprocess
from .gradcache_report import METHODS, MIB, report, write_table

__all__ = ["ImageGradCache", "DEFAULT_BATCHES"]

DEFAULT_BATCHES = "64,128,256,512,1024,2048,4096"


class ImageGradCache(ImageStudy):
    """The gradcache study on images: measurements in fresh processes, then short trainings."""

    name = "gradcache"
    summary = "memory, time and accuracy of gradient caching against batch size"
    key_fields = ("batch_size", "chunk_size", "chunk_method", "seed")
    takes_config = False  # its options are its own (see add_arguments)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("what is measured")
        g.add_argument("--out", default=None, help="study folder (default: negbatch-runs/gradcache-DATA-ENCODER)")
        g.add_argument("--data", "--dataset", dest="data", default="digits", choices=tuple(DATA_KINDS),
                       help="data set (default: digits)")
        g.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
        g.add_argument("--encoder", default="mlp", choices=("mlp", "conv"), help="the lab's encoder (default: mlp)")
        g.add_argument("--encoder-widths", default="256,128", help="MLP widths or conv channels (default: 256,128)")
        g.add_argument("--head-widths", default="256,64", help="projection head widths (default: 256,64)")
        g.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature (default: 0.2)")
        g.add_argument("--batch-sizes", default=DEFAULT_BATCHES,
                       help=f"batch sizes (pairs) to measure (default: {DEFAULT_BATCHES})")
        g.add_argument("--chunk-size", type=int, default=64,
                       help="pairs per chunk for accumulation and caching (default: 64)")
        g.add_argument("--methods", default=",".join(METHODS), help="comma list of plain, accumulate, cache (default: all)")
        g.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (default: 3)")
        g.add_argument("--steps", type=int, default=3,
                       help="timed steps per process, after the memory-measured first step (default: 3)")
        g.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
        g.add_argument("--threads", type=int, default=1, help="torch threads of each measuring process (default: 1)")
        a = parser.add_argument_group("downstream accuracy (short trainings)")
        a.add_argument("--accuracy-batch-sizes", default="64,256,1024",
                       help="batch sizes of the trainings, or 'none' (default: 64,256,1024)")
        a.add_argument("--accuracy-chunk-size", type=int, default=32, help="chunk of the chunked trainings (default: 32)")
        a.add_argument("--seeds", default="0,1", help="seeds of the trainings (default: 0,1)")
        a.add_argument("--epochs", type=int, default=10, help="epochs per training (default: 10)")
        a.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: 0.002)")
        a.add_argument("--n-train", type=int, default=None, help="training images (default: all; fashion-mnist: 5000)")
        a.add_argument("--n-test", type=int, default=None, help="test images (default: all; fashion-mnist: 2000)")
        a.add_argument("--workers", type=int, default=1, help="worker processes for the trainings (default: 1)")

    def run(self, args: argparse.Namespace) -> Path:
        try:
            return self._run(args)
        finally:
            self.release_folder()  # held from its study.json on (write_spec)

    def _run(self, args: argparse.Namespace) -> Path:
        from ..processes import Processes

        if Processes.current().several:
            raise ValueError("the gradcache study measures the memory of one process's steps; run it without torchrun")
        _check_args(args)
        batches = parse_list(args.batch_sizes, int, "batch-sizes")
        methods = parse_list(args.methods, str, "methods")
        if any(m not in METHODS for m in methods):
            raise ValueError(f"--methods: expected a comma list of {', '.join(METHODS)}, got {args.methods!r}")
        if any(b < 2 for b in batches):
            raise ValueError(f"--batch-sizes must all be >= 2 (a pair needs a negative), got {batches}")
        acc_batches = ([] if args.accuracy_batch_sizes.lower() in ("none", "")
                       else parse_list(args.accuracy_batch_sizes, int, "accuracy-batch-sizes"))
        seeds = self.seeds(args)
        if acc_batches:
            self._check_accuracy_batches(args, acc_batches)  # before the measurements, not after them
        base = _spec_base(args)
        out = Path(args.out or f"negbatch-runs/gradcache-{args.data}-{args.encoder}")
        spec_path = out / "study.json"
        self._check_folder_holds_this_study(out)  # another study's folder is named as such
        if spec_path.exists():
            old = json.loads(spec_path.read_text())
            if old.get("measure") != base:
                changed = sorted(k for k in base if old.get("measure", {}).get(k) != base[k])
                raise ValueError(f"{out} holds a gradcache study of another setup (differs in {', '.join(changed)}); "
                                 "use another --out")
        (out / "measurements").mkdir(parents=True, exist_ok=True)
        self.write_spec(out, {"measure": base, "batch_sizes": batches, "methods": methods, "repeats": args.repeats,
                              "accuracy": {"batch_sizes": acc_batches, "chunk_size": args.accuracy_chunk_size,
                                           "seeds": seeds, "epochs": args.epochs, "lr": args.lr}})
        # The trainings' table keeps only this plan's (as write_spec does for a study's runs): an earlier
        # invocation's trainings (other seeds, epochs, batch sizes, or none now) stay under accuracy/runs.
        trainings = self._accuracy_configs(args, acc_batches, seeds)
        adopt_earlier_runs(out / "accuracy", trainings, self.key_fields)  # run folders named before 2026-12-03
        keep_plan_results(out / "accuracy", {run_key(c, self.key_fields) for c in trainings}, "training(s)")

        import torch

        pool = out / "pool.pt"
        # A rerun may ask for larger batches than the saved pool holds: remake it (the
        # pool is the first max(B) training images, so the old one is its prefix).
        if not pool.exists() or torch.load(pool, weights_only=True).shape[0] < max(batches):
            tmp = pool.with_name(f".pool.{os.getpid()}.tmp")
            torch.save(DATA_KINDS[args.data][0](args, max(batches)), tmp)
            os.replace(tmp, pool)

        todo = [(r, b, m) for r in range(args.repeats) for b in batches for m in methods]
        path = lambda r, b, m: out / "measurements" / f"{m}-B{b}-r{r}.json"  # noqa: E731
        left = [t for t in todo if not path(*t).exists()]
        say(f"gradcache study (image): {len(todo)} measurements into {out}"
            + (f"; {len(todo) - len(left)} done earlier (skipped)" if len(left) < len(todo) else ""))
        for i, (r, b, m) in enumerate(left, 1):
            result = measure_in_subprocess({**base, "method": m, "batch_size": b, "repeat": r}, pool)
            atomic_write_text(path(r, b, m), json.dumps(result))
            what = ("out of memory" if result.get("oom")
                    else f"{result['step_bytes'] / MIB:.1f} MiB, {result['time_s'] * 1e3:.1f} ms")
            say(f"[{i}/{len(left)}] {m} B={b} repeat {r}: {what}")
        write_table(out)

        if acc_batches:
            self._train_accuracy(args, out, acc_batches, seeds)
        report(out)
        return out

    @staticmethod
    def _accuracy_base(args: argparse.Namespace) -> TrainConfig:
        """The configuration of the short trainings, before batch size, chunking and seed."""
        n_train, n_test = args.n_train, args.n_test
        if args.data == "fashion-mnist":
            n_train, n_test = n_train or 5000, n_test or 2000
        return TrainConfig(dataset=args.data, data_dir=args.data_dir, n_train=n_train, n_test=n_test,
                           encoder=args.encoder, encoder_widths=tuple(parse_list(args.encoder_widths, int, "encoder-widths")),
                           head_widths=tuple(parse_list(args.head_widths, int, "head-widths")),
                           temperature=args.temperature, epochs=args.epochs, lr=args.lr, snr=False, device=args.device)

    def _check_accuracy_batches(self, args: argparse.Namespace, acc_batches: list[int]) -> None:
        from ..tasks.image import load_image_data

        base = self._accuracy_base(args)
        n = load_image_data(base).subset(base.n_train, base.n_test).x_train.shape[0]
        wrong = [b for b in acc_batches if not 2 <= b <= n]
        if wrong:
            raise ValueError(f"--accuracy-batch-sizes: {wrong} outside [2, {n}] (the training images); lower them, "
                             f"raise --n-train, or give 'none'")

    def _accuracy_configs(self, args: argparse.Namespace, acc_batches: list[int], seeds: list[int]) -> list[TrainConfig]:
        if not acc_batches:
            return []
        base = self._accuracy_base(args)
        configs = []
        for b in acc_batches:
            for method in METHODS:
                chunk = None if method == "plain" else args.accuracy_chunk_size
                for seed in seeds:
                    configs.append(base.replace(batch_size=b, chunk_size=chunk,
                                                chunk_method="cache" if method == "plain" else method, seed=seed))
        return configs

    def _train_accuracy(self, args: argparse.Namespace, out: Path, acc_batches: list[int], seeds: list[int]) -> None:
        configs = self._accuracy_configs(args, acc_batches, seeds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # BatchNorm per chunk: stated in the report
            self.train(configs, out / "accuracy", args.workers, what="trainings")

    def line(self, summary: dict[str, Any]) -> str:
        c = summary["config"]
        method = f"chunk={c['chunk_size']} {c['chunk_method']}" if c["chunk_size"] else "plain"
        return (f"train B={c['batch_size']} {method} seed={c['seed']}: "
                f"linear {summary['linear_acc']:.3f}")

    def report(self, folder: Path) -> Path:
        return report(folder)


def _spec_base(args: argparse.Namespace) -> dict[str, Any]:
    return {"data": args.data, "encoder": args.encoder,
            "encoder_widths": parse_list(args.encoder_widths, int, "encoder-widths"),
            "head_widths": parse_list(args.head_widths, int, "head-widths"), "temperature": args.temperature,
            "chunk_size": args.chunk_size, "steps": args.steps, "threads": args.threads,
            "device": str(resolve_device(args.device))}


def _check_args(args: argparse.Namespace) -> None:
    for name in ("chunk_size", "repeats", "steps", "threads", "accuracy_chunk_size", "epochs", "workers"):
        v = getattr(args, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {v!r}")
    if not args.temperature > 0 or not args.lr > 0:
        raise ValueError("--temperature and --lr must be > 0")
