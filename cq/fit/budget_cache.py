"""`BudgetCache`: meet a compute budget with the least error -- the cache point, the number of full calls and
their placement chosen when the recipe is fitted (``cq.cachequant(budget="5x")``).

A budget ``B`` (a speedup over the uncached model) fixes, for each candidate point p, the most full calls K a
schedule may make: ``T F / (K F + (T - K) S_p) >= B``, with F and ``S_p`` the cost of a full call and of a shallow
call at p -- counted MACs (``measure="macs"``, `cq.metrics.macs.unet_macs`) or measured seconds on this machine
(``measure="wall"``, `cq.metrics.call_time.call_seconds`, on up to 16 rows of the trace's first-step inputs).
More full calls never hurt, so each point gets its largest K and DPS places them (``DPS(refreshes=K)``). Every
feasible point is then rolled out end to end on calibration trajectories by `Recipe.fit`'s rollout (the recipe's
body -- quantized once, tables shared by every candidate, when it has a quantizer -- with its cache correction,
`cq.fit.rollout.CalibrationRollout`) and the lowest-error point is kept. The fitted cacher is a plain `DeepCache`:
what is saved is the choice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from ..cache.cacher import Cacher, FeatureCache
from ..cache.deepcache import DeepCache
from ..cache.dps import DPS
from ..core.unet import check_cacheable
from ..errors import BudgetError, ConfigError, ScheduleInvalidError
from ..registry import CACHERS


if TYPE_CHECKING:
    from ..calib.trace import Trace

__all__ = ["BudgetCache", "feasible_refreshes", "parse_budget", "parse_budget_spec", "refreshes_for", "MEASURES"]

MEASURES = ("macs", "wall")


def parse_budget(text: str | float) -> float:
    """A MAC budget: ``"5x"`` / ``"5"`` / ``5.0`` -> 5.0 (a speedup >= 1); anything else, a wall-clock budget
    included, is a `ConfigError`."""
    speedup, measure = parse_budget_spec(text)
    if measure != "macs":
        raise ConfigError(
            f"{text!r} is a wall-clock budget; this takes a MAC budget (cq.cachequant(budget={text!r}) plans on "
            "measured seconds)"
        )
    return speedup


def parse_budget_spec(text: str | float) -> tuple[float, str]:
    """``"5x"`` -> ``(5.0, "macs")``, ``"2.5x wall"`` -> ``(2.5, "wall")``; a number is a MAC budget."""
    if not isinstance(text, str):
        return _speedup(text, text), "macs"
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*x?\s*(macs|wall)?\s*", text)
    if not m:
        raise ConfigError(
            f"a budget is a speedup like '5x' (MACs) or '2.5x wall' (measured seconds on this machine), got {text!r}"
        )
    return _speedup(float(m.group(1)), text), m.group(2) or "macs"


def _speedup(value: object, text: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 1 or math.isinf(value):
        raise ConfigError(f"a budget is a finite speedup >= 1 (1x: no saving), got {text!r}")
    return float(value)


def refreshes_for(full: float, shallow: float, num_steps: int, min_speedup: float) -> int:
    """The most full calls K out of ``num_steps`` meeting ``min_speedup``; 0 when even K = 1 does not."""
    if shallow >= full:
        return num_steps if min_speedup <= 1 else 0
    k = math.floor((num_steps * full / min_speedup - num_steps * shallow) / (full - shallow) + 1e-9)
    return max(0, min(k, num_steps))


def feasible_refreshes(
    costs: dict[str, float], points: Sequence[str], steps: int, speedup: float, unit: str = "macs"
) -> dict[str, int]:
    """``{point: K}`` for the points where ``K >= 1`` full calls meet ``speedup`` (`refreshes_for` on ``costs``:
    ``{"full": F, point: S_point}``); `BudgetError` naming the best reachable speedup when none does."""
    refreshes = {p: refreshes_for(costs["full"], costs[p], steps, speedup) for p in points}
    feasible = {p: k for p, k in refreshes.items() if k >= 1}
    if not feasible:
        best = min(points, key=lambda p: costs[p])
        reach = steps * costs["full"] / (costs["full"] + (steps - 1) * costs[best])
        raise BudgetError(
            f"no cache point reaches {speedup:g}x ({unit}) over {steps} calls: even one full call at the cheapest "
            f"point {best!r} gives {reach:.2f}x; lower the budget"
        )
    return feasible


@CACHERS.register("budget")
@dataclass(frozen=True, kw_only=True)
class BudgetCache(Cacher):
    """Caching that meets ``speedup`` with the least calibration error (module docstring).

    Args:
        speedup: the budget, a speedup >= 1 over the uncached model (``"5x"`` is parsed too).
        measure: ``"macs"`` (counted, machine-independent) or ``"wall"`` (measured on this machine at fit time:
            the choice then depends on the machine and its load).
        candidates: cache points to choose from (default: all of the UNet's).
        trajectories: calibration trajectories each candidate is rolled out on.
        repeats, timing_rows: for ``measure="wall"``, timed repetitions per call and the trace rows timed (its
            first step's first rows: a guided sampler batch of 8 is 16 rows).

    Example:
        >>> recipe = cq.cachequant(budget="3x")                       # = Recipe(cacher=BudgetCache(speedup=3), ...)
        >>> trace = cq.trace(unet, steps=50, num_samples=32, points=recipe.points(unet))   # every candidate point
        >>> model = recipe.fit(unet, trace)                           # model.recipe.cacher: the DeepCache chosen
    """

    speedup: float
    measure: str = "macs"
    candidates: tuple[str, ...] = ()
    trajectories: int = 4
    repeats: int = 5
    timing_rows: int = 16

    def __post_init__(self) -> None:
        speedup, measure = parse_budget_spec(self.speedup) if isinstance(self.speedup, str) else (self.speedup, None)
        object.__setattr__(self, "speedup", _speedup(speedup, self.speedup))
        if measure is not None and measure != "macs" and self.measure == "macs":
            object.__setattr__(self, "measure", measure)
        if self.measure not in MEASURES:
            raise ConfigError(f"BudgetCache.measure must be one of {MEASURES}, got {self.measure!r}")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        for name in ("trajectories", "repeats", "timing_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"BudgetCache.{name} must be an int >= 1, got {value!r}")

    def points(self, unet: nn.Module) -> tuple[str, ...]:
        known = tuple(check_cacheable(unet, "BudgetCache").cache_points())
        unknown = [p for p in self.candidates if p not in known]
        if unknown:
            raise ConfigError(f"BudgetCache.candidates: unknown cache points {unknown}; this UNet exposes {known}")
        return self.candidates or known

    @property
    def needs_rollout(self) -> bool:
        return True

    def costs(self, unet: nn.Module, trace: Trace) -> dict[str, float]:
        """``{"full": F, point: S_point}``: MACs per call (batch 1), or measured seconds on the trace's first-step
        inputs (``timing_rows`` of them)."""
        points = self.points(unet)
        if self.measure == "macs":
            from ..metrics.macs import unet_macs

            cond = trace.cond[0, :1] if trace.cond is not None else None
            return {k: float(v) for k, v in unet_macs(unet, cond=cond, points=points).items()}
        from ..metrics.call_time import call_seconds

        device = next(unet.parameters()).device
        rows = slice(0, min(trace.x.shape[1], self.timing_rows))
        x = trace.x[0, rows].float().to(device)
        t = trace.timesteps[0].expand(x.shape[0]).to(device)
        cond = trace.cond[0, rows].to(device) if trace.cond is not None else None
        return call_seconds(unet, x, t, cond, points=points, repeats=self.repeats)

    def refreshes(self, unet: nn.Module, trace: Trace, costs: dict[str, float] | None = None) -> dict[str, int]:
        """``{point: K}``: the most full calls meeting the budget at each point where one does (`feasible_refreshes`
        on ``costs``, default `costs`); `BudgetError` when none does."""
        costs = self.costs(unet, trace) if costs is None else costs
        return feasible_refreshes(costs, self.points(unet), trace.steps, self.speedup, self.measure)

    @staticmethod
    def candidate(point: str, refreshes: int) -> DeepCache:
        """The cacher rolled out at ``point`` (unfitted): ``refreshes`` full calls placed by DPS."""
        return DeepCache(schedule=DPS(refreshes=refreshes), point=point)

    def fit(
        self, unet: nn.Module, trace: Trace | None, *, rollout: Callable[[Cacher, int], Tensor] | None = None
    ) -> DeepCache:
        if trace is None or rollout is None:
            raise ScheduleInvalidError(
                "BudgetCache chooses the point and schedule on the compressed model's end-to-end error: fit it "
                "through Recipe.fit(unet, trace) on a trace recorded with points=recipe.points(unet)"
            )
        missing = [p for p in self.points(unet) if p not in trace.features]
        if missing:
            raise ConfigError(f"BudgetCache needs trace features at {missing}; record with points=recipe.points(unet)")
        trajectories = min(self.trajectories, trace.x0.shape[0])
        chosen, lowest = None, math.inf
        for point, k in self.refreshes(unet, trace).items():
            # DeepCache.fit plans DPS on the point's features (and a PLMS trace's sampler steps)
            candidate = self.candidate(point, k).fit(unet, trace)
            error = float(rollout(candidate, trajectories).mean())
            if error < lowest:
                chosen, lowest = candidate, error
        return chosen

    def build(self, unet: nn.Module, num_steps: int) -> FeatureCache:
        raise ConfigError(
            "a BudgetCache picks its point and schedule when fitted (Recipe.fit); the fitted recipe holds the "
            "DeepCache it chose"
        )

    def label(self) -> str:
        return f"BudgetCache({self.speedup:g}x {self.measure})"
