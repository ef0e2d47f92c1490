"""`TrajectorySearch`: the refresh steps that minimise the compressed model's own end-to-end error.

DPS (CacheQuant) minimises the distance of each cached feature to its group's first feature; what a user sees is
the error of the final sample of the *cached, quantized, corrected* model, which that distance predicts only
loosely (on the demo model DPS loses to the uniform schedule by the 5th percentile at N=5 and N=10). This schedule
searches on that error itself:

1. start from the better of the uniform schedule and DPS with the same number of refreshes K, judged by the
   objective below on a few calibration trajectories;
2. coordinate descent: move one refresh step at a time by up to ``max_shift`` steps (K stays fixed, step 0 always
   refreshes), keep a move only if it lowers the objective, until a whole sweep finds nothing or ``budget``
   rollouts are spent.

The objective is in dB of x0 PSNR against full precision over the rolled-out trajectories: the mean plus
``tail`` times the mean of the worst quartile, divided by ``1 + tail`` (higher is better), so a schedule that
wrecks a few samples to please the rest is not preferred. Each rollout samples the compressed model end to end
(`ScheduleRollout`, provided by `Recipe.fit`): the recipe's body quantized once (tables shared by every
candidate) with its cache correction refitted per candidate, so the result can never be worse than its start on
this objective. None of the anchors (CacheQuant, DeepCache) choose the schedule on the compressed trajectory's
error.

How many trajectories it searches on decides whether the result transfers to held-out seeds: with 8 the descent
fitted calibration noise. With every trajectory of a 128-trajectory trace (the default rolls out all the trace
kept), on 1023 held-out seeds it beats uniform on the mean at every N, and DPS at N=10 on the mean, the 5th
percentile and the digits FID, decided; at N=2, 3 and 5 it moves a few of DPS's steps by one or two and those
moves do not transfer (+0.02 / -0.11 / +0.07 dB against DPS; README, "The search on 128 calibration
trajectories"): DPS's plan is nearly a local optimum of the mean there. Quantized rollouts matter at N=2, where the
quantization error depends on the schedule as much as the cache error does: unquantized, the search ranked uniform
above DPS there and lost to DPS by 0.6 dB held out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..registry import SCHEDULES
from .dps import DPS
from .schedule import RolloutSchedule, ScheduleRollout, check_budget_fields, fitted_mask, positive_int, refresh_steps
from .uniform import UniformSchedule


__all__ = ["TrajectorySearch", "end_to_end_db", "coordinate_descent", "even_steps", "baseline_steps"]


def end_to_end_db(mse: Tensor, tail: float) -> float:
    """``(mean + tail * worst-quartile mean) / (1 + tail)`` of the per-trajectory PSNR (dB, data range [-1, 1])."""
    psnr = 10 * torch.log10(4.0 / mse.double().clamp_min(1e-20))
    worst = psnr.sort().values[: max(1, math.ceil(psnr.numel() / 4))]
    return float((psnr.mean() + tail * worst.mean()) / (1 + tail))


def even_steps(num_steps: int, refreshes: int) -> tuple[int, ...]:
    """``refreshes`` refresh steps spread evenly over ``num_steps`` (``floor(i T / K)``), starting at 0."""
    return tuple(sorted({(i * num_steps) // refreshes for i in range(refreshes)}))


def coordinate_descent(
    score: Callable[[tuple[int, ...]], float],
    start: tuple[int, ...],
    num_steps: int,
    *,
    max_shift: int,
    budget: int,
    start_score: float | None = None,
    progress: bool = False,
) -> tuple[tuple[int, ...], float, int]:
    """Maximise ``score(steps)`` by moving one refresh step (never step 0) by ``+-1 .. +-max_shift`` at a time,
    keeping the count and the order; a move is kept only if it raises the score (first improvement), until a
    sweep over all steps and shifts improves nothing or ``budget`` scores were computed.

    Returns ``(steps, score, evaluations)``. Deterministic for a deterministic ``score``; never below the start."""
    best = tuple(start)
    best_score = score(best) if start_score is None else start_score
    seen = {best}
    used = 0 if start_score is not None else 1
    shifts = [d for k in range(1, max_shift + 1) for d in (k, -k)]
    bar = tqdm(total=budget, desc="schedule search", unit="rollout", disable=None if progress else True)
    improved = True
    while improved and used < budget:
        improved = False
        for j in range(1, len(best)):
            for d in shifts:
                lo = best[j - 1] + 1
                hi = best[j + 1] - 1 if j + 1 < len(best) else num_steps - 1
                moved = best[j] + d
                candidate = (*best[:j], moved, *best[j + 1 :])
                if not lo <= moved <= hi or candidate in seen:
                    continue
                if used >= budget:
                    break
                seen.add(candidate)
                value = score(candidate)
                used += 1
                bar.update(1)
                if value > best_score:
                    best, best_score, improved = candidate, value, True
                    bar.set_postfix(best_db=f"{best_score:.2f}")
                    break  # the neighbours of the moved step changed: go on from the new schedule
    bar.close()
    return best, best_score, used


def baseline_steps(
    features: Tensor,
    *,
    interval: int | None,
    refreshes: int | None,
    sampler_steps: int | None = None,
    min_len: int | None = None,
    max_len: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """``{"uniform": steps, "dps": steps}``: the refresh steps of the uniform schedule and of DPS with the same
    budget (K, and DPS's group-length bounds) over the T steps of ``features`` -- what `TrajectorySearch` starts
    from and `SensitivityDP` guards with. Uniform is ``UniformSchedule(interval)`` when the model calls are the
    sampler steps, else K steps spread evenly (`even_steps`)."""
    T = features.shape[0]
    dps = DPS(interval=interval, refreshes=refreshes, min_len=min_len, max_len=max_len)
    dps_steps = dps.fit(features, sampler_steps=sampler_steps).steps
    if interval is not None and sampler_steps is None:
        uniform = refresh_steps(UniformSchedule(interval=interval).refresh_mask(T))
    else:
        uniform = even_steps(T, len(dps_steps))
    return {"uniform": uniform, "dps": dps_steps}


@SCHEDULES.register("search")
@dataclass(frozen=True, kw_only=True)
class TrajectorySearch(RolloutSchedule):
    """Refresh steps searched on the end-to-end error of the compressed model (see the module docstring).

    Give either ``interval`` (N; K = ceil(T/N) refreshes, as the uniform schedule and DPS) or ``refreshes`` (K).

    Args:
        interval, refreshes: the compute budget.
        trajectories: calibration trajectories rolled out per candidate (the trace's first ones; batched); None:
            every one the trace kept (record 128 for the search to transfer: module docstring).
        budget: at most this many rollouts in the descent (the two starting candidates come on top).
        max_shift: a move shifts one refresh step by at most this many steps.
        tail: weight of the worst-quartile mean PSNR against the mean in the objective.
        steps: the fitted refresh steps (set by `fit`; empty before).
        num_steps: the step count the schedule was fitted for (0 before `fit`).
        start: which schedule the descent started from, ``"uniform"`` or ``"dps"`` (set by `fit`).
        start_db, fitted_db: the objective of the start and of the result on the calibration rollouts (dB).
    """

    interval: int | None = None
    refreshes: int | None = None
    trajectories: int | None = None
    budget: int = 60
    max_shift: int = 2
    tail: float = 1.0
    steps: tuple[int, ...] = ()
    num_steps: int = 0
    start: str = ""
    start_db: float | None = None
    fitted_db: float | None = None

    def __post_init__(self) -> None:
        check_budget_fields(self, "trajectories", "max_shift")
        positive_int("TrajectorySearch", "budget", self.budget, minimum=0)

    def fit(
        self, features: Tensor, *, rollout: ScheduleRollout | None = None, sampler_steps: int | None = None
    ) -> TrajectorySearch:
        """Search on ``rollout`` (from `Recipe.fit`); ``features`` ``[T, ...]`` at the cache point plan the DPS start.
        ``sampler_steps``: the sampler steps behind the T model calls when not T (PLMS), as for `DPS.fit`."""
        T, rollout = self.fit_inputs(features, rollout)

        def score(steps: tuple[int, ...]) -> float:
            return end_to_end_db(rollout(replace(self, steps=steps, num_steps=T), self.trajectories), self.tail)

        budget = dict(interval=self.interval, refreshes=self.refreshes)
        starts = baseline_steps(features, sampler_steps=sampler_steps, **budget)
        scores = {name: score(steps) for name, steps in starts.items()}
        first = max(scores, key=lambda name: (scores[name], name == "uniform"))  # ties: uniform
        steps, best, _ = coordinate_descent(
            score,
            starts[first],
            T,
            max_shift=self.max_shift,
            budget=self.budget,
            start_score=scores[first],
            progress=True,
        )
        return replace(self, steps=steps, num_steps=T, start=first, start_db=scores[first], fitted_db=best)

    def refresh_mask(self, num_steps: int) -> tuple[bool, ...]:
        unfitted = "Recipe.fit(unet, trace) searches it on the compressed model"
        return fitted_mask(self, self.steps, self.num_steps, num_steps, unfitted)
