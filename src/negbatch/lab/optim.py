"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .config import TrainConfig
from .lars import LARS

__all__ = ["build_optimizer", "build_schedule", "WarmupCosine"]


def build_optimizer(cfg: TrainConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params``, with ``lr``, ``weight_decay`` and (sgd, lars) ``momentum``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return LARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class WarmupCosine:
    """Learning-rate factor: linear warm-up to 1 over ``warmup`` steps, then
    cosine decay to 0 at ``total`` steps (a picklable callable for LambdaLR).

    Examples
    --------
    >>> f = WarmupCosine(warmup=2, total=6)
    >>> [round(f(s), 2) for s in range(7)]
    [0.5, 1.0, 1.0, 0.85, 0.5, 0.15, 0.0]
    """

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, max(total, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.total - self.warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class Constant:
    """Learning-rate factor 1 after a linear warm-up over ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        return (step + 1) / self.warmup if step < self.warmup else 1.0


def build_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """``cfg.schedule`` as a LambdaLR: cosine (after ``warmup_steps``) or constant."""
    factor = WarmupCosine(cfg.warmup_steps, total_steps) if cfg.schedule == "cosine" else Constant(cfg.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
