"""How batches are composed: GCBS and its baselines, all usable as a
DataLoader's ``batch_sampler`` and under torch.distributed."""

from .baselines import HardNegativeBatchSampler, NoDuplicateBatchSampler, RandomBatchSampler, kmeans
from .embedding import embed_dataset
from .epoch_sampler import EpochBatchSampler, cut_into_batches
from .gcbs import GCBSampler, gcbs_order, num_kept_entries, similarity_graph

__all__ = [
    "EpochBatchSampler",
    "GCBSampler",
    "RandomBatchSampler",
    "HardNegativeBatchSampler",
    "NoDuplicateBatchSampler",
    "gcbs_order",
    "similarity_graph",
    "num_kept_entries",
    "embed_dataset",
    "cut_into_batches",
    "kmeans",
]
