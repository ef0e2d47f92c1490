"""Feature caching: the `CacheView` slot models expose, refresh schedules and cachers."""

from .cacher import Cacher, FeatureCache
from .deepcache import DeepCache
from .dps import DPS, dp_partition
from .power import Power
from .schedule import Schedule
from .uniform import UniformSchedule
from .view import CacheView


__all__ = [
    "CacheView",
    "Cacher",
    "DeepCache",
    "FeatureCache",
    "Schedule",
    "UniformSchedule",
    "Power",
    "DPS",
    "dp_partition",
]


def __getattr__(name: str) -> type:
    if name == "Uniform":  # the name before UniformSchedule; kept one release
        from ..registry import deprecated_alias

        return deprecated_alias("cq.cache.Uniform", UniformSchedule)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
