"""Encoders for images (MLP, small ResNet, ResNet-18/50), projection heads
(text encoders in :mod:`negbatch.models.text`)."""

from .encoders import ENCODERS, ConvEncoder, MLPEncoder, build_encoder
from .heads import HEAD_PRESETS, ContrastiveModel, ProjectionHead
from .resnet import ResNet, resnet18, resnet50

__all__ = [
    "ConvEncoder",
    "MLPEncoder",
    "ResNet",
    "resnet18",
    "resnet50",
    "build_encoder",
    "ENCODERS",
    "ContrastiveModel",
    "ProjectionHead",
    "HEAD_PRESETS",
]
