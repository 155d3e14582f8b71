"""Contrastive objectives."""

from .global_nce import GlobalInfoNCE
from .infonce import InfoNCE, info_nce_per_anchor
from .relic import ReLIC

__all__ = ["InfoNCE", "ReLIC", "info_nce_per_anchor", "GlobalInfoNCE"]
