"""`fit_to_budget`: compress to a MAC budget with the least measured error -- ``cq.cachequant(budget=)``'s
`BudgetCache`, fitted through `Recipe.fit`, with the table of the cache points it measured.

A budget ``B`` (a predicted MAC speedup, ``"5x"``) fixes, for each cache point, the most full calls K a
schedule may make: ``T F / (K F + (T - K) S_p) >= B`` with F the MACs of a full call and ``S_p`` those of a
shallow call at point p (`cq.metrics.macs.unet_macs`). More refreshes never hurt, so each point gets its largest
K, and DPS places the K refreshes (``DPS(refreshes=K)``). `BudgetCache` then rolls every feasible point out end to
end on a few calibration trajectories (`Recipe.rollout`: the recipe's body, quantized once, with its cache
correction) and keeps the point of least mean x0 MSE; `Recipe.fit` fits the rest of the recipe there. The same
inputs give the same model as ``recipe.fit`` of the recipe with ``cacher=BudgetCache(speedup=B)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import Tensor, nn

from ..cache.cacher import Cacher
from ..calib.trace import Trace
from ..compressed import CompressedUNet
from ..errors import ConfigError
from ..metrics.error import mse_psnr
from .budget_cache import BudgetCache, parse_budget, refreshes_for
from .choose_point import PointCandidate, PointChoice, point_candidate
from .recipe import Recipe, cachequant
from .rollout import CalibrationRollout


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
        trace: a calibration trace recording every candidate point (``points=unet.cache_points()``).
        budget: the MAC speedup, ``"5x"`` or a number >= 1 (`parse_budget`).
        recipe_for: ``(point, refreshes) -> Recipe``; default ``cq.cachequant(point=p, refreshes=k)`` (W8A8). It
            must cache with ``DeepCache(schedule=DPS(refreshes=k), point=p)`` (what `BudgetCache` rolls out) and
            give the same quantizer, correctors and backend at every point: those are the recipe fitted.
        points: candidate points (default: all of ``unet.cache_points()``).
        samples: calibration trajectories each candidate is rolled out on (default: 4, or all kept if fewer).

    Returns the model fitted at the chosen point and the `PointChoice`: every feasible point's rollout, its
    ``mean_db`` the PSNR of the mean x0 MSE (what the choice minimises), ``min_db`` the worst trajectory's, and
    its speedup counting the cache correction's MACs too (the budget is met on the UNet's MACs, as `cq.report`
    counts them). Raises `BudgetError` when no point can meet the budget. Cost: the rollouts' quantizer calibration
    (once), one rollout per feasible point, then the final fit.
    """
    min_speedup = parse_budget(budget)
    recipe_for = recipe_for or (lambda p, k: cachequant(point=p, refreshes=k))
    candidates = tuple(unet.cache_points()) if points is None else tuple(points)
    unknown = [p for p in candidates if p not in unet.cache_points()]
    if unknown or not candidates:
        raise ConfigError(f"fit_to_budget: unknown cache points {unknown}; this UNet exposes {unet.cache_points()}")
    missing = [p for p in candidates if p not in trace.features]
    if missing:
        raise ConfigError(
            f"fit_to_budget: the trace lacks features at {missing}; record it with points=unet.cache_points()"
        )
    kept = trace.x0.shape[0]
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= kept):
        raise ConfigError(f"fit_to_budget: samples must be in [1, {kept}] (kept trajectories), got {samples!r}")
    cacher = BudgetCache(speedup=min_speedup, candidates=candidates, trajectories=samples or 4)
    costs = cacher.costs(unet, trace)
    refreshes = cacher.refreshes(unet, trace, costs)
    recipe = replace(_recipe_of(recipe_for, refreshes), cacher=cacher)

    found: dict[str, PointCandidate] = {}

    def recording(shared: CalibrationRollout) -> Callable[[Cacher, int | None], Tensor]:
        def rollout(candidate: Cacher, trajectories: int | None) -> Tensor:  # BudgetCache's, recording its table
            start = time.perf_counter()
            model, mse = shared.measure(candidate, trajectories)
            mean_db, min_db = float(mse_psnr(mse.mean())), float(mse_psnr(mse).min())
            seconds = time.perf_counter() - start
            found[model.cache.point] = point_candidate(model, mean_db, min_db, costs, trace, seconds)
            return mse

        return rollout

    model = recipe.fit(unet, trace, progress=progress, wrap_rollout=recording)
    choice = PointChoice(
        point=model.cache.point,
        min_speedup=min_speedup,
        candidates=tuple(found[p] for p in refreshes),
        model=model,
    )
    return model, choice


def _recipe_of(recipe_for: Callable[[str, int], Recipe], refreshes: dict[str, int]) -> Recipe:
    """The recipe ``recipe_for`` gives at every feasible point, checked to be one recipe but for the cacher
    `BudgetCache` chooses."""
    recipes = {p: recipe_for(p, k) for p, k in refreshes.items()}
    first = next(iter(recipes.values()))
    for point, recipe in recipes.items():
        expected = BudgetCache.candidate(point, refreshes[point])
        if not isinstance(recipe, Recipe) or recipe.cacher != expected:
            raise ConfigError(
                f"fit_to_budget: recipe_for({point!r}, {refreshes[point]}) must return a Recipe caching with "
                f"{expected!r} (the budget places K refreshes with DPS: cq.fit.BudgetCache), got "
                f"{recipe.cacher if isinstance(recipe, Recipe) else type(recipe).__name__!r}"
            )
        if (recipe.quantizer, recipe.correctors, recipe.backend) != (first.quantizer, first.correctors, first.backend):
            raise ConfigError(
                "fit_to_budget: recipe_for must give the same quantizer, correctors and backend at every point "
                f"(they are fitted once, at the point chosen); {point!r} differs"
            )
    return first
