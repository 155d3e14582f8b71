"""Contrastive objectives."""

from .infonce import InfoNCE, info_nce_per_anchor
from .relic import ReLIC

__all__ = ["InfoNCE", "ReLIC", "info_nce_per_anchor"]
