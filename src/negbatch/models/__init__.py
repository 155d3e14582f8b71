"""Encoders for small images and projection heads (text encoders in :mod:`negbatch.models.text`)."""

from .encoders import ConvEncoder, MLPEncoder, build_encoder
from .heads import ContrastiveModel, ProjectionHead

__all__ = ["ConvEncoder", "MLPEncoder", "build_encoder", "ContrastiveModel", "ProjectionHead"]
