"""A richer DEC cache correction: per step, the per-channel affine plus a rank-r least-squares map across channels.

CacheQuant's DEC (`CacheErrorCorrector`, Sec. 3.3) corrects the stale feature ``F_s(i)`` channel by channel. At a
shallow cache point (the demo's ``up.0.block.2``: a 32-channel 16x16 feature) the stale feature's channels drift
together and a per-channel gain cannot follow them. Here, for each cached step i,
``F_i ≈ a_i ∘ F_s(i) + M_i F_s(i) + b_i`` with ``M_i`` of rank <= r fitted in closed form from streamed second
moments (`cq.correct.cross_moments`), ridge-regularised towards the per-channel affine, so on its fitting data it
is never worse than DEC; identity at refresh steps. Applied to the cached tensor before the shallow call, like DEC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from ..errors import ConfigError
from ..registry import CORRECTORS
from .corrector import Corrector, Stage
from .cross_moments import CrossMoments, low_rank_affine_fit
from .low_rank_affine import LowRankAffine
from .moments import add_cached_steps


if TYPE_CHECKING:
    from ..calib.trace import Trace
    from ..compressed import CompressedUNet

__all__ = ["CacheErrorLowRank"]


@CORRECTORS.register("cache_error_lowrank")
@dataclass(frozen=True, kw_only=True)
class CacheErrorLowRank(Corrector):
    """Per-step affine plus rank-r cross-channel map from the stale cached feature to the fresh one.

    Args:
        rank: rank of the cross-channel map (None: full, the point's channel count; larger ranks are capped
            at it). Extra cost per cached step: ``2 r C`` MACs per pixel of the cached feature.
        ridge: ridge penalty relative to the mean channel variance (>= 0; shrinks towards DEC's affine).
        chunk: trajectories per statistics update (memory vs. speed).
    """

    stage: ClassVar[Stage] = Stage.BEFORE_QUANTIZATION
    slot: ClassVar[str] = "cache.correction"
    rank: int | None = None
    ridge: float = 1e-3
    chunk: int = 16

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"CacheErrorLowRank.rank must be an int >= 1 or None (full rank), got {self.rank!r}")
        if not (isinstance(self.ridge, (int, float)) and self.ridge >= 0):
            raise ConfigError(f"CacheErrorLowRank.ridge must be a number >= 0, got {self.ridge!r}")
        if self.chunk < 1:
            raise ConfigError(f"CacheErrorLowRank.chunk must be >= 1, got {self.chunk}")

    def rank_for(self, channels: int) -> int:
        return channels if self.rank is None else min(self.rank, channels)

    def attach(self, model: CompressedUNet) -> None:
        if model.cache is None:
            raise ConfigError("CacheErrorLowRank needs a model with a cacher (nothing is cached otherwise)")
        channels = model.unet.cache_channels(model.cache.point)
        model.cache.correction = LowRankAffine(model.num_steps, channels, self.rank_for(channels))

    def fit(self, model: CompressedUNet, reference: nn.Module, trace: Trace, *, progress: bool = False) -> None:
        self.attach(model)
        cache = model.cache
        if cache.point not in trace.features:
            raise ConfigError(
                f"CacheErrorLowRank needs trace features at {cache.point!r}; record the trace with "
                "points=recipe.points(unet)"
            )
        features = trace.features[cache.point]  # [T, k, C, ...]
        moments = CrossMoments(model.num_steps, features.shape[2])
        add_cached_steps(moments, cache, features, self.chunk)
        cache.correction.fill(*low_rank_affine_fit(moments, cache.correction.rank, float(self.ridge)))
