"""Feature caching: the `CacheView` slot models expose, refresh schedules and cachers."""

from .cacher import Cacher, FeatureCache
from .deepcache import DeepCache
from .dps import DPS, dp_partition
from .power import Power
from .schedule import Schedule
from .uniform import Uniform
from .view import CacheView


__all__ = ["CacheView", "Cacher", "DeepCache", "FeatureCache", "Schedule", "Uniform", "Power", "DPS", "dp_partition"]
