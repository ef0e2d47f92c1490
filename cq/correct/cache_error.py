"""DEC cache-error correction (CacheQuant Sec. 3.3, ``error_dec/*_dec.py --error cache``).

At a cached step i the UNet reads the stale feature ``F_s(i)`` of its refresh step. Per step and channel,
``h <- a_i * h + b_i`` with the least-squares fit of the fresh full-precision feature ``F_i`` on ``F_s(i)``
(statistics over trajectories and pixels, streamed). Identity at refresh steps. Applied to the cached tensor
before the shallow call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from ..errors import ConfigError
from ..registry import CORRECTORS
from .correction import ChannelAffine
from .corrector import Corrector, Stage
from .moments import ChannelMoments, add_cached_steps, affine_fit


if TYPE_CHECKING:
    from ..calib.trace import Trace
    from ..compressed import CompressedUNet

__all__ = ["CacheErrorCorrector"]


@CORRECTORS.register("cache_error")
@dataclass(frozen=True, kw_only=True)
class CacheErrorCorrector(Corrector):
    """Per-step, per-channel affine map from the stale cached feature to the fresh one.

    Args:
        chunk: trajectories per statistics update (memory vs. speed).
    """

    stage: ClassVar[Stage] = Stage.BEFORE_QUANTIZATION
    slot: ClassVar[str] = "cache.correction"
    chunk: int = 16

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ConfigError(f"CacheErrorCorrector.chunk must be >= 1, got {self.chunk}")

    def attach(self, model: CompressedUNet) -> None:
        if model.cache is None:
            raise ConfigError("CacheErrorCorrector needs a model with a cacher (nothing is cached otherwise)")
        model.cache.correction = ChannelAffine(model.num_steps, model.unet.cache_channels(model.cache.point))

    def fit(self, model: CompressedUNet, reference: nn.Module, trace: Trace, *, progress: bool = False) -> None:
        self.attach(model)
        cache = model.cache
        if cache.point not in trace.features:
            raise ConfigError(f"CacheErrorCorrector needs trace features at {cache.point!r}")
        features = trace.features[cache.point]  # [T, k, C, ...]
        moments = ChannelMoments(model.num_steps, features.shape[2])
        add_cached_steps(moments, cache, features, self.chunk)
        gain, offset = affine_fit(moments)
        model.cache.correction.gain.copy_(gain)
        model.cache.correction.offset.copy_(offset)
