"""Compute budgets: the refreshes a MAC budget allows are the most that meet it; `fit_to_budget`
returns a model meeting the budget with the least calibration error among the points; `cq fit --budget`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cq
from cq.cache import DPS, UniformSchedule
from cq.cache.deepcache import DeepCache
from cq.cli import main
from cq.errors import BudgetError, ConfigError
from cq.fit import BudgetCache
from cq.fit.budget import parse_budget, refreshes_for
from cq.metrics.macs import predicted_speedup


STEPS = 6


@given(
    full=st.integers(10, 10**9),
    share=st.floats(0.01, 0.99),
    steps=st.integers(1, 60),
    budget=st.floats(1.0, 20.0),
)
def test_refreshes_for_is_the_most_that_meet_the_budget(full, share, steps, budget):
    shallow = max(1, int(full * share))
    k = refreshes_for(full, shallow, steps, budget)
    assert 0 <= k <= steps

    def speedup(refreshes):
        return predicted_speedup(full, shallow, [True] * refreshes + [False] * (steps - refreshes))

    if k >= 1:
        assert speedup(k) >= budget * (1 - 1e-9)
    if k < steps:
        assert speedup(k + 1) < budget * (1 + 1e-9)


@pytest.mark.parametrize("text,value", [("5x", 5.0), ("2.5", 2.5), (3, 3.0), (" 1.5x ", 1.5)])
def test_parse_budget(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["fast", "0.5x", "-2", "x5", True, "3x wall"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ConfigError, match="budget"):
        parse_budget(text)


def test_cachequant_takes_interval_or_refreshes():
    assert cq.cachequant(refreshes=3).cacher.schedule == DPS(refreshes=3)
    assert cq.cachequant().cacher.schedule == DPS(interval=5)
    with pytest.raises(ConfigError, match="one of interval, refreshes or budget"):
        cq.cachequant(interval=5, refreshes=3)
    with pytest.raises(ConfigError, match="one of interval, refreshes or budget"):
        cq.cachequant(interval=5, budget="3x")
    with pytest.raises(ConfigError, match="chooses the cache point"):
        cq.cachequant(budget="3x", point="up.0.block.2")
    with pytest.raises(ConfigError, match="budget"):
        cq.cachequant(budget="fast")
    assert cq.cachequant(budget="2.5x wall").cacher == BudgetCache(speedup=2.5, measure="wall")


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(unet, steps=STEPS, num_samples=2, points=unet.cache_points(), spacing="linspace", progress=False)


def full_precision(point, refreshes):
    return cq.Recipe(cacher=DeepCache(schedule=DPS(refreshes=refreshes), point=point))


def test_fit_to_budget_meets_the_budget_with_the_least_error(unet, trace):
    model, choice = cq.fit_to_budget(unet, trace, "1.5x", recipe_for=full_precision, progress=False)
    report = cq.report(model)
    assert model.cache.point == choice.point and report.mac_speedup >= 1.5 * (1 - 1e-9)
    chosen = next(c for c in choice.candidates if c.point == choice.point)
    assert all(c.mean_db <= chosen.mean_db for c in choice.candidates if c.speedup >= 1.5)
    with pytest.raises(BudgetError, match="no cache point reaches"):
        cq.fit_to_budget(unet, trace, 50, recipe_for=full_precision, progress=False)


def test_fit_to_budget_and_cachequant_budget_choose_the_same_schedule(unet, trace):
    """The two spellings of a MAC budget are one implementation (`BudgetCache` fitted through `Recipe.fit`):
    the same inputs choose the same point and schedule and fit the same model; `fit_to_budget` adds the table."""

    def corrected(point, refreshes):
        return _rollout_recipe(DeepCache(schedule=DPS(refreshes=refreshes), point=point))

    for recipe_for, samples, recipe in (
        (corrected, 1, _rollout_recipe(BudgetCache(speedup=1.5, trajectories=1))),
        (None, None, cq.cachequant(budget="1.5x")),  # quantized: the rollout's body and the final calibration
    ):
        direct = recipe.fit(unet, trace, progress=False)
        model, choice = cq.fit_to_budget(unet, trace, "1.5x", recipe_for=recipe_for, samples=samples, progress=False)
        assert model.recipe == direct.recipe and isinstance(model.recipe.cacher, DeepCache)
        assert model.refresh_mask() == direct.refresh_mask() and choice.point == direct.cache.point
        expected, got = direct.state_dict(), model.state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
        chosen = next(c for c in choice.candidates if c.point == choice.point)
        assert all(c.mean_db <= chosen.mean_db for c in choice.candidates)  # the least mean MSE
    with pytest.raises(ConfigError, match="must return a Recipe caching with"):
        cq.fit_to_budget(unet, trace, "1.5x", recipe_for=lambda p, k: cq.cachequant(point=p), progress=False)


def test_cli_fit_with_a_budget(tmp_path, capsys):
    out = tmp_path / "budget.cq"
    argv = ["fit", "--model", "demo", "--steps", "4", "--samples", "2", "--budget", "3x", "-o", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "macs budget 3x" in text and "* |" in text and out.exists()
    loaded = cq.load(out)
    assert cq.report(loaded).mac_speedup >= 3
    assert main([*argv[:-2], "--recipe", "deepcache", "-o", str(out)]) == 2
    assert main([*argv[:-4], "--budget", "fast", "-o", str(out)]) == 2
    wall = tmp_path / "wall.cq"
    assert main([*argv[:-4], "--budget", "1.2x wall", "-o", str(wall)]) == 0
    assert "wall budget 1.2x" in capsys.readouterr().out
    assert isinstance(cq.load(wall).recipe.cacher, DeepCache)


# ----------------------------------------------------------------------------------------------------------------
# cq.cachequant(budget=): BudgetCache chooses point and refreshes when the recipe is fitted


def _rollout_recipe(cacher):
    return cq.Recipe(cacher=cacher, correctors=(cq.correct.CacheErrorCorrector(),))


def test_budget_cache_keeps_the_least_error_point_that_meets_the_budget(unet, trace):
    budget = BudgetCache(speedup=1.5, trajectories=2)
    model = _rollout_recipe(budget).fit(unet, trace, progress=False)
    chosen = model.recipe.cacher
    assert isinstance(chosen, DeepCache) and model.cache.point == chosen.point  # what is saved is the choice
    macs = cq.metrics.unet_macs(unet, points=unet.cache_points())
    assert predicted_speedup(macs["full"], macs[chosen.point], model.cache.mask) >= 1.5 * (1 - 1e-9)
    assert sum(model.cache.mask) == refreshes_for(macs["full"], macs[chosen.point], STEPS, 1.5)
    rollout = cq.fit.rollout.CalibrationRollout((cq.correct.CacheErrorCorrector(),), unet, trace)
    errors = {}
    for point in unet.cache_points():
        k = refreshes_for(macs["full"], macs[point], STEPS, 1.5)
        if k >= 1:
            errors[point] = float(
                rollout(DeepCache(schedule=DPS(refreshes=k), point=point).fit(unet, trace), 2).mean()
            )
    assert chosen.point in errors and errors[chosen.point] == min(errors.values())
    with pytest.raises(BudgetError, match="no cache point reaches 50x"):
        _rollout_recipe(BudgetCache(speedup=50)).fit(unet, trace, progress=False)


def test_a_wall_clock_budget_plans_on_measured_seconds(unet, trace, monkeypatch):
    import cq.metrics.call_time as call_time

    points = unet.cache_points()
    fast = points[-1]
    measured = call_time.call_seconds(unet, trace.x[0], trace.timesteps[0].expand(2), points=points, repeats=1)
    assert set(measured) == {"full", *points} and all(v > 0 for v in measured.values())
    fake = {"full": 1.0, **{p: (0.1 if p == fast else 0.9) for p in points}}
    monkeypatch.setattr(call_time, "call_seconds", lambda *a, **k: fake)
    model = _rollout_recipe(BudgetCache(speedup="2x wall", trajectories=1)).fit(unet, trace, progress=False)
    assert model.cache.point == fast and sum(model.cache.mask) == refreshes_for(1.0, 0.1, STEPS, 2.0)


def test_budget_cache_misuse_is_named(unet, trace, tmp_path):
    with pytest.raises(ConfigError, match="measure must be one of"):
        BudgetCache(speedup=2, measure="flops")
    with pytest.raises(ConfigError, match="trajectories must be an int"):
        BudgetCache(speedup=2, trajectories=0)
    with pytest.raises(ConfigError, match="unknown cache points"):
        BudgetCache(speedup=2, candidates=("nowhere",)).points(unet)
    with pytest.raises(cq.errors.ScheduleInvalidError, match="through Recipe.fit"):
        BudgetCache(speedup=2).fit(unet, trace)
    with pytest.raises(ConfigError, match="picks its point and schedule when fitted"):
        BudgetCache(speedup=2).build(unet, STEPS)
    model = _rollout_recipe(BudgetCache(speedup=1.2, trajectories=1)).fit(unet, trace, progress=False)
    cq.save(model, tmp_path / "budget.cq")
    assert cq.load(tmp_path / "budget.cq", unet=unet).recipe.cacher == model.recipe.cacher


def test_guided_rollouts_sample_the_conditional_rows_with_guidance():
    """A rollout of a guided trace reproduces the trace's own x0 when nothing is cached (so rows and guidance
    are the trace's), and differs when features are reused."""
    from cq.models import LatentDiffusion

    pipe = LatentDiffusion.build("tiny-ldm-cin", seed=0)
    labels = torch.tensor([3, 7, 1])
    trace = cq.trace(
        pipe.unet,
        steps=5,
        num_samples=3,
        cond=pipe.condition(labels),
        guidance_scale=3.0,
        uncond=pipe.unconditional(1),
        spacing="ldm",
        points=pipe.unet.cache_points()[-1:],
        progress=False,
    )
    rollout = cq.fit.rollout.CalibrationRollout((), pipe.unet, trace)
    point = pipe.unet.cache_points()[-1]
    exact = rollout(DeepCache(schedule=UniformSchedule(interval=1), point=point), 3)
    cached = rollout(DeepCache(schedule=UniformSchedule(interval=3), point=point), 3)
    assert exact.shape == (3,) and float(exact.max()) <= 1e-10 and float(cached.min()) > 1e-8
