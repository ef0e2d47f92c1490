"""Feature caching: the `CacheView` slot models expose, refresh schedules and cachers."""

from .._moved import package_getattr
from ..core.view import CacheView
from ..registry import deprecated_names
from .cacher import Cacher, FeatureCache
from .deepcache import DeepCache
from .dps import DPS, dp_partition
from .power import Power
from .schedule import Schedule
from .search import TrajectorySearch
from .sensitivity_dp import SensitivityDP
from .uniform import UniformSchedule


__all__ = [
    "CacheView",
    "Cacher",
    "DeepCache",
    "FeatureCache",
    "Schedule",
    "UniformSchedule",
    "Power",
    "DPS",
    "TrajectorySearch",
    "SensitivityDP",
    "dp_partition",
]


# former names, for one release: `Uniform` (now `UniformSchedule`), `BudgetCache` (now in `cq.fit`)
__getattr__ = package_getattr(
    __name__, {"BudgetCache": "cq.fit"}, deprecated_names(__name__, {"Uniform": UniformSchedule}, stacklevel=3)
)
