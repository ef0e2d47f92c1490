"""Refresh schedules: the mask contract, DPS optimality (brute force), DPS <= uniform, round trips, validation."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cq.cache import DPS, Power, UniformSchedule
from cq.cache.dps import distance_table, dp_partition, partition_cost
from cq.errors import ConfigError, ScheduleInvalidError, StepCountMismatchError
from cq.registry import SCHEDULES, from_dict, to_dict


def brute_force(dist: torch.Tensor, groups: int, lo: int, hi: int, last_lo: int) -> float:
    """Minimum cost over every split of T steps into `groups` contiguous groups within the bounds."""
    T = dist.shape[0]
    best = math.inf
    for cuts in itertools.combinations(range(1, T), groups - 1):
        starts = (0, *cuts)
        lengths = [b - a for a, b in zip(starts, (*cuts, T), strict=True)]
        if all(lo <= n <= hi for n in lengths[:-1]) and last_lo <= lengths[-1] <= hi:
            best = min(best, partition_cost(dist, starts))
    return best


def random_features(seed: int, steps: int, dim: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, dim, generator=g).cumsum(0)  # a random walk: neighbouring steps are similar


# ---------------------------------------------------------------------------------------------------------------
# Mask contract


@given(T=st.integers(1, 300), N=st.integers(1, 40))
def test_uniform_mask_contract(T, N):
    mask = UniformSchedule(interval=N).refresh_mask(T)
    assert len(mask) == T and mask[0]
    assert sum(mask) == math.ceil(T / N)
    assert [i for i, m in enumerate(mask) if m] == list(range(0, T, N))


@given(T=st.integers(1, 300), N=st.integers(1, 40), p=st.floats(1.0, 3.0), center=st.none() | st.integers(0, 300))
def test_power_mask_contract(T, N, p, center):
    mask = Power(interval=N, power=p, center=center).refresh_mask(T)
    assert len(mask) == T and mask[0]
    assert 1 <= sum(mask) <= math.ceil(T / N)


@given(T=st.integers(1, 60), N=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_dps_mask_contract_and_refresh_count(T, N, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # relaxed bounds for tiny T warn by design
        fitted = DPS(interval=N).fit(random_features(seed, T))
    mask = fitted.refresh_mask(T)
    assert len(mask) == T and mask[0]
    assert sum(mask) == min(math.ceil(T / N), T)


def test_power_reproduces_deepcache_ldm_schedules():
    # Outputs of DeepCache's LDM `sample_from_quad` listed in the reference notes (algorithms.md §1.2).
    expected = {
        (100, 10): [0, 3, 8, 16, 25, 35, 46, 58, 71, 85],
        (250, 20): [0, 5, 15, 27, 42, 59, 78, 98, 120, 144, 168, 194, 221],
    }
    for (T, N), steps in expected.items():
        mask = Power(interval=N, power=1.5).refresh_mask(T)
        assert [i for i, m in enumerate(mask) if m] == steps


def test_power_centered_is_dense_around_center():
    mask = Power(interval=5, power=1.4, center=15).refresh_mask(50)
    steps = [i for i, m in enumerate(mask) if m]
    gaps = np.diff(steps)
    near = [g for s, g in zip(steps, gaps, strict=False) if abs(s - 15) <= 5]
    far = [g for s, g in zip(steps, gaps, strict=False) if s >= 30]
    assert max(near) < min(far)  # refreshes are closer together around the centre than at the end
    assert len(steps) == 10


# ---------------------------------------------------------------------------------------------------------------
# DPS optimality


@given(T=st.integers(1, 12), N=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_dps_equals_brute_force(T, N, seed):
    features = random_features(seed, T)
    schedule = DPS(interval=N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K, lo, hi, last_lo = schedule.plan(T)
        fitted = schedule.fit(features)
    dist = distance_table(features, hi)
    assert partition_cost(dist, fitted.steps) == pytest.approx(brute_force(dist, K, lo, hi, last_lo), rel=1e-12)


@given(
    T=st.integers(2, 120),
    N=st.integers(1, 15),
    seed=st.integers(0, 10**6),
    distance=st.sampled_from(["l1", "l2", "mse"]),
)
def test_dps_never_costs_more_than_uniform(T, N, seed, distance):
    features = random_features(seed, T, dim=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schedule = DPS(interval=N, distance=distance)
        _, _, hi, _ = schedule.plan(T)
        fitted = schedule.fit(features)
    dist = distance_table(features, max(hi, N), distance)
    uniform = tuple(range(0, T, N))
    assert len(fitted.steps) == len(uniform)
    assert partition_cost(dist, fitted.steps) <= partition_cost(dist, uniform) * (1 + 1e-12)


def test_dps_finds_the_obvious_split():
    # Features constant within three plateaus: refreshing at each plateau start costs exactly 0.
    features = torch.cat([torch.full((4, 3), 0.0), torch.full((5, 3), 7.0), torch.full((3, 3), -2.0)])
    fitted = DPS(refreshes=3, min_len=2, max_len=6).fit(features)
    assert fitted.steps == (0, 4, 9)
    assert partition_cost(distance_table(features, 6), fitted.steps) == 0.0


def test_dps_budget_mode_gives_k_refreshes():
    fitted = DPS(refreshes=7).fit(random_features(1, 50))
    assert len(fitted.steps) == 7 and fitted.num_steps == 50


def test_dps_plans_every_step_count_without_crashing():
    for T in range(1, 40):
        for N in (1, 2, 5, 10, 25, 50):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fitted = DPS(interval=N).fit(random_features(T * 100 + N, T))
            assert fitted.steps[0] == 0 and len(fitted.steps) == min(math.ceil(T / N), T)


def test_dps_warns_when_it_relaxes_bounds():
    with pytest.warns(UserWarning, match="relaxed"):
        DPS(refreshes=3, min_len=5).fit(random_features(0, 10))


def test_dp_partition_raises_when_infeasible():
    dist = distance_table(random_features(0, 10), 3)
    with pytest.raises(ScheduleInvalidError, match="no split"):
        dp_partition(dist, 2, 1, 3)  # two groups of at most 3 cannot cover 10 steps


def test_dps_must_be_fitted_and_is_tied_to_its_step_count():
    with pytest.raises(ScheduleInvalidError, match="fit"):
        DPS(interval=5).refresh_mask(20)
    fitted = DPS(interval=5).fit(random_features(0, 20))
    with pytest.raises(StepCountMismatchError, match="20"):
        fitted.refresh_mask(25)


def test_dps_planning_is_fast_for_1000_steps():
    # Not a timing assertion (see bench/cache_speed.py for times): the DP must finish, exactly K groups.
    features = random_features(0, 1000, dim=16)
    fitted = DPS(interval=10).fit(features)
    assert len(fitted.steps) == 100
    lengths = np.diff([*fitted.steps, 1000])
    assert lengths[:-1].min() >= 5 and lengths.max() <= 20


# ---------------------------------------------------------------------------------------------------------------
# Values: validation and round trips


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: UniformSchedule(interval=0), "interval"),
        (lambda: UniformSchedule(interval=2.5), "interval"),
        (lambda: Power(interval=0), "interval"),
        (lambda: Power(interval=3, power=0), "power"),
        (lambda: Power(interval=3, center=-1), "center"),
        (lambda: DPS(), "interval or refreshes"),
        (lambda: DPS(interval=3, refreshes=4), "interval or refreshes"),
        (lambda: DPS(interval=3, distance="cosine"), "distance"),
        (lambda: DPS(interval=3, min_len=5, max_len=2), "min_len"),
        (lambda: DPS(refreshes=0), "refreshes"),
    ],
)
def test_invalid_configs_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


schedules = st.one_of(
    st.builds(UniformSchedule, interval=st.integers(1, 50)),
    st.builds(Power, interval=st.integers(1, 50), power=st.floats(0.5, 3.0), center=st.none() | st.integers(0, 99)),
    st.builds(DPS, interval=st.integers(1, 20), distance=st.sampled_from(["l1", "l2", "mse"])),
    st.builds(DPS, refreshes=st.integers(1, 20), min_len=st.none() | st.integers(1, 3)),
)


@given(schedule=schedules)
def test_schedules_round_trip(schedule):
    assert from_dict(to_dict(schedule)) == schedule


def test_fitted_dps_round_trips():
    fitted = DPS(interval=4).fit(random_features(3, 30))
    again = from_dict(to_dict(fitted))
    assert again == fitted and again.refresh_mask(30) == fitted.refresh_mask(30)


def test_every_registered_schedule_is_covered():
    assert set(SCHEDULES.names()) >= {"uniform", "power", "dps"}


# ---------------------------------------------------------------------------------------------------------------
# DPS under PLMS: groups by sampler steps, not model calls


@given(steps=st.integers(4, 60), N=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_dps_plans_groups_by_sampler_steps(steps, N, seed):
    calls = steps + 1  # PLMS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = DPS(interval=N).fit(random_features(seed, calls), sampler_steps=steps)
    assert fitted.num_steps == calls and sum(fitted.refresh_mask(calls)) == min(math.ceil(steps / N), calls)


def test_dps_under_plms_matches_the_reference_group_count():
    from conftest import tiny_unet  # not tests.conftest: torch-fidelity installs a top-level `tests` package

    import cq
    from cq.sampling import plms

    unet = tiny_unet()
    point = unet.default_cache_point()
    trace = cq.trace(unet, plms, steps=20, num_samples=2, points=[point], spacing="linspace", progress=False)
    assert trace.steps == 21 and trace.settings.steps == 20
    cacher = cq.cache.DeepCache(schedule=DPS(interval=5), point=point).fit(unet, trace)
    assert sum(cacher.schedule.refresh_mask(21)) == 4  # ceil(20 / 5); ceil(21 / 5) = 5 before


@pytest.mark.parametrize("schedule", [Power(interval=3), DPS(refreshes=3)])
def test_num_refreshes_counts_full_forwards_for_every_schedule(schedule):
    """`num_refreshes` is a method on every schedule, including DPS whose budget field is named `refreshes`."""
    features = torch.randn(12, 4, 2, 2)
    fitted = schedule.fit(features) if schedule.needs_fit else schedule
    assert fitted.num_refreshes(12) == sum(fitted.refresh_mask(12))
    if isinstance(schedule, DPS):
        assert fitted.refreshes == 3 == fitted.num_refreshes(12)
