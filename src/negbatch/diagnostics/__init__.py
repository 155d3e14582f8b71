"""Diagnostics that watch what batches and gradients do: gradient bias, the
global-minus-training loss gap."""

from .bias import (
    BiasEstimate,
    ExactGlobalGradient,
    bias_curve,
    exact_global_gradient,
    gradient_bias,
    minibatch_gradient,
)
from .gap import GapResult, global_train_gap

__all__ = [
    "BiasEstimate",
    "ExactGlobalGradient",
    "bias_curve",
    "exact_global_gradient",
    "gradient_bias",
    "minibatch_gradient",
    "GapResult",
    "global_train_gap",
]
