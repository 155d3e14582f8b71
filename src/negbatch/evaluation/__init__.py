"""Evaluation of frozen representations: linear probe and kNN accuracy."""

from .knn import knn_accuracy
from .linear import fit_logistic_regression, linear_probe

__all__ = ["knn_accuracy", "fit_logistic_regression", "linear_probe"]
