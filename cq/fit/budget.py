"""`fit_to_budget`: compress to a MAC budget with the least measured error.

A budget ``B`` (a predicted MAC speedup, ``"5x"``) fixes, for each cache point, the most full calls K a
schedule may make: ``T F / (K F + (T - K) S_p) >= B`` with F the MACs of a full call and ``S_p`` those of a
shallow call at point p (`cq.metrics.macs.unet_macs`). More refreshes never hurt, so each point gets its largest
K, and DPS places the K refreshes (``DPS(refreshes=K)``). `cq.choose_point` then fits the recipe at every
feasible point on the calibration trace, measures its end-to-end error on a few calibration trajectories and
keeps the best point whose speedup -- the cache correction's MACs included -- meets the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..calib.trace import Trace
from ..compressed import CompressedUNet
from ..errors import ConfigError
from ..metrics.macs import unet_macs
from .budget_cache import feasible_refreshes, parse_budget, refreshes_for
from .choose_point import PointChoice, choose_point
from .recipe import Recipe, cachequant


__all__ = ["fit_to_budget", "parse_budget", "refreshes_for"]


def fit_to_budget(
    unet: nn.Module,
    trace: Trace,
    budget: str | float,
    *,
    recipe_for: Callable[[str, int], Recipe] | None = None,
    points: Sequence[str] | None = None,
    samples: int | None = None,
    progress: bool = True,
) -> tuple[CompressedUNet, PointChoice]:
    """Fit the least-error compression of ``unet`` whose predicted MAC speedup is at least ``budget``.

    Args:
        trace: an unguided calibration trace recording every candidate point (``points=unet.cache_points()``).
        budget: the MAC speedup, ``"5x"`` or a number >= 1 (`parse_budget`).
        recipe_for: ``(point, refreshes) -> Recipe``; default ``cq.cachequant(point=p, refreshes=k)`` (W8A8).
        points: candidate points (default: all of ``unet.cache_points()``).
        samples: calibration trajectories per candidate (`cq.choose_point`).

    Returns the model fitted at the chosen point and the `PointChoice` (every candidate's error and speedup).
    Raises `BudgetError` when no point can meet the budget. Cost: one fit and ``samples`` sampling runs per
    feasible point, then the final fit.
    """
    min_speedup = parse_budget(budget)
    recipe_for = recipe_for or (lambda p, k: cachequant(point=p, refreshes=k))
    candidates = tuple(unet.cache_points()) if points is None else tuple(points)
    unknown = [p for p in candidates if p not in unet.cache_points()]
    if unknown or not candidates:
        raise ConfigError(f"fit_to_budget: unknown cache points {unknown}; this UNet exposes {unet.cache_points()}")
    refreshes = feasible_refreshes(unet_macs(unet, points=candidates), candidates, trace.steps, min_speedup)
    choice = choose_point(
        unet,
        trace,
        lambda p: recipe_for(p, refreshes[p]),
        min_speedup=min_speedup,
        points=list(refreshes),
        samples=samples,
        progress=progress,
    )
    model = choice.model or recipe_for(choice.point, refreshes[choice.point]).fit(unet, trace, progress=progress)
    return model, choice
