"""The lab: training, studies, reports (may use scikit-learn, matplotlib, tqdm)."""

from .config import TrainConfig, load_config_file
from .trainer import build_batch_sampler, build_loss, forward_backward, read_metrics, train
from .text_runs import TextRunConfig, run_text_configs, train_text_run

__all__ = ["TrainConfig", "load_config_file", "build_batch_sampler", "build_loss", "forward_backward", "read_metrics", "train", "TextRunConfig", "train_text_run", "run_text_configs"]
