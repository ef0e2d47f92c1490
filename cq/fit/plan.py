"""`fit_plan`: what ``cq fit`` fits, from its settings -- a preset recipe or a recipe JSON file, a registered
schedule swapped in, or a speedup budget -- as a `FitPlan` that names the cache points to trace and fits them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..calib.trace import Trace
from ..compressed import CompressedUNet
from ..errors import ConfigError
from .choose_point import PointChoice
from .recipe import PRESET_RECIPES, Recipe, cachequant


__all__ = ["FitPlan", "fit_plan"]


@dataclass(frozen=True)
class FitPlan:
    """A `Recipe` to fit, or, with a MAC ``budget``, the CacheQuant recipes (``bits``, ``backend``) `fit_to_budget`
    picks the cache point and refreshes of; ``described`` says which, for messages."""

    recipe: Recipe
    described: str
    budget: float | None = None
    bits: str = "w8a8"
    backend: str = "fake"

    def points(self, unet: nn.Module) -> list[str]:
        """The cache points the calibration trace records: every point under a MAC budget, else the recipe's."""
        return unet.cache_points() if self.budget is not None else self.recipe.points(unet)

    def fit(self, unet: nn.Module, trace: Trace) -> tuple[CompressedUNet, PointChoice | None]:
        """``(model, the cache points measured)``; the choice is None without a MAC budget."""
        if self.budget is None:
            return self.recipe.fit(unet, trace), None
        from .budget import fit_to_budget

        return fit_to_budget(
            unet,
            trace,
            self.budget,
            recipe_for=lambda p, k: cachequant(bits=self.bits, backend=self.backend, point=p, refreshes=k),
        )


def fit_plan(
    recipe: str = "cachequant",
    *,
    interval: int = 5,
    bits: str = "w8a8",
    backend: str = "fake",
    schedule: str | None = None,
    budget: str | None = None,
) -> FitPlan:
    """The `FitPlan` of ``cq fit``'s settings: ``recipe`` is a `PRESET_RECIPES` name (with ``interval`` / ``bits``
    / ``backend``) or a recipe JSON file (`cq.registry.to_dict` of a `Recipe`); ``schedule`` swaps the cacher's
    schedule for a registered one (plugins included); ``budget`` (``"5x"`` MACs, ``"2.5x wall"``) replaces the
    interval of ``cachequant``."""
    plan = _recipe_of(recipe, interval, bits, backend, schedule)
    if budget is None:
        return plan
    from .budget_cache import parse_budget_spec

    speedup, measure = parse_budget_spec(budget)
    if recipe != "cachequant" or schedule is not None:
        raise ConfigError("--budget picks the schedule and cache point of --recipe cachequant; drop --schedule")
    described = f"cachequant bits={bits} backend={backend}, {measure} budget {speedup:g}x"
    if measure == "wall":  # timed on this machine inside Recipe.fit (BudgetCache); MAC budgets: fit_to_budget
        return FitPlan(cachequant(bits=bits, backend=backend, budget=budget), described)
    return FitPlan(plan.recipe, described, speedup, bits, backend)


def _recipe_of(recipe: str, interval: int, bits: str, backend: str, schedule: str | None) -> FitPlan:
    from ..registry import SCHEDULES, from_dict

    if recipe in PRESET_RECIPES:
        kwargs = {}
        if recipe != "quant_only":
            kwargs["interval"] = interval
        if recipe != "deepcache":
            kwargs["bits"] = bits
            kwargs["backend"] = backend
        fitted, described = PRESET_RECIPES[recipe](**kwargs), f"{recipe} {kwargs}"
    else:
        try:
            data = json.loads(Path(recipe).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--recipe {recipe}: not a readable recipe JSON file ({e})") from None
        if not isinstance(data, dict) or data.get("kind") != "recipe":
            raise ConfigError(
                f"--recipe {recipe}: expected the JSON of a Recipe (cq.registry.to_dict(recipe), "
                '{"kind": "recipe", ...})'
            )
        fitted, described = from_dict(data), recipe
    if not isinstance(fitted, Recipe):
        raise ConfigError(f"--recipe {recipe} describes a {type(fitted).__name__}, not a Recipe")
    if schedule is not None:
        if fitted.cacher is None:
            raise ConfigError(f"--schedule needs a recipe that caches; {recipe} does not")
        cls = SCHEDULES.get(schedule)
        fields = {f.name for f in dataclasses.fields(cls)}
        swapped = cls(interval=interval) if "interval" in fields else cls()
        fitted = dataclasses.replace(fitted, cacher=dataclasses.replace(fitted.cacher, schedule=swapped))
        described += f" with schedule {swapped}"
    return FitPlan(fitted, described)
