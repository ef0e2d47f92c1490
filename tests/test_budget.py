"""Compute budgets (issue M 2): the refreshes a MAC budget allows are the most that meet it; `fit_to_budget`
returns a model meeting the budget with the least calibration error among the points; `cq fit --budget`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cq
from cq.budget import parse_budget, refreshes_for
from cq.cache import DPS
from cq.cache.deepcache import DeepCache
from cq.cli import main
from cq.errors import BudgetError, ConfigError
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


@pytest.mark.parametrize("text", ["fast", "0.5x", "-2", "x5", True])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ConfigError, match="budget"):
        parse_budget(text)


def test_cachequant_takes_interval_or_refreshes():
    assert cq.cachequant(refreshes=3).cacher.schedule == DPS(refreshes=3)
    assert cq.cachequant().cacher.schedule == DPS(interval=5)
    with pytest.raises(ConfigError, match="not both"):
        cq.cachequant(interval=5, refreshes=3)


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


def test_cli_fit_with_a_budget(tmp_path, capsys):
    out = tmp_path / "budget.cq"
    argv = ["fit", "--model", "demo", "--steps", "4", "--samples", "2", "--budget", "3x", "-o", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "MAC budget 3x" in text and "* |" in text and out.exists()
    loaded = cq.load(out)
    assert cq.report(loaded).mac_speedup >= 3
    assert main([*argv[:-2], "--recipe", "deepcache", "-o", str(out)]) == 2
    assert main([*argv[:-4], "--budget", "fast", "-o", str(out)]) == 2
