"""Fitting a compressed model on a trace: `Recipe` (cacher + quantizer + correctors) and its presets, the
end-to-end `CalibrationRollout` schedules search on, and the choices made at fit time -- the cache point
(`cq.fit.choose_point`; the function is ``cq.choose_point``) and a MAC or wall-clock budget (`BudgetCache`;
`fit_to_budget` is it with its table). Every one of them fits through `Recipe.fit`."""

from .budget import fit_to_budget
from .budget_cache import MEASURES, BudgetCache, feasible_refreshes, parse_budget, parse_budget_spec, refreshes_for
from .choose_point import PointCandidate, PointChoice
from .recipe import PRESET_RECIPES, Recipe, cachequant, deepcache, naive, parse_bits, quant_only
from .rollout import CalibrationRollout


__all__ = [
    "Recipe",
    "cachequant",
    "deepcache",
    "quant_only",
    "naive",
    "parse_bits",
    "PRESET_RECIPES",
    "CalibrationRollout",
    "PointCandidate",
    "PointChoice",
    "fit_to_budget",
    "BudgetCache",
    "MEASURES",
    "feasible_refreshes",
    "parse_budget",
    "parse_budget_spec",
    "refreshes_for",
]
