"""`Schedule`: which sampling steps refresh the cache (run the full UNet) and which reuse it.

A schedule is a frozen, validated value. ``refresh_mask(T)[i]`` is True when step ``i`` (0 = noisiest) runs the
full network. Schedules that learn from data implement ``fit(features)`` and return a *new* fitted value.
A schedule that judges candidates by the error of the compressed model itself declares ``needs_rollout``; its
``fit`` then also receives ``rollout=`` (a `ScheduleRollout`, provided by `Recipe.fit`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeAlias

from torch import Tensor

from ..errors import ConfigError, ScheduleInvalidError, StepCountMismatchError


__all__ = [
    "Schedule",
    "RolloutSchedule",
    "ScheduleRollout",
    "check_mask",
    "check_budget_fields",
    "fitted_mask",
    "refresh_steps",
    "positive_int",
]


class Schedule(ABC):
    """Base class of refresh schedules (register subclasses with ``@SCHEDULES.register(name)``)."""

    registry_kind: ClassVar[str] = "schedule"  # the registry its subclasses register in
    VERSION: ClassVar[int] = 1
    #: for a schedule that `needs_rollout`: whether the candidates are rolled out with the recipe's quantizer
    #: (calibrated once, tables shared by every candidate; `cq.fit.rollout.CalibrationRollout.of`) or in full precision
    quantized_rollout: ClassVar[bool] = True

    @abstractmethod
    def refresh_mask(self, num_steps: int) -> tuple[bool, ...]:
        """``num_steps`` booleans, True = full forward (refresh); element 0 is always True."""

    @property
    def needs_fit(self) -> bool:
        """True when `refresh_mask` needs `fit` first (data-driven schedules)."""
        return False

    @property
    def needs_rollout(self) -> bool:
        """True when `fit` needs ``rollout=``: the end-to-end error of the compressed model under a candidate
        schedule (`ScheduleRollout`). `Recipe.fit` provides it; `DeepCache.fit` passes it on."""
        return False

    def fit(self, features: Tensor) -> Schedule:
        """Return a schedule fitted to per-step features ``[T, ...]``; data-free schedules return themselves.

        When the T model calls come from fewer sampler steps (PLMS), `DeepCache.fit` also passes
        ``sampler_steps=`` (a schedule planning by sampler steps, like `DPS`, accepts it)."""
        return self

    def num_refreshes(self, num_steps: int) -> int:
        """Full forwards over ``num_steps`` steps. (Named apart from `DPS.refreshes`, DPS's budget field.)"""
        return sum(self.refresh_mask(num_steps))


#: ``rollout(candidate, trajectories) -> [trajectories]`` per-trajectory x0 MSE against full precision of the
#: compressed model whose schedule is ``candidate`` (fitted), sampled end to end from the first ``trajectories``
#: calibration trajectories' initial noise (`cq.fit.rollout.CalibrationRollout`); ``trajectories=None``: all it kept.
ScheduleRollout: TypeAlias = Callable[["Schedule", int | None], Tensor]


class RolloutSchedule(Schedule):
    """A schedule whose `fit` judges candidates by rollouts of the compressed model (`TrajectorySearch`,
    `SensitivityDP`) and records the refresh ``steps`` it chose: it needs a fit and a rollout until then."""

    @property
    def needs_fit(self) -> bool:
        return not self.steps

    @property
    def needs_rollout(self) -> bool:
        return not self.steps

    def fit_inputs(self, features: Tensor, rollout: ScheduleRollout | None) -> tuple[int, ScheduleRollout]:
        """``(T, rollout)`` checked: a rollout is given (`Recipe.fit` provides it), ``features`` has T >= 1 steps."""
        name = type(self).__name__
        if rollout is None:
            raise ScheduleInvalidError(
                f"{name}.fit needs rollout= (the compressed model's end-to-end error): fit it through "
                "Recipe.fit(unet, trace)"
            )
        positive_int(f"{name}.fit", "number of steps", features.shape[0])
        return features.shape[0], rollout


def check_mask(mask: tuple[bool, ...], num_steps: int, owner: object) -> tuple[bool, ...]:
    """Enforce the mask contract; raise `ScheduleInvalidError` naming the schedule otherwise."""
    if len(mask) != num_steps:
        raise ScheduleInvalidError(
            f"{owner!r}.refresh_mask({num_steps}) returned {len(mask)} entries; expected {num_steps}"
        )
    if num_steps and not mask[0]:
        raise ScheduleInvalidError(f"{owner!r}.refresh_mask({num_steps}) does not refresh step 0 (nothing to reuse)")
    return tuple(bool(m) for m in mask)


def fitted_mask(
    owner: object, steps: tuple[int, ...], fitted_for: int, num_steps: int, unfitted: str
) -> tuple[bool, ...]:
    """The mask of a schedule fitted to refresh ``steps`` over ``fitted_for`` steps (DPS, `TrajectorySearch`):
    `ScheduleInvalidError` (message ``unfitted``) before a fit, `StepCountMismatchError` for another step count."""
    name = type(owner).__name__
    if not steps:
        raise ScheduleInvalidError(f"{name} has not been fitted: {unfitted}")
    if num_steps != fitted_for:
        raise StepCountMismatchError(
            f"this {name} schedule was fitted for {fitted_for} steps, asked for {num_steps}; refit it on a "
            f"trace with {num_steps} steps"
        )
    hits = set(steps)
    return check_mask(tuple(i in hits for i in range(num_steps)), num_steps, owner)


def refresh_steps(mask: tuple[bool, ...]) -> tuple[int, ...]:
    return tuple(i for i, m in enumerate(mask) if m)


def positive_int(owner: str, name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def check_budget_fields(owner: object, *positive: str) -> None:
    """The fields a budgeted, fitted schedule (`DPS`, `TrajectorySearch`, `SensitivityDP`) shares: exactly one of
    ``interval`` / ``refreshes``; ``positive`` fields (and those two) ints >= 1 where set; ``min_len <= max_len``
    where both exist; ``tail`` a number >= 0 where it exists; fitted ``steps`` increasing from 0 below
    ``num_steps``. Raises `ConfigError` naming the class and field."""
    name = type(owner).__name__
    interval, refreshes = owner.interval, owner.refreshes
    if (interval is None) == (refreshes is None):
        raise ConfigError(f"{name} needs exactly one of interval or refreshes, got {interval}, {refreshes}")
    for field in ("interval", "refreshes", *positive):
        if getattr(owner, field) is not None:
            positive_int(name, field, getattr(owner, field))
    low, high = getattr(owner, "min_len", None), getattr(owner, "max_len", None)
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{name}.min_len={low} exceeds {name}.max_len={high}")
    tail = getattr(owner, "tail", 0.0)
    if isinstance(tail, bool) or not isinstance(tail, int | float) or not tail >= 0:
        raise ConfigError(f"{name}.tail must be a number >= 0, got {tail!r}")
    steps = owner.steps
    if steps and (steps[0] != 0 or list(steps) != sorted(set(steps)) or steps[-1] >= owner.num_steps):
        raise ConfigError(f"{name}.steps must be increasing, start at 0 and stay below num_steps; got {steps}")
