"""Diagnostics that watch training: gradient signal-to-noise, gradient bias,
the global-minus-training loss gap, and representation geometry."""

from .bias import (
    BiasEstimate,
    ExactGlobalGradient,
    bias_curve,
    exact_global_gradient,
    gradient_bias,
    minibatch_gradient,
)
from .gap import GapResult, global_train_gap
from .geometry import alignment, intra_class_distance, silhouette_score, uniformity
from .snr import GradientSNR

__all__ = [
    "BiasEstimate",
    "ExactGlobalGradient",
    "bias_curve",
    "exact_global_gradient",
    "gradient_bias",
    "minibatch_gradient",
    "GapResult",
    "global_train_gap",
    "GradientSNR",
    "alignment",
    "intra_class_distance",
    "silhouette_score",
    "uniformity",
]
