"""Evaluation of frozen representations: linear probe, kNN accuracy, retrieval metrics."""

from .knn import knn_accuracy
from .linear import fit_logistic_regression, linear_probe
from .retrieval import retrieval_metrics

__all__ = ["knn_accuracy", "fit_logistic_regression", "linear_probe", "retrieval_metrics"]
