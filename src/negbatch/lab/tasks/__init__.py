"""What a kind of data plugs into the run skeleton (:func:`negbatch.lab.run.train`).

A task owns the data, the model, the objective and the batches of one run; the
skeleton owns everything else (folder, checkpoints, random streams, rows,
summary, interruption). Two tasks exist, chosen by the data set
(:func:`negbatch.lab.config.task_of`):

* :class:`~negbatch.lab.tasks.image.ImageTask` -- two augmented views per image;
* :class:`~negbatch.lab.tasks.text.TextTask` -- (query, document) pairs.

A new kind of data is one more :class:`Task` subclass and one line in
:data:`TASKS`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import TrainConfig
from .base import Task

__all__ = ["Task", "TASKS", "make_task"]


def make_task(cfg: TrainConfig, device: torch.device, data: Any = None) -> Task:
    """The task of ``cfg.dataset``, its data loaded."""
    return TASKS[cfg.task](cfg, device, data)


def _image(cfg, device, data):
    from .image import ImageTask

    return ImageTask(cfg, device, data)


def _text(cfg, device, data):
    from .text import TextTask

    return TextTask(cfg, device, data)


TASKS = {"image": _image, "text": _text}
