"""TrajectorySearch: K fixed, step 0, never worse than its start on its own objective, deterministic; the rollout
hook inside Recipe.fit on a tiny model; save / load and registry round trips; errors."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cq
from cq.cache import DPS, SensitivityDP, TrajectorySearch, UniformSchedule
from cq.cache.deepcache import DeepCache
from cq.cache.schedule import refresh_steps
from cq.cache.search import coordinate_descent, end_to_end_db, even_steps
from cq.correct import CacheErrorCorrector, QuantErrorCorrector
from cq.errors import ConfigError, ScheduleInvalidError, StepCountMismatchError
from cq.fit.recipe import Recipe
from cq.fit.rollout import CalibrationRollout
from cq.quant import UniformQuantizer, quantized_modules
from cq.registry import SCHEDULES, from_dict, to_dict
from cq.sampling import ddim


STEPS = 8


class SyntheticRollout:
    """A deterministic stand-in for the compressed model: trajectory j's error grows with each cached step's
    staleness, weighted per step (random, fixed by ``seed``) and per trajectory. Counts its calls."""

    def __init__(self, seed: int, num_steps: int, trajectories: int = 8):
        g = torch.Generator().manual_seed(seed)
        self.step_weight = torch.rand(num_steps, generator=g, dtype=torch.float64) ** 2
        self.trajectory_weight = 0.5 + torch.rand(trajectories, generator=g, dtype=torch.float64)
        self.calls = 0
        self.asked: list[int | None] = []  # the trajectories argument of every call

    def mse(self, steps: tuple[int, ...], trajectories: int | None) -> torch.Tensor:
        T = self.step_weight.shape[0]
        source, hits = 0, set(steps)
        error = torch.tensor(0.0, dtype=torch.float64)
        for i in range(T):
            source = i if i in hits else source
            error = error + self.step_weight[i] * (i - source)
        return 1e-4 + 1e-3 * error * self.trajectory_weight[:trajectories]

    def __call__(self, schedule, trajectories: int | None) -> torch.Tensor:
        self.calls += 1
        self.asked.append(trajectories)
        return self.mse(schedule.steps, trajectories)


def walk(seed: int, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, 5, generator=g).cumsum(0)


def fit(schedule: TrajectorySearch, seed: int, T: int) -> tuple[TrajectorySearch, SyntheticRollout]:
    rollout = SyntheticRollout(seed, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DPS relaxes its bounds for tiny T, by design
        return schedule.fit(walk(seed, T), rollout=rollout), rollout


# ---------------------------------------------------------------------------------------------------------------
# Properties on a synthetic rollout


@given(T=st.integers(2, 40), N=st.integers(1, 8), seed=st.integers(0, 10**6), budget=st.integers(0, 30))
def test_search_keeps_the_budget_refreshes_step_0_and_never_loses_to_its_start(T, N, seed, budget):
    fitted, rollout = fit(TrajectorySearch(interval=N, budget=budget), seed, T)
    mask = fitted.refresh_mask(T)
    assert mask[0] and len(mask) == T
    assert sum(mask) == math.ceil(T / N) == fitted.num_refreshes(T)
    score = lambda steps: end_to_end_db(rollout.mse(steps, fitted.trajectories), fitted.tail)  # noqa: E731
    uniform = refresh_steps(UniformSchedule(interval=N).refresh_mask(T))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dps = DPS(interval=N).fit(walk(seed, T)).steps
    assert fitted.start_db == max(score(uniform), score(dps))
    assert fitted.fitted_db == score(fitted.steps) >= fitted.start_db >= score(uniform)
    assert rollout.calls <= 2 + budget


@given(T=st.integers(2, 30), K=st.integers(1, 30), seed=st.integers(0, 10**6))
def test_search_by_refresh_count_is_deterministic(T, K, seed):
    K = min(K, T)
    first, _ = fit(TrajectorySearch(refreshes=K, budget=12), seed, T)
    again, _ = fit(TrajectorySearch(refreshes=K, budget=12), seed, T)
    assert first == again
    assert len(first.steps) == K and first.steps[0] == 0


@given(T=st.integers(3, 40), K=st.integers(1, 12), seed=st.integers(0, 10**6), shift=st.integers(1, 3))
def test_coordinate_descent_only_accepts_improvements(T, K, seed, shift):
    K = min(K, T)
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(T, generator=g).tolist()
    values = []

    def score(steps):
        values.append(sum(table[s] for s in steps))
        return values[-1]

    start = even_steps(T, K)
    steps, best, used = coordinate_descent(score, start, T, max_shift=shift, budget=25)
    assert len(steps) == K and steps[0] == 0 and list(steps) == sorted(set(steps)) and steps[-1] < T
    assert best == score(steps) >= values[0] and used <= 25
    assert best == max(values[:used])  # the best evaluated schedule is the result


def test_search_rolls_out_every_kept_trajectory_by_default():
    """8 trajectories fitted calibration noise on the demo model; the default rolls out all the trace kept."""
    fitted, rollout = fit(TrajectorySearch(interval=3, budget=5), 0, 12)
    assert fitted.trajectories is None and rollout.asked and set(rollout.asked) == {None}
    _, rollout = fit(TrajectorySearch(interval=3, budget=5, trajectories=4), 0, 12)
    assert set(rollout.asked) == {4}


def test_search_improves_on_a_model_where_the_start_is_poor():
    """Staleness costs only late: the search moves refreshes towards the end, beyond uniform and DPS."""
    T = 20
    rollout = SyntheticRollout(0, T)
    rollout.step_weight = torch.linspace(0, 1, T, dtype=torch.float64) ** 4
    fitted = TrajectorySearch(interval=4, budget=60).fit(walk(0, T), rollout=rollout)
    assert fitted.fitted_db > fitted.start_db + 1.0


# ---------------------------------------------------------------------------------------------------------------
# Inside Recipe.fit, on a tiny model


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(unet, steps=STEPS, num_samples=6, points=[unet.default_cache_point()], progress=False)


def search_recipe(**kwargs) -> Recipe:
    schedule = TrajectorySearch(interval=3, trajectories=3, budget=3, **kwargs)
    return Recipe(
        cacher=DeepCache(schedule=schedule),
        quantizer=UniformQuantizer(refresh_samples=4, cached_samples=2),
        correctors=(CacheErrorCorrector(), QuantErrorCorrector()),
    )


@pytest.fixture(scope="module")
def fitted(unet, trace):
    return search_recipe().fit(unet, trace, progress=False)


def test_recipe_fit_searches_on_rollouts_and_saves(fitted, unet, trace, tmp_path):
    schedule = fitted.recipe.cacher.schedule
    assert isinstance(schedule, TrajectorySearch) and schedule.start in ("uniform", "dps")
    assert schedule.fitted_db >= schedule.start_db and sum(fitted.refresh_mask()) == math.ceil(STEPS / 3)
    noise = trace.x[0, :3]
    before = ddim(fitted, noise, steps=STEPS)
    loaded = cq.load(cq.save(fitted, tmp_path / "search.cq"), unet=unet, num_steps=STEPS)
    assert loaded.recipe == fitted.recipe and torch.equal(ddim(loaded, noise, steps=STEPS), before)


def test_search_round_trips_through_the_registry(fitted):
    schedule = fitted.recipe.cacher.schedule
    assert SCHEDULES.get("search") is TrajectorySearch
    assert from_dict(to_dict(schedule)) == schedule
    assert from_dict(to_dict(TrajectorySearch(refreshes=4, tail=0.0))) == TrajectorySearch(refreshes=4, tail=0.0)


def test_rollout_without_caching_reproduces_the_trace(unet, trace):
    rollout = CalibrationRollout((), unet, trace)
    mse = rollout(DeepCache(schedule=UniformSchedule(interval=1)).fit(unet, trace), 3)
    assert mse.shape == (3,) and float(mse.max()) < 1e-8  # the batch differs from the trace's: float summation
    cached = rollout(DeepCache(schedule=UniformSchedule(interval=4)).fit(unet, trace), 3)
    assert float(cached.min()) > 1e3 * float(mse.max())
    every = rollout(DeepCache(schedule=UniformSchedule(interval=4)).fit(unet, trace), None)
    assert every.shape == (trace.x0.shape[0],)  # None: every kept trajectory; batch size moves float sums only
    torch.testing.assert_close(every[:3], cached, rtol=1e-3, atol=0)
    for bad in (7, 0, True, 2.0):
        with pytest.raises(ConfigError, match="kept trajectories"):
            rollout(DeepCache(schedule=UniformSchedule(interval=1)).fit(unet, trace), bad)


class NeverCalibrated:
    """A quantizer stand-in that fails if asked to calibrate."""

    def quantize(self, *args, **kwargs):
        raise AssertionError("the quantizer calibrated before the trace was checked")


def test_a_recipe_with_a_quantizer_rolls_candidates_out_quantized(unet, trace, monkeypatch):
    """`CalibrationRollout.of` quantizes the body once (every step a full call): without caching, a rollout is
    the quantized model's own error -- what a quant-only model sampled directly gives, not ~0 as in full
    precision. `Recipe.fit` hands that rollout to the cacher; the UNet stays untouched."""
    recipe = search_recipe()
    rollout = CalibrationRollout.of(unet, trace, correctors=recipe.correctors[:1], quantizer=recipe.quantizer)
    assert quantized_modules(rollout.body) and not quantized_modules(unet)
    every_step = DeepCache(schedule=UniformSchedule(interval=1)).fit(unet, trace)
    quantized = rollout(every_step, 3)
    direct = Recipe(quantizer=recipe.quantizer).fit(unet, trace, progress=False)  # same tables: no cache either way
    x0 = ddim(direct, trace.x[0, :3], steps=STEPS)
    expected = (x0.double() - trace.x0[:3].double()).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(quantized, expected, rtol=1e-3, atol=0)
    assert float(quantized.min()) > 1e3 * float(CalibrationRollout((), unet, trace)(every_step, 3).max())
    assert CalibrationRollout.of(unet, trace).body is None  # no quantizer: full precision
    with pytest.raises(ConfigError, match="quantized copy"):
        CalibrationRollout((), unet, trace, body="unet")
    with pytest.raises(ConfigError, match="sampler settings"):  # refused before the quantizer calibrates
        CalibrationRollout.of(unet, replace(trace, settings=None), quantizer=NeverCalibrated())
    with pytest.raises(ConfigError, match="quantizer must be a cq.quant.Quantizer"):
        CalibrationRollout.of(unet, trace, quantizer=NeverCalibrated())
    with pytest.raises(ConfigError, match="must be Corrector values"):
        CalibrationRollout.of(unet, trace, correctors=("dec",))

    asked = []  # Recipe.fit asks for a quantized rollout unless the schedule declares otherwise
    record = classmethod(lambda cls, *args, **kw: asked.append((kw["quantizer"], kw["correctors"])) or rollout)
    monkeypatch.setattr(CalibrationRollout, "of", record)
    recipe.fit(unet, trace, progress=False)
    sensitivity = DeepCache(schedule=SensitivityDP(interval=3, trajectories=3))
    replace(recipe, cacher=sensitivity).fit(unet, trace, progress=False)
    before = (recipe.correctors[0],)  # the DEC quantization correction stays out of every rollout
    assert asked == [(recipe.quantizer, before), (None, before)]  # then no quantizer: SensitivityDP declares it
    assert not SensitivityDP.quantized_rollout and TrajectorySearch.quantized_rollout


def test_unfitted_or_misused_search_raises(unet, trace):
    with pytest.raises(ScheduleInvalidError, match="not been fitted"):
        TrajectorySearch(interval=2).refresh_mask(STEPS)
    with pytest.raises(ScheduleInvalidError, match="rollout"):
        TrajectorySearch(interval=2).fit(trace.features[unet.default_cache_point()])
    with pytest.raises(ScheduleInvalidError, match="Recipe.fit"):
        DeepCache(schedule=TrajectorySearch(interval=2)).fit(unet, trace)
    fitted, _ = fit(TrajectorySearch(interval=2, budget=2), 0, STEPS)
    with pytest.raises(StepCountMismatchError, match="fitted for 8 steps"):
        fitted.refresh_mask(STEPS + 1)
    for bad in ({}, {"interval": 2, "refreshes": 3}, {"interval": 0}, {"interval": 2, "tail": -1.0}):
        with pytest.raises(ConfigError):
            TrajectorySearch(**bad)
    with pytest.raises(ConfigError, match="steps must be increasing"):
        TrajectorySearch(interval=2, steps=(1, 3), num_steps=8)
