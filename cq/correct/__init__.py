"""Decoupled error correction (CacheQuant DEC): per-step, per-channel affine corrections fitted in closed form."""

from .cache_error import CacheErrorCorrector
from .correction import ChannelAffine
from .corrector import Corrector, Stage
from .moments import ChannelMoments, affine_fit
from .quant_error import QuantErrorCorrector


__all__ = [
    "Corrector",
    "Stage",
    "CacheErrorCorrector",
    "QuantErrorCorrector",
    "ChannelAffine",
    "ChannelMoments",
    "affine_fit",
]
