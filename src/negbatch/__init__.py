"""negbatch: how should batches and negatives be formed in contrastive learning?

The library (this package minus ``negbatch.lab`` and ``negbatch.cli``) needs
only torch, numpy and scipy.
"""

from .losses import InfoNCE, ReLIC, info_nce_per_anchor
from .negatives import NegativeSelection, same_id_mask, select_negatives, selection_logits
from .data.text import TextPairs, bible_pairs, builtin_pairs, load_pairs
from .evaluation.retrieval import retrieval_metrics
from .models.text import TextTokenizer, TransformerTextEncoder
from .text_training import train_text_pairs

__version__ = "0.1.0"

__all__ = [
    "InfoNCE",
    "ReLIC",
    "info_nce_per_anchor",
    "NegativeSelection",
    "select_negatives",
    "selection_logits",
    "same_id_mask",
    "__version__",
    "TextPairs",
    "bible_pairs",
    "builtin_pairs",
    "load_pairs",
    "retrieval_metrics",
    "TextTokenizer",
    "TransformerTextEncoder",
    "train_text_pairs",
]
