"""The lab: training, studies, reports (may use scikit-learn, matplotlib, tqdm)."""

from .config import TrainConfig, load_config_file
from .trainer import build_batch_sampler, build_loss, forward_backward, read_metrics, train

__all__ = ["TrainConfig", "load_config_file", "build_batch_sampler", "build_loss", "forward_backward", "read_metrics", "train"]
