"""CompressedUNet + DeepCache: interval 1 is the original, step contract, cache discipline, MACs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import cq
from cq.cache import DPS, CacheView, Power, UniformSchedule
from cq.cache.deepcache import DeepCache
from cq.calib.trace import seeded_noise
from cq.compressed import CompressedUNet
from cq.errors import CacheEmptyError, CachePointError, ScheduleInvalidError, StepCountMismatchError
from cq.metrics import count_macs, predicted_speedup, unet_macs
from cq.registry import from_dict, to_dict
from cq.sampling import FullPrecision, ddim


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    return seeded_noise((1, 16, 16), range(3))


STEPS = 8


@pytest.fixture(scope="module")
def reference(unet, noise) -> torch.Tensor:
    return ddim(FullPrecision(unet), noise, steps=STEPS, spacing="linspace")


@pytest.mark.parametrize("point_index", range(6))
@pytest.mark.parametrize("schedule", [UniformSchedule(interval=1), Power(interval=1), DPS(interval=1)])
def test_interval_one_is_bit_identical_to_no_cache(unet, noise, reference, schedule, point_index):
    point = unet.cache_points()[point_index]
    trace = cq.trace(unet, steps=STEPS, num_samples=2, points=[point], spacing="linspace", progress=False)
    cacher = DeepCache(schedule=schedule, point=point).fit(unet, trace)
    model = CompressedUNet(unet, num_steps=STEPS, cacher=cacher)
    assert all(model.refresh_mask())
    assert torch.equal(ddim(model, noise, steps=STEPS, spacing="linspace"), reference)


def test_caching_changes_the_result_and_skips_work(unet, noise, reference):
    model = CompressedUNet(unet, num_steps=STEPS, cacher=DeepCache(schedule=UniformSchedule(interval=4)))
    out = ddim(model, noise, steps=STEPS, spacing="linspace")
    assert not torch.equal(out, reference)
    assert model.refresh_mask() == (True, False, False, False, True, False, False, False)


@given(step=st.integers(0, STEPS - 1))
def test_same_step_twice_gives_the_same_output(unet, noise, step):
    model = CompressedUNet(unet, num_steps=STEPS, cacher=DeepCache(schedule=UniformSchedule(interval=3)))
    t = torch.full((3,), 500)
    refresh = model.cache.source[step]
    model(noise, t, step=refresh)  # fill the cache as a sampler would
    a = model(noise, t, step=step)
    b = model(noise, t, step=step)
    assert torch.equal(a, b)


def test_cached_step_before_its_refresh_raises(unet, noise):
    model = CompressedUNet(unet, num_steps=STEPS, cacher=DeepCache(schedule=UniformSchedule(interval=4)))
    t = torch.full((3,), 500)
    with pytest.raises(CacheEmptyError, match="refresh step 0"):
        model(noise, t, step=1)
    model(noise, t, step=0)
    model(noise, t, step=1)
    with pytest.raises(CacheEmptyError, match="refresh step 4"):
        model(noise, t, step=5)  # step 4 never ran: the cache still holds step 0
    with pytest.raises(CacheEmptyError, match="batch"):
        model(noise[:2], t[:2], step=2)


def test_step_out_of_range_and_sampler_step_count_mismatch(unet, noise):
    model = CompressedUNet(unet, num_steps=STEPS, cacher=DeepCache(schedule=UniformSchedule(interval=2)))
    with pytest.raises(StepCountMismatchError):
        model(noise, torch.full((3,), 1), step=STEPS)
    with pytest.raises(StepCountMismatchError, match=str(STEPS)):
        ddim(model, noise, steps=STEPS + 2, spacing="linspace")


def test_dps_cacher_needs_a_trace_with_its_point(unet):
    cacher = DeepCache(schedule=DPS(interval=2))
    with pytest.raises(ScheduleInvalidError, match="trace"):
        cacher.fit(unet, None)
    with pytest.raises(ScheduleInvalidError):
        CompressedUNet(unet, num_steps=STEPS, cacher=cacher)  # unfitted DPS cannot build a mask


def test_deepcache_point_resolution(unet):
    assert (
        DeepCache(schedule=UniformSchedule(interval=2)).resolve_point(unet)
        == unet.default_cache_point()
        == "up.1.block.2"
    )
    with pytest.raises(CachePointError, match="up.9.block.0"):
        DeepCache(schedule=UniformSchedule(interval=2), point="up.9.block.0").resolve_point(unet)


def test_fitted_cacher_round_trips(unet):
    trace = cq.trace(
        unet, steps=STEPS, num_samples=2, points=[unet.default_cache_point()], spacing="linspace", progress=False
    )
    cacher = DeepCache(schedule=DPS(interval=3)).fit(unet, trace)
    again = from_dict(to_dict(cacher))
    assert again == cacher
    assert CompressedUNet(unet, num_steps=STEPS, cacher=again).refresh_mask() == cacher.schedule.refresh_mask(STEPS)


# ---------------------------------------------------------------------------------------------------------------
# MACs


def test_macs_match_torch_flop_counter(unet):
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    ours = count_macs(unet, x, t)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t)
    assert ours.total == counter.get_total_flops() // 2
    assert ours.matmul > 0 and ours.conv > 0 and ours.linear > 0


@pytest.mark.parametrize("point_index", [0, 3, 5])
def test_shallow_macs_match_torch_flop_counter(unet, point_index):
    point = unet.cache_points()[point_index]
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([42])
    view = CacheView.full(record=[point])
    with torch.no_grad():
        unet(x, t, cache=view)
    shallow = CacheView.shallow(point, view.features[point])
    ours = count_macs(unet, x, t, cache=shallow)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, cache=shallow)
    assert ours.total == counter.get_total_flops() // 2


def test_shallow_macs_shrink_towards_the_shallowest_point(unet):
    macs = unet_macs(unet)
    shallow = [macs[p] for p in unet.cache_points()]
    assert all(a >= b for a, b in zip(shallow, shallow[1:], strict=False))
    assert macs["full"] > shallow[0]


def test_cifar10_preset_macs_match_the_published_count():
    # 6.22 GMACs per forward at batch 1, incl. attention matmuls (ecosystem.md §B, FlopCounterMode count).
    with torch.device("meta"):
        model = cq.models.build("cifar10")
    macs = unet_macs(model.to_empty(device="cpu"), points=["up.1.block.2", "up.0.block.2"])
    assert macs["full"] == pytest.approx(6.22e9, rel=2e-3)
    assert macs["up.1.block.2"] / macs["full"] == pytest.approx(0.544, abs=0.01)  # DeepCache branch 2


@given(T=st.integers(1, 200), N=st.integers(1, 30), ratio=st.floats(0.01, 1.0))
def test_predicted_speedup_formula(T, N, ratio):
    mask = UniformSchedule(interval=N).refresh_mask(T)
    speedup = predicted_speedup(1.0, ratio, mask)
    K = sum(mask)
    assert speedup == pytest.approx(T / (K + (T - K) * ratio))
    assert speedup * (1 + 1e-12) >= 1.0 and speedup <= 1 / ratio * (1 + 1e-12)


def test_out_of_range_timesteps_and_non_finite_inputs_are_refused(unet):
    from cq.errors import InputValueError

    model = CompressedUNet(unet, num_steps=2)
    x = torch.zeros(1, 1, 16, 16)
    for t in (torch.tensor([1000]), torch.tensor([-1])):
        with pytest.raises(InputValueError, match=r"\[0, 1000\)"):
            model(x, t, step=0)
    with pytest.raises(InputValueError, match="NaN"):
        model(torch.full((1, 1, 16, 16), float("nan")), torch.tensor([5]), step=0)
    with pytest.raises(InputValueError, match="NaN or inf"):
        model(x, torch.tensor([float("inf")]), step=0)
    assert model(x, torch.tensor([999]), step=1).shape == x.shape
