"""Evaluation of frozen representations: features of whole splits, linear
evaluation, kNN accuracy, retrieval metrics."""

from .features import extract_features
from .knn import knn_accuracy, weighted_knn_accuracy, weighted_knn_predict
from .linear import fit_logistic_regression, linear_eval, linear_probe
from .retrieval import retrieval_metrics

__all__ = [
    "extract_features",
    "knn_accuracy",
    "weighted_knn_accuracy",
    "weighted_knn_predict",
    "fit_logistic_regression",
    "linear_eval",
    "linear_probe",
    "retrieval_metrics",
]
