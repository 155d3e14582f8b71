"""The lab: training runs, studies, reports (may use scikit-learn, matplotlib, tqdm).

One run skeleton (:func:`train`, in :mod:`negbatch.lab.run`) trains either
task (:mod:`negbatch.lab.tasks`: images or text pairs) from one configuration
(:class:`TrainConfig`); the studies (:mod:`negbatch.lab.studies`) sweep it.
"""

from .config import TrainConfig, load_config_file
from .run import read_metrics, train

__all__ = ["TrainConfig", "load_config_file", "read_metrics", "train"]
