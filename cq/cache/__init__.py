"""Feature caching: the `CacheView` slot models expose, refresh schedules and cachers."""

from ..registry import deprecated_names
from .budget_cache import BudgetCache
from .cacher import Cacher, FeatureCache
from .deepcache import DeepCache
from .dps import DPS, dp_partition
from .power import Power
from .schedule import Schedule
from .search import TrajectorySearch
from .sensitivity_dp import SensitivityDP
from .uniform import UniformSchedule
from .view import CacheView


__all__ = [
    "CacheView",
    "Cacher",
    "DeepCache",
    "BudgetCache",
    "FeatureCache",
    "Schedule",
    "UniformSchedule",
    "Power",
    "DPS",
    "TrajectorySearch",
    "SensitivityDP",
    "dp_partition",
]


__getattr__ = deprecated_names(__name__, {"Uniform": UniformSchedule})  # its former name, for one release
