"""Decoupled error correction (CacheQuant DEC): per-step, per-channel affine corrections fitted in closed form."""

from .cache_error import CacheErrorCorrector
from .cache_error_lowrank import CacheErrorLowRank
from .correction import ChannelAffine
from .corrector import Corrector, Stage
from .cross_moments import CrossMoments, low_rank_affine_fit
from .low_rank_affine import LowRankAffine
from .moments import ChannelMoments, add_cached_steps, affine_fit
from .quant_error import QuantErrorCorrector


__all__ = [
    "Corrector",
    "Stage",
    "CacheErrorCorrector",
    "CacheErrorLowRank",
    "add_cached_steps",
    "QuantErrorCorrector",
    "ChannelAffine",
    "ChannelMoments",
    "affine_fit",
    "LowRankAffine",
    "CrossMoments",
    "low_rank_affine_fit",
]
