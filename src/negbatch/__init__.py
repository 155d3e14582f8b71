"""negbatch: how should batches and negatives be formed in contrastive learning?

The library (this package minus ``negbatch.lab`` and ``negbatch.cli``) needs
only torch, numpy and scipy.
"""

from .losses import InfoNCE, ReLIC, info_nce_per_anchor
from .negatives import NegativeSelection, same_id_mask, select_negatives, selection_logits
from .data import Augment, ImageDataset, from_arrays, load_dataset
from .diagnostics import GradientSNR, alignment, intra_class_distance, silhouette_score, uniformity
from .evaluation import knn_accuracy, linear_probe
from .models import ContrastiveModel, ConvEncoder, MLPEncoder, ProjectionHead

__version__ = "0.1.0"

__all__ = [
    "InfoNCE",
    "ReLIC",
    "info_nce_per_anchor",
    "NegativeSelection",
    "select_negatives",
    "selection_logits",
    "same_id_mask",
    "Augment",
    "ImageDataset",
    "from_arrays",
    "load_dataset",
    "GradientSNR",
    "alignment",
    "intra_class_distance",
    "silhouette_score",
    "uniformity",
    "knn_accuracy",
    "linear_probe",
    "ContrastiveModel",
    "ConvEncoder",
    "MLPEncoder",
    "ProjectionHead",
    "__version__",
]
