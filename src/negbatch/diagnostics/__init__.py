"""Diagnostics that watch what batches and gradients do."""

from .gap import GapResult, global_train_gap

__all__ = ["GapResult", "global_train_gap"]
