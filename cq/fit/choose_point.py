"""`choose_point`: pick the cache point by measured end-to-end error and MACs saved.

The shallowest point saves the most MACs on a cached step (92% on the demo model) but leaves the most to the
correction; the deepest saves little. For each candidate point the recipe is fitted on the calibration trace,
the compressed model samples the first few *calibration* trajectories from their recorded initial noise, and
each x0 is compared with the trace's full-precision x0 (never held-out seeds: those are for stating quality).
The MAC speedup is predicted from the fitted schedule (`cq.metrics.macs.predicted_speedup`), a shallow call
costing its UNet MACs plus the cache correction's (`ChannelAffine`, `LowRankAffine`: ``macs_per_pixel``; another
correction module counts 0, shown in ``correction_macs``). The choice is the lowest-error point (highest mean x0
PSNR) whose speedup meets ``min_speedup``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.trace import Trace
from ..compressed import CompressedUNet
from ..core.unet import check_cacheable
from ..correct import ChannelAffine, LowRankAffine
from ..errors import BudgetError, ConfigError
from ..metrics.error import mse_psnr
from ..metrics.macs import predicted_speedup, unet_macs
from .recipe import Recipe
from .rollout import CalibrationRollout


__all__ = ["PointCandidate", "PointChoice", "choose_point"]


@dataclass(frozen=True)
class PointCandidate:
    """One cache point measured on calibration trajectories.

    Attributes:
        point: the cache point.
        mean_db, min_db: x0 PSNR vs the trace's full-precision x0 over the trajectories used (mean, worst); in
            `cq.fit_to_budget`'s table the mean is the PSNR of the mean x0 MSE, what its choice minimises.
        speedup: predicted MAC speedup of the fitted schedule at this point (full calls vs shallow calls).
        shallow_fraction: MACs of a shallow call at this point (correction included) / MACs of a full call.
        correction_macs: MACs of the cache correction per cached call (batch 1).
        seconds: fit + sampling time of this candidate (`cq.fit_to_budget`: its rollout's).
    """

    point: str
    mean_db: float
    min_db: float
    speedup: float
    shallow_fraction: float
    correction_macs: int
    seconds: float


@dataclass(frozen=True, eq=False)
class PointChoice:
    """The chosen point, every candidate measured (in the order asked for), and the model fitted at the chosen
    point by this call (None when its measurement came from ``measured``: fit ``recipe_for(point)`` then)."""

    point: str
    min_speedup: float
    candidates: tuple[PointCandidate, ...]
    model: CompressedUNet | None = None

    def table(self) -> str:
        lines = ["point | mean dB | worst dB | MAC speedup | shallow MACs | s"]
        for c in self.candidates:
            mark = " *" if c.point == self.point else ""
            lines.append(
                f"{c.point}{mark} | {c.mean_db:.2f} | {c.min_db:.2f} | {c.speedup:.2f}x | "
                f"{100 * c.shallow_fraction:.1f}% | {c.seconds:.0f}"
            )
        return "\n".join(lines)


@torch.no_grad()
def choose_point(
    unet: nn.Module,
    trace: Trace,
    recipe_for: Callable[[str], Recipe],
    *,
    min_speedup: float,
    points: Sequence[str] | None = None,
    samples: int | None = None,
    measured: dict[str, PointCandidate] | None = None,
    progress: bool = True,
) -> PointChoice:
    """Fit ``recipe_for(point)`` for each candidate point on ``trace`` and pick the lowest-error one whose
    predicted MAC speedup is at least ``min_speedup``.

    Args:
        unet: the full-precision UNet the trace was recorded from.
        trace: an unguided trace recording every candidate point (``cq.trace(..., points=unet.cache_points())``).
        recipe_for: point -> the recipe to fit there (e.g. ``lambda p: cq.cachequant(5, point=p)``).
        min_speedup: the compute budget: predicted MAC speedup over the full-precision, uncached model (>= 1).
        points: candidates (default: all of ``unet.cache_points()``).
        samples: calibration trajectories sampled end to end per candidate (the first ``samples`` kept ones;
            default: 4, or all kept trajectories if fewer).
        measured: candidates measured before (point -> `PointCandidate`): reused, and each new one is added as
            soon as it is measured, so an interrupted call keeps its finished work in the caller's dict.

    Raises `BudgetError` when no candidate meets the budget (naming the fastest), `ConfigError` for a trace
    without the points, a guided trace, or a recipe that caches elsewhere. Takes one fit plus ``samples``
    sampling runs per point (demo model, CacheQuant W8A8: about 25 s a point on one CPU thread).
    """
    check_cacheable(unet, "choose_point")
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)) or not min_speedup >= 1:
        raise ConfigError(f"choose_point: min_speedup must be a number >= 1, got {min_speedup!r}")
    candidates = tuple(unet.cache_points()) if points is None else tuple(points)
    unknown = [p for p in candidates if p not in unet.cache_points()]
    if unknown or not candidates:
        raise ConfigError(
            f"choose_point: unknown cache points {unknown}; this UNet exposes {list(unet.cache_points())}"
        )
    missing = [p for p in candidates if p not in trace.features]
    if missing:
        raise ConfigError(
            f"choose_point: the trace lacks features at {missing}; record it with points=unet.cache_points()"
        )
    if trace.guidance_scale != 1.0:
        raise ConfigError("choose_point measures unguided traces only; record the trace without guidance")
    if trace.settings is None:
        raise ConfigError("choose_point needs a trace recorded by a cq sampler (its settings say how to sample)")
    samples = min(4, trace.x.shape[1]) if samples is None else samples
    if not 1 <= samples <= trace.x.shape[1]:
        raise ConfigError(
            f"choose_point: samples must be in [1, {trace.x.shape[1]}] (kept trajectories), got {samples}"
        )
    rollout = CalibrationRollout((), unet, trace)  # samples each fitted model on the calibration trajectories
    macs = unet_macs(unet, points=candidates)
    measured = {} if measured is None else measured
    best_model: tuple[PointCandidate, CompressedUNet] | None = None  # the best feasible model fitted so far
    for point in tqdm(candidates, desc="cache points", disable=not progress):
        if point in measured:
            continue
        recipe = recipe_for(point)
        if not isinstance(recipe, Recipe) or recipe.points(unet) != (point,):
            raise ConfigError(
                f"choose_point: recipe_for({point!r}) must return a Recipe caching at {point!r}, got "
                f"{recipe.points(unet) if isinstance(recipe, Recipe) else type(recipe).__name__}"
            )
        start = time.perf_counter()
        model = recipe.fit(unet, trace, progress=False)
        psnr = mse_psnr(rollout.errors(model, samples))
        measured[point] = point_candidate(
            model, float(psnr.mean()), float(psnr.min()), macs, trace, time.perf_counter() - start
        )
        candidate = measured[point]
        if candidate.speedup >= min_speedup and (best_model is None or candidate.mean_db > best_model[0].mean_db):
            best_model = (candidate, model)
        del model
    found = tuple(measured[p] for p in candidates)
    feasible = [c for c in found if c.speedup >= min_speedup]
    if not feasible:
        fastest = max(found, key=lambda c: c.speedup)
        raise BudgetError(
            f"no cache point reaches a {min_speedup}x MAC speedup with this recipe; the fastest is "
            f"{fastest.point!r} at {fastest.speedup:.2f}x: lower min_speedup or raise the cache interval"
        )
    best = max(feasible, key=lambda c: (c.mean_db, c.speedup))
    model = best_model[1] if best_model is not None and best_model[0] is best else None
    return PointChoice(point=best.point, min_speedup=float(min_speedup), candidates=found, model=model)


def point_candidate(
    model: CompressedUNet, mean_db: float, min_db: float, macs: dict[str, float], trace: Trace, seconds: float
) -> PointCandidate:
    """The `PointCandidate` of ``model`` (fitted at its cache point), measured at ``mean_db`` / ``min_db``: its
    predicted MAC speedup from ``macs`` (`unet_macs`) and the cache correction's MACs on the trace's features."""
    point = model.cache.point
    correction = model.cache.correction
    pixels = math.prod(trace.features[point].shape[3:])
    extra = correction.macs_per_pixel * pixels if isinstance(correction, (ChannelAffine, LowRankAffine)) else 0
    shallow = macs[point] + extra
    return PointCandidate(
        point=point,
        mean_db=mean_db,
        min_db=min_db,
        speedup=predicted_speedup(macs["full"], shallow, model.refresh_mask()),
        shallow_fraction=shallow / macs["full"],
        correction_macs=extra,
        seconds=seconds,
    )
