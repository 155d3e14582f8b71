"""Contrastive objectives."""

from .dcl import DCL
from .filtering import false_negative_mask
from .global_nce import GlobalInfoNCE
from .infonce import InfoNCE, info_nce_per_anchor
from .queue import NegativeQueue
from .relic import ReLIC
from .siglip import SigLIP
from .temperature import LearnableTemperature

__all__ = [
    "InfoNCE",
    "ReLIC",
    "info_nce_per_anchor",
    "GlobalInfoNCE",
    "DCL",
    "SigLIP",
    "NegativeQueue",
    "LearnableTemperature",
    "false_negative_mask",
]
