"""negbatch: how should batches and negatives be formed in contrastive learning?

The library (this package minus ``negbatch.lab`` and ``negbatch.cli``) needs
only torch, numpy and scipy.
"""

from .gradcache import GradCache
from .losses import DCL, GlobalInfoNCE, InfoNCE, ReLIC, SigLIP, info_nce_per_anchor
from .momentum import MomentumEncoder
from .negatives import NegativeSelection, same_id_mask, select_negatives, selection_logits
from .diagnostics.gap import GapResult, global_train_gap
from .sampling import (
    GCBSampler,
    HardNegativeBatchSampler,
    NoDuplicateBatchSampler,
    RandomBatchSampler,
    gcbs_order,
)
from .data.text import TextPairs, bible_pairs, builtin_pairs, load_pairs
from .evaluation.retrieval import retrieval_metrics
from .models.text import TextTokenizer, TransformerTextEncoder
from .data import Augment, ImageDataset, from_arrays, load_dataset
from .diagnostics import GradientSNR, alignment, intra_class_distance, silhouette_score, uniformity
from .evaluation import knn_accuracy, linear_probe
from .models import ContrastiveModel, ConvEncoder, MLPEncoder, ProjectionHead

__version__ = "0.1.0"

__all__ = [
    "InfoNCE",
    "ReLIC",
    "DCL",
    "SigLIP",
    "MomentumEncoder",
    "info_nce_per_anchor",
    "NegativeSelection",
    "select_negatives",
    "selection_logits",
    "same_id_mask",
    "GCBSampler",
    "RandomBatchSampler",
    "HardNegativeBatchSampler",
    "NoDuplicateBatchSampler",
    "gcbs_order",
    "global_train_gap",
    "GapResult",
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
    "GradCache",
    "GlobalInfoNCE",
    "TextPairs",
    "bible_pairs",
    "builtin_pairs",
    "load_pairs",
    "retrieval_metrics",
    "TextTokenizer",
    "TransformerTextEncoder",
]
