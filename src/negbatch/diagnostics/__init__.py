"""Diagnostics that watch the gradients of contrastive training."""

from .bias import BiasEstimate, ExactGlobalGradient, bias_curve, exact_global_gradient, gradient_bias, minibatch_gradient

__all__ = [
    "BiasEstimate",
    "ExactGlobalGradient",
    "bias_curve",
    "exact_global_gradient",
    "gradient_bias",
    "minibatch_gradient",
]
