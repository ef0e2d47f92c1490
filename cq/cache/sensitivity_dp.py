"""`SensitivityDP`: DPS's dynamic program on a cost that predicts the final error, not the feature distance (cq).

DPS (CacheQuant, Sec. 3.2) splits the T steps into K groups minimising ``sum_groups sum_{s in group}
||F_s - F_start||``: every step's feature distance counts the same. What a user sees is the error of the final
sample, and a cache error at step s reaches it through the rest of the trajectory, which damps or amplifies it
differently at each step (on the demo model the end-to-end error of caching one step varies 7x over the steps
per unit of feature distance). `SensitivityDP` measures that gain and plans on it:

1. **Sensitivity.** For each step s >= 1 it rolls out (`ScheduleRollout`, from `Recipe.fit`) the compressed model
   that refreshes every step but s -- the recipe's cache correction included, on the first ``trajectories``
   calibration trajectories (16; None: all), end to end -- and takes the RMS x0 error against full precision,
   ``e_s``. The gain of step s is ``g_s = e_s / ||F_s - F_{s-1}||`` (x0 error per unit of the cache-point
   feature distance, l2).
2. **Plan.** The cost of a group starting at a is ``sum_{s in group, s > a} g_s ||F_s - F_a||``: the predicted
   end-to-end RMS error of caching that group. Cache errors are correlated (within a group they come from one
   stale feature), so amplitudes, not squares, are added -- across groups too, which keeps the cost additive for
   the DP. DPS's exact DP (`dp_partition`, same K and group-length bounds) minimises it.
3. **Guard.** The plan, DPS and the uniform schedule with the same K are rolled out once more; the best by the
   same objective as `TrajectorySearch` (mean PSNR plus ``tail`` x the worst-quartile mean) is kept, so on its
   calibration trajectories it is never below uniform or DPS (``chosen`` records which).

Fitting cost: T - 1 + 3 rollouts of ``trajectories`` rows (demo model, T = 50, 16 rows: about 90 s on two CPU
cores; all 32: 130-145 s), independent of K. Its rollouts are in full precision (``quantized_rollout = False``):
a gain measures the error of caching one step, which the quantization error -- nearly the same whatever step is
cached -- would mask. Measured on held-out seeds in the README ("Schedules at equal refreshes").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ScheduleInvalidError
from ..registry import SCHEDULES
from .dps import distance_table, dp_partition, group_bounds
from .schedule import RolloutSchedule, ScheduleRollout, check_budget_fields, fitted_mask
from .search import baseline_steps, end_to_end_db


__all__ = ["SensitivityDP", "step_gains", "weighted_distances"]


def step_gains(single_step_rms: Tensor, dist: Tensor) -> Tensor:
    """``g_s = e_s / ||F_s - F_{s-1}||`` (``g_0 = 0``; 0 where the feature does not change): the end-to-end RMS
    error of caching step s alone per unit of its feature distance. ``single_step_rms``: ``[T]``, ``e_0`` unused;
    ``dist``: the l2 `distance_table` of the features, at least 2 columns."""
    T = dist.shape[0]
    gains = torch.zeros(T, dtype=torch.float64)
    if T > 1:
        moved = dist[: T - 1, 1]  # ||F_{s+1} - F_s|| at index s
        gains[1:] = torch.where(moved > 0, single_step_rms[1:].double() / moved.clamp_min(1e-300), 0.0)
    return gains


def weighted_distances(dist: Tensor, gains: Tensor) -> Tensor:
    """``cost[a, r] = g_{a+r} ||F_{a+r} - F_a||`` (``inf`` past the end) from the l2 `distance_table` ``dist``
    ``[T, max_len]``: the per-step cost `dp_partition` sums into group costs (its ``dist``)."""
    T, max_len = dist.shape
    index = (torch.arange(T)[:, None] + torch.arange(max_len)[None, :]).clamp(max=T - 1)
    return torch.where(torch.isfinite(dist), dist * gains.double()[index], dist)


@SCHEDULES.register("sensitivity-dp")
@dataclass(frozen=True, kw_only=True)
class SensitivityDP(RolloutSchedule):
    """DPS on feature distances weighted by each step's measured end-to-end gain (module docstring).

    Give either ``interval`` (N; K = ceil(T/N) refreshes, as DPS) or ``refreshes`` (K).

    Args:
        interval, refreshes: the compute budget.
        min_len, max_len: group-length bounds (default DPS's ``[ceil(N/2), 2N]``).
        trajectories: calibration trajectories per rollout (the trace's first ones; batched); None: all the trace
            kept (measured on the demo model with 32: no consistent held-out gain over 16, twice the fit time).
        tail: weight of the worst-quartile mean PSNR in the guard's objective (as `TrajectorySearch`).
        steps: the fitted refresh steps (set by `fit`; empty before).
        num_steps: the step count it was fitted for (0 before `fit`).
        gains: the fitted per-step gains ``g_s`` (set by `fit`).
        chosen: which candidate the guard kept, ``"sensitivity"``, ``"dps"`` or ``"uniform"`` (set by `fit`).
        fitted_db: the guard's objective of the kept schedule on the calibration rollouts (dB).
    """

    quantized_rollout: ClassVar[bool] = False  # the gains measure cache error alone (module docstring)
    interval: int | None = None
    refreshes: int | None = None
    min_len: int | None = None
    max_len: int | None = None
    trajectories: int | None = 16
    tail: float = 1.0
    steps: tuple[int, ...] = ()
    num_steps: int = 0
    gains: tuple[float, ...] = ()
    chosen: str = ""
    fitted_db: float | None = None

    def __post_init__(self) -> None:
        check_budget_fields(self, "min_len", "max_len", "trajectories")

    def fit(
        self, features: Tensor, *, rollout: ScheduleRollout | None = None, sampler_steps: int | None = None
    ) -> SensitivityDP:
        """Measure the gains with ``rollout`` (from `Recipe.fit`) and plan on ``features`` ``[T, ...]`` at the cache
        point. ``sampler_steps``: the sampler steps behind the T model calls when not T (PLMS), as for `DPS.fit`."""
        T, rollout = self.fit_inputs(features, rollout)
        K, lo, hi, last_lo = group_bounds(T, self.interval, self.refreshes, self.min_len, self.max_len, sampler_steps)

        def errors(steps: tuple[int, ...]) -> Tensor:
            return rollout(replace(self, steps=steps, num_steps=T), self.trajectories)

        rms = torch.zeros(T, dtype=torch.float64)
        for s in tqdm(range(1, T), desc="step sensitivity", unit="rollout", disable=None):
            rms[s] = errors(tuple(i for i in range(T) if i != s)).double().mean().sqrt()
        dist = distance_table(features, max(hi, 2), "l2")  # one pass over the features (a trace may be on disk)
        gains = step_gains(rms, dist)
        planned = dp_partition(weighted_distances(dist, gains), K, lo, hi, last_lo)

        baselines = baseline_steps(
            features,
            interval=self.interval,
            refreshes=self.refreshes,
            sampler_steps=sampler_steps,
            min_len=self.min_len,
            max_len=self.max_len,
        )
        candidates = {"sensitivity": planned, "dps": baselines["dps"], "uniform": baselines["uniform"]}
        scores = {name: (end_to_end_db(errors(steps), self.tail), steps) for name, steps in candidates.items()}
        chosen = max(scores, key=lambda name: scores[name][0])  # ties: the first (the plan)
        score, steps = scores[chosen]
        if not math.isfinite(score):
            raise ScheduleInvalidError(f"SensitivityDP: the rollouts of every candidate diverged ({scores})")
        return replace(
            self, steps=steps, num_steps=T, gains=tuple(gains.tolist()), chosen=chosen, fitted_db=float(score)
        )

    def refresh_mask(self, num_steps: int) -> tuple[bool, ...]:
        unfitted = "Recipe.fit(unet, trace) measures its step gains on the compressed model"
        return fitted_mask(self, self.steps, self.num_steps, num_steps, unfitted)
