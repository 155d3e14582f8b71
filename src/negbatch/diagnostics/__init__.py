"""Diagnostics: gradient signal-to-noise and representation geometry."""

from .geometry import alignment, intra_class_distance, silhouette_score, uniformity
from .snr import GradientSNR

__all__ = ["GradientSNR", "alignment", "intra_class_distance", "silhouette_score", "uniformity"]
