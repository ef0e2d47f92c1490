"""`cq.choose_point`: the chosen point meets the MAC budget and has the lowest calibration error among
those that do; candidates measured before are reused; bad inputs are refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cq
from cq.correct import CacheErrorLowRank
from cq.errors import BudgetError, ConfigError


STEPS = 6


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(unet, steps=STEPS, num_samples=3, points=unet.cache_points(), spacing="linspace", progress=False)


def deepcache_at(point):
    return cq.deepcache(3, point=point)


@pytest.fixture(scope="module")
def measured(unet, trace):
    found = {}
    cq.choose_point(unet, trace, deepcache_at, min_speedup=1.0, samples=2, measured=found, progress=False)
    return found


def test_candidates_are_measured_on_calibration_trajectories(unet, measured):
    assert list(measured) == list(unet.cache_points())
    fractions = [c.shallow_fraction for c in measured.values()]
    assert all(0 < f < 1 for f in fractions) and fractions == sorted(fractions, reverse=True)  # deepest first
    assert all(c.min_db <= c.mean_db for c in measured.values())


@given(budget=st.floats(1.0, 2.2))
def test_chosen_point_obeys_the_budget_with_the_least_error(unet, trace, measured, budget):
    fastest = max(c.speedup for c in measured.values())
    if budget > fastest:
        with pytest.raises(BudgetError, match="fastest"):
            cq.choose_point(
                unet, trace, deepcache_at, min_speedup=budget, samples=2, measured=dict(measured), progress=False
            )
        return
    choice = cq.choose_point(
        unet, trace, deepcache_at, min_speedup=budget, samples=2, measured=dict(measured), progress=False
    )
    chosen = next(c for c in choice.candidates if c.point == choice.point)
    assert chosen.speedup >= budget
    assert all(c.mean_db <= chosen.mean_db for c in choice.candidates if c.speedup >= budget)
    assert choice.point in choice.table()


def test_budget_beyond_every_point_is_refused(unet, trace, measured):
    with pytest.raises(BudgetError, match="lower min_speedup"):
        cq.choose_point(
            unet, trace, deepcache_at, min_speedup=100.0, samples=2, measured=dict(measured), progress=False
        )


def test_bad_inputs_are_refused(unet, trace):
    with pytest.raises(ConfigError, match="min_speedup"):
        cq.choose_point(unet, trace, deepcache_at, min_speedup=0.5)
    with pytest.raises(ConfigError, match="unknown cache points"):
        cq.choose_point(unet, trace, deepcache_at, min_speedup=1.5, points=["nowhere"])
    with pytest.raises(ConfigError, match="samples"):
        cq.choose_point(unet, trace, deepcache_at, min_speedup=1.5, samples=99)
    point = unet.cache_points()[0]
    with pytest.raises(ConfigError, match="caching at"):
        cq.choose_point(unet, trace, lambda p: cq.deepcache(3), min_speedup=1.5, points=[point], progress=False)
    narrow = cq.trace(unet, steps=STEPS, num_samples=2, points=[point], spacing="linspace", progress=False)
    with pytest.raises(ConfigError, match="lacks features"):
        cq.choose_point(unet, narrow, deepcache_at, min_speedup=1.5)


def test_the_cache_correction_is_counted_in_the_shallow_call(unet, trace, measured):
    point = unet.cache_points()[-1]

    def corrected(p):
        return cq.Recipe(cacher=cq.deepcache(3, point=p).cacher, correctors=(CacheErrorLowRank(rank=2),))

    choice = cq.choose_point(unet, trace, corrected, min_speedup=1.0, points=[point], samples=1, progress=False)
    channels, pixels = unet.cache_channels(point), trace.features[point][0, 0, 0].numel()
    (candidate,) = choice.candidates
    assert candidate.correction_macs == (channels + 2 * 2 * channels) * pixels
    assert candidate.shallow_fraction > measured[point].shallow_fraction and measured[point].correction_macs == 0


def test_the_chosen_model_is_returned_when_fitted_here(unet, trace):
    points = list(unet.cache_points()[-2:])
    choice = cq.choose_point(unet, trace, deepcache_at, min_speedup=1.0, points=points, samples=1, progress=False)
    assert choice.model is not None and choice.model.cache.point == choice.point
    reused = cq.choose_point(
        unet, trace, deepcache_at, min_speedup=1.0, points=points, measured={c.point: c for c in choice.candidates}
    )
    assert reused.model is None and reused.point == choice.point
