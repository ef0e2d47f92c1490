"""SensitivityDP: gains measured from single-step rollouts, the plan is the exact minimiser of the predicted
end-to-end error, the guard never keeps a schedule below uniform or DPS on its objective; inside Recipe.fit on a
tiny model; save / load and registry round trips; errors."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cq
from cq.cache import DPS, SensitivityDP, UniformSchedule
from cq.cache.deepcache import DeepCache
from cq.cache.dps import distance_table, group_bounds
from cq.cache.schedule import refresh_steps
from cq.cache.search import end_to_end_db
from cq.cache.sensitivity_dp import step_gains, weighted_distances
from cq.correct import CacheErrorCorrector, QuantErrorCorrector
from cq.errors import ConfigError, ScheduleInvalidError, StepCountMismatchError
from cq.fit.recipe import Recipe
from cq.quant import UniformQuantizer
from cq.registry import SCHEDULES, from_dict, to_dict
from cq.sampling import ddim


STEPS = 8


def walk(seed: int, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, 5, generator=g).cumsum(0)


class AmplitudeRollout:
    """A compressed model whose end-to-end error is exactly SensitivityDP's model: RMS error = sum over cached
    steps s of ``gain[s] * ||F_s - F_source(s)||``, scaled per trajectory (mean square 1). Counts its calls."""

    def __init__(self, seed: int, features: torch.Tensor, trajectories: int = 16):
        g = torch.Generator().manual_seed(seed + 1)
        T = features.shape[0]
        self.features = features.double()
        self.gain = torch.rand(T, generator=g, dtype=torch.float64) ** 2
        spread = 0.5 + torch.rand(trajectories, generator=g, dtype=torch.float64)
        self.spread = spread / spread.square().mean().sqrt()
        self.calls = 0

    def rms(self, steps: tuple[int, ...]) -> float:
        source, hits, total = 0, set(steps), 0.0
        for i in range(self.features.shape[0]):
            source = i if i in hits else source
            total += float(self.gain[i] * (self.features[i] - self.features[source]).norm())
        return total

    def mse(self, steps: tuple[int, ...], trajectories: int) -> torch.Tensor:
        return 1e-30 + (self.rms(steps) * self.spread[:trajectories]) ** 2

    def __call__(self, schedule, trajectories: int) -> torch.Tensor:
        self.calls += 1
        return self.mse(schedule.steps, trajectories)


def fit(schedule: SensitivityDP, seed: int, T: int) -> tuple[SensitivityDP, AmplitudeRollout]:
    features = walk(seed, T)
    rollout = AmplitudeRollout(seed, features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DPS relaxes its bounds for tiny T, by design
        return schedule.fit(features, rollout=rollout), rollout


def feasible_splits(T: int, K: int, lo: int, hi: int, last_lo: int):
    for cuts in itertools.combinations(range(1, T), K - 1):
        bounds = (0, *cuts, T)
        lengths = [b - a for a, b in itertools.pairwise(bounds)]
        if all(lo <= n <= hi for n in lengths[:-1]) and last_lo <= lengths[-1] <= hi:
            yield (0, *cuts)


# ---------------------------------------------------------------------------------------------------------------
# Properties on a rollout that follows the model exactly


@settings(deadline=None)
@given(T=st.integers(2, 11), N=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_the_gains_are_recovered_and_the_plan_minimises_the_predicted_error(T, N, seed):
    fitted, rollout = fit(SensitivityDP(interval=N), seed, T)
    moved = (rollout.features[1:] - rollout.features[:-1]).norm(dim=1)
    expected = torch.cat([torch.zeros(1, dtype=torch.float64), rollout.gain[1:] * (moved > 0)])
    gains = torch.tensor(fitted.gains, dtype=torch.float64)
    assert torch.allclose(gains, expected, rtol=1e-5, atol=1e-9)  # distances are taken in fp32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K, lo, hi, last_lo = group_bounds(T, N, None, None, None)
    best = min(rollout.rms(split) for split in feasible_splits(T, K, lo, hi, last_lo))  # brute force
    plan_steps = fitted.steps if fitted.chosen == "sensitivity" else None
    if plan_steps is not None:
        assert rollout.rms(plan_steps) <= best * (1 + 1e-6) + 1e-9
    assert rollout.rms(fitted.steps) <= best * (1 + 1e-6) + 1e-9  # whichever was kept, it is optimal here
    assert rollout.calls == T - 1 + 3


@settings(deadline=None)
@given(T=st.integers(2, 40), N=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_k_is_kept_and_the_guard_never_loses_to_uniform_or_dps(T, N, seed):
    fitted, rollout = fit(SensitivityDP(interval=N, tail=0.5), seed, T)
    mask = fitted.refresh_mask(T)
    assert mask[0] and sum(mask) == math.ceil(T / N) == len(fitted.steps)
    score = lambda steps: end_to_end_db(rollout.mse(steps, fitted.trajectories), fitted.tail)  # noqa: E731
    uniform = refresh_steps(UniformSchedule(interval=N).refresh_mask(T))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dps = DPS(interval=N).fit(walk(seed, T)).steps
    assert fitted.fitted_db == score(fitted.steps) >= max(score(uniform), score(dps))
    assert fitted.chosen in ("sensitivity", "dps", "uniform")


@given(T=st.integers(2, 30), max_len=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_unit_gains_give_dps_l2_distances(T, max_len, seed):
    plain = distance_table(walk(seed, T), max_len, "l2")
    ones = torch.ones(T, dtype=torch.float64)
    assert torch.equal(weighted_distances(plain, ones), plain)
    gains = torch.rand(T, dtype=torch.float64)
    weighted = weighted_distances(plain, gains)
    for a in range(T):
        for r in range(min(max_len, T - a)):
            assert math.isclose(float(weighted[a, r]), float(gains[a + r] * plain[a, r]), rel_tol=1e-12)


def test_gains_are_zero_where_the_feature_does_not_move():
    features = torch.tensor([[0.0], [1.0], [1.0], [3.0]])
    gains = step_gains(torch.tensor([0.0, 2.0, 5.0, 4.0]), distance_table(features, 2, "l2"))
    assert gains.tolist() == [0.0, 2.0, 0.0, 2.0]


def test_a_late_sensitive_model_moves_refreshes_late():
    """Only the last steps' errors reach the sample: the plan puts its refreshes there, unlike DPS."""
    T, N = 24, 4
    features = walk(3, T)
    rollout = AmplitudeRollout(3, features)
    rollout.gain = torch.linspace(0, 1, T, dtype=torch.float64) ** 6
    fitted = SensitivityDP(interval=N).fit(features, rollout=rollout)
    dps = DPS(interval=N).fit(features).steps
    assert fitted.chosen == "sensitivity" and rollout.rms(fitted.steps) < 0.8 * rollout.rms(dps)
    assert sum(s >= T // 2 for s in fitted.steps) > sum(s >= T // 2 for s in dps)


# ---------------------------------------------------------------------------------------------------------------
# Inside Recipe.fit, on a tiny model


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(unet, steps=STEPS, num_samples=6, points=[unet.default_cache_point()], progress=False)


@pytest.fixture(scope="module")
def fitted(unet, trace):
    recipe = Recipe(
        cacher=DeepCache(schedule=SensitivityDP(interval=3, trajectories=3)),
        quantizer=UniformQuantizer(refresh_samples=4, cached_samples=2),
        correctors=(CacheErrorCorrector(), QuantErrorCorrector()),
    )
    return recipe.fit(unet, trace, progress=False)


def test_recipe_fit_measures_gains_on_rollouts_and_saves(fitted, unet, trace, tmp_path):
    schedule = fitted.recipe.cacher.schedule
    assert isinstance(schedule, SensitivityDP) and schedule.chosen in ("sensitivity", "dps", "uniform")
    assert len(schedule.gains) == STEPS and schedule.gains[0] == 0 and min(schedule.gains[1:]) > 0
    assert sum(fitted.refresh_mask()) == math.ceil(STEPS / 3)
    noise = trace.x[0, :3]
    before = ddim(fitted, noise, steps=STEPS)
    loaded = cq.load(cq.save(fitted, tmp_path / "sensitivity.cq"), unet=unet, num_steps=STEPS)
    assert loaded.recipe == fitted.recipe and torch.equal(ddim(loaded, noise, steps=STEPS), before)


def test_sensitivity_dp_round_trips_through_the_registry(fitted):
    schedule = fitted.recipe.cacher.schedule
    assert SCHEDULES.get("sensitivity-dp") is SensitivityDP
    assert from_dict(to_dict(schedule)) == schedule
    assert from_dict(to_dict(SensitivityDP(refreshes=4, tail=0.0))) == SensitivityDP(refreshes=4, tail=0.0)


def test_unfitted_or_misused_sensitivity_dp_raises(unet, trace):
    with pytest.raises(ScheduleInvalidError, match="not been fitted"):
        SensitivityDP(interval=2).refresh_mask(STEPS)
    with pytest.raises(ScheduleInvalidError, match="rollout"):
        SensitivityDP(interval=2).fit(trace.features[unet.default_cache_point()])
    with pytest.raises(ScheduleInvalidError, match="Recipe.fit"):
        DeepCache(schedule=SensitivityDP(interval=2)).fit(unet, trace)
    fitted_schedule, _ = fit(SensitivityDP(interval=2), 0, STEPS)
    with pytest.raises(StepCountMismatchError, match="fitted for 8 steps"):
        fitted_schedule.refresh_mask(STEPS + 1)
    bad_kwargs = (
        {},
        {"interval": 2, "refreshes": 3},
        {"interval": 0},
        {"interval": 2, "tail": -1.0},
        {"interval": 2, "trajectories": 0},
        {"interval": 2, "min_len": 3, "max_len": 2},
    )
    for bad in bad_kwargs:
        with pytest.raises(ConfigError):
            SensitivityDP(**bad)
    with pytest.raises(ConfigError, match="steps must be increasing"):
        SensitivityDP(interval=2, steps=(1, 3), num_steps=8)


def test_a_guided_plms_trace_plans_by_sampler_steps():
    """Guided PLMS on a tiny class-conditional LDM: 5 sampler steps make 6 model calls; K = ceil(5 / 2) as DPS
    plans it, gains for every call, rolled out guided (the rollout's own test: tests/test_budget.py)."""
    from cq.models import LatentDiffusion
    from cq.sampling import plms

    pipe = LatentDiffusion.build("tiny-ldm-cin", seed=0)
    point = pipe.unet.cache_points()[-1]
    trace = cq.trace(
        pipe.unet, plms, steps=5, num_samples=4, cond=pipe.condition(torch.tensor([3, 7, 1, 4])),
        guidance_scale=3.0, uncond=pipe.unconditional(1), points=[point], progress=False,
    )  # fmt: skip
    schedule = DeepCache(schedule=SensitivityDP(interval=2, trajectories=3), point=point)
    model = Recipe(cacher=schedule).fit(pipe.unet, trace, progress=False)
    fitted = model.recipe.cacher.schedule
    assert trace.steps == 6 and len(fitted.gains) == 6 and sum(model.refresh_mask()) == 3 == len(fitted.steps)
    assert fitted.gains[0] == 0 and min(fitted.gains[1:]) > 0
