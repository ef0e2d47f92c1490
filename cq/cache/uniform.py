"""DeepCache's uniform schedule: refresh every ``interval`` steps, ``range(0, T, N)`` (Ma et al. 2024, Sec. 3.3)."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import SCHEDULES, deprecated_names
from .schedule import Schedule, check_mask, positive_int


__all__ = ["UniformSchedule"]


@SCHEDULES.register("uniform")
@dataclass(frozen=True, kw_only=True)
class UniformSchedule(Schedule):
    """Refresh steps ``0, N, 2N, ...``; ``ceil(T/N)`` full forwards. ``interval=1`` never reuses the cache.

    Args:
        interval: N, the cache interval (>= 1).
    """

    interval: int

    def __post_init__(self) -> None:
        positive_int("UniformSchedule", "interval", self.interval)

    def refresh_mask(self, num_steps: int) -> tuple[bool, ...]:
        return check_mask(tuple(i % self.interval == 0 for i in range(num_steps)), num_steps, self)


__getattr__ = deprecated_names(__name__, {"Uniform": UniformSchedule})  # its former name, for one release
