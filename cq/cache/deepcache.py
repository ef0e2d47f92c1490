"""DeepCache (Ma, Fang, Wang, CVPR 2024): reuse the high-level feature entering one decoder block.

At refresh steps the full UNet runs and the feature entering ``point`` is stored; at the other steps only the
encoder prefix and the decoder suffix around ``point`` run, reading the stored feature. The default point is the
model's ``default_cache_point()``: for DDPM UNets DeepCache's ``--branch 2`` (``"up.1.block.2"`` for CIFAR, as in
CacheQuant's CIFAR experiments); for LDM/SD UNets the shallowest point (``input_blocks[0]`` +
``output_blocks[-1]``, CacheQuant's and DeepCache-LDM's cut).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from torch import Tensor, nn

from ..core.unet import check_cacheable
from ..errors import CachePointError, ConfigError, ScheduleInvalidError
from ..registry import CACHERS
from .cacher import Cacher, FeatureCache
from .schedule import Schedule


if TYPE_CHECKING:
    from ..calib.trace import Trace

__all__ = ["DeepCache"]


@CACHERS.register("deepcache")
@dataclass(frozen=True, kw_only=True)
class DeepCache(Cacher):
    """Feature caching at one named point with a pluggable refresh schedule.

    Args:
        schedule: a `Schedule` (`UniformSchedule`, `Power`, `DPS`, ...).
        point: cache point name; None picks the UNet's ``default_cache_point()`` (DDPM: DeepCache's branch 2,
            CacheQuant's CIFAR setting); LDM/SD UNets default to their shallowest point (CacheQuant's cut).

    Example:
        >>> cacher = DeepCache(schedule=DPS(interval=5)).fit(unet, trace)
        >>> model = CompressedUNet(unet, cacher=cacher, num_steps=trace.steps)
    """

    schedule: Schedule
    point: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise ConfigError(f"DeepCache.schedule must be a Schedule, got {type(self.schedule).__name__}")

    def resolve_point(self, unet: nn.Module) -> str:
        points = tuple(check_cacheable(unet, "DeepCache").cache_points())
        if self.point is None:
            return unet.default_cache_point()
        if self.point not in points:
            raise CachePointError(f"unknown cache point {self.point!r}; this UNet exposes {list(points)}")
        return self.point

    def points(self, unet: nn.Module) -> tuple[str, ...]:
        return (self.resolve_point(unet),)

    @property
    def needs_rollout(self) -> bool:
        return self.schedule.needs_rollout

    @property
    def quantized_rollout(self) -> bool:
        return self.schedule.quantized_rollout

    def fit(
        self, unet: nn.Module, trace: Trace | None, *, rollout: Callable[[DeepCache, int], Tensor] | None = None
    ) -> DeepCache:
        """Fit the schedule on the trace's features at the point; a schedule that `needs_rollout` also gets
        ``rollout`` (from `Recipe.fit`), narrowed to candidate schedules at this point."""
        point = self.resolve_point(unet)
        schedule = self.schedule
        if schedule.needs_fit:
            if trace is None or point not in trace.features:
                raise ScheduleInvalidError(
                    f"{type(schedule).__name__} is fitted on the features at {point!r}: pass a trace recorded with "
                    f"points=[{point!r}] (cq.trace(unet, ..., points=cacher.points(unet)))"
                )
            features = trace.features[point]
            kwargs = {}
            if schedule.needs_rollout:
                if rollout is None:
                    raise ScheduleInvalidError(
                        f"{type(schedule).__name__} searches on the compressed model's end-to-end error: fit it "
                        "through Recipe.fit(unet, trace), which provides the rollout"
                    )
                kwargs["rollout"] = lambda candidate, n: rollout(replace(self, point=point, schedule=candidate), n)
            settings = trace.settings
            if settings is not None and settings.steps != features.shape[0]:  # PLMS: steps + 1 model calls
                kwargs["sampler_steps"] = settings.steps
            schedule = schedule.fit(features, **kwargs)
        return replace(self, point=point, schedule=schedule)

    def label(self) -> str:
        return f"{type(self).__name__}({type(self.schedule).__name__}, point={self.point})"

    def build(self, unet: nn.Module, num_steps: int) -> FeatureCache:
        return FeatureCache(self.resolve_point(unet), self.schedule.refresh_mask(num_steps))
