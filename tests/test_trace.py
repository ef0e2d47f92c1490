"""`cq.trace`: recorded full-precision trajectories, their memory bound and their content."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cq.calib.trace import Trace, seeded_noise, trace
from cq.core.view import CacheView
from cq.errors import ConfigError, InputShapeError, TraceBudgetError
from cq.models.ddpm import DDPMConfig, DDPMUNet
from cq.sampling import FullPrecision, NoiseSchedule, ddim, ddim_timesteps


RES = 16
SAMPLE_SHAPE = (1, RES, RES)
# Shape of the feature entering each up block of DDPMUNet(ch=32, ch_mult=(1, 2), num_res_blocks=2): level 1 works
# at RES/2 on ch*2 = 64 channels (its first block gets the mid output, 64 channels); level 0 at RES gets the
# upsampled 64-channel level-1 output first, then its own 32 channels.
FEATURE_SHAPES = {
    "up.1.block.0": (64, RES // 2, RES // 2),
    "up.1.block.1": (64, RES // 2, RES // 2),
    "up.1.block.2": (64, RES // 2, RES // 2),
    "up.0.block.0": (64, RES, RES),
    "up.0.block.1": (32, RES, RES),
    "up.0.block.2": (32, RES, RES),
}
POINTS = ("up.1.block.2", "up.0.block.0")
SEED = 7


@pytest.fixture(scope="module")
def unet():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = DDPMUNet(
            DDPMConfig(resolution=RES, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2), attn_resolutions=(RES // 2,)),
            noise_schedule=NoiseSchedule(),
        )
    return net.eval()


def assert_close_scaled(actual, expected, rel):
    """|actual - expected| <= rel * max|expected|, elementwise.

    DDIM with an untrained UNet walks far from N(0, 1) (|x| reaches hundreds: x0 = (x - sqrt(1-ab) eps) / sqrt(ab)
    divides by sqrt(ab_T) ~ 6e-3), and float32 results depend at the ulp level on batch composition, so tolerances
    are taken relative to the tensor's scale.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale)


def _trace(unet, **kw):
    kw.setdefault("spacing", "linspace")
    kw.setdefault("progress", False)
    return trace(unet, **kw)


class Observer:
    def __init__(self):
        self.calls = []

    def __call__(self, step, x, t, cond, features):
        self.calls.append(
            dict(step=step, x=x.clone(), t=t.clone(), cond=cond, features={p: f.clone() for p, f in features.items()})
        )


@pytest.fixture(scope="module")
def recorded(unet):
    """5 trajectories in batches of 2, 2, 1; 3 of them kept."""
    obs = Observer()
    tr = _trace(unet, steps=5, num_samples=5, keep=3, batch_size=2, seed=SEED, points=POINTS, observers=[obs])
    return tr, obs


def test_cache_point_table_matches_the_unet(unet):
    assert set(FEATURE_SHAPES) == set(unet.cache_points())
    assert tuple(unet.sample_shape) == SAMPLE_SHAPE


# ----------------------------------------------------------------------------------------------------------------
# Memory bound


@settings(max_examples=8)
@given(
    steps=st.integers(1, 3),
    num_samples=st.integers(1, 4),
    data=st.data(),
    batch_size=st.integers(1, 4),
    points=st.lists(st.sampled_from(sorted(FEATURE_SHAPES)), unique=True, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_nbytes_matches_the_estimate_and_the_budget_is_enforced(
    unet, steps, num_samples, data, batch_size, points, dtype
):
    keep = data.draw(st.integers(0, num_samples), label="keep")
    itemsize = 2 if dtype == torch.float16 else 4
    per_step = math.prod(SAMPLE_SHAPE) + sum(math.prod(FEATURE_SHAPES[p]) for p in points)
    expected = steps * keep * itemsize * per_step + keep * 4 * math.prod(SAMPLE_SHAPE)
    estimate = Trace.estimate_bytes(
        steps=steps,
        keep=keep,
        sample_shape=SAMPLE_SHAPE,
        feature_shapes={p: FEATURE_SHAPES[p] for p in points},
        dtype=dtype,
    )
    assert estimate == expected

    kw = dict(steps=steps, num_samples=num_samples, keep=keep, batch_size=batch_size, points=points, dtype=dtype)
    if estimate > 0:
        with pytest.raises(TraceBudgetError):
            _trace(unet, max_bytes=estimate - 1, **kw)
    tr = _trace(unet, max_bytes=estimate, **kw)

    assert tr.nbytes == estimate
    assert tr.steps == steps and set(tr.points) == set(points)
    assert tr.x.shape == (steps, keep, *SAMPLE_SHAPE) and tr.x.dtype == dtype
    assert tr.x0.shape == (keep, *SAMPLE_SHAPE) and tr.x0.dtype == torch.float32
    assert tr.cond is None
    for p in points:
        assert tr.features[p].shape == (steps, keep, *FEATURE_SHAPES[p]) and tr.features[p].dtype == dtype
    assert tr.sample_ids.shape == (keep,)
    assert torch.all(tr.sample_ids[1:] > tr.sample_ids[:-1])
    assert torch.all((tr.sample_ids >= 0) & (tr.sample_ids < num_samples))
    if keep >= 2:  # spread over the run
        assert tr.sample_ids[0] == 0 and tr.sample_ids[-1] == num_samples - 1
    if keep:
        assert torch.isfinite(tr.x.float()).all() and torch.isfinite(tr.x0).all()


def test_budget_is_checked_before_the_run(unet):
    obs = Observer()
    with pytest.raises(TraceBudgetError, match="max_bytes"):
        _trace(unet, steps=4, num_samples=3, points=POINTS, max_bytes=1000, observers=[obs])
    assert len(obs.calls) == 1  # only the first model call, which gives the feature shapes


# ----------------------------------------------------------------------------------------------------------------
# Content


def test_timesteps_are_the_ddim_sequence_reversed(recorded):
    tr, _ = recorded
    assert tr.timesteps.tolist() == ddim_timesteps(1000, 5, "linspace")[::-1]
    assert tr.sampler["steps"] == 5 and tr.sampler["seed"] == SEED and tr.sampler["spacing"] == "linspace"


def test_step_0_is_the_seeded_noise(recorded):
    tr, _ = recorded
    assert tr.sample_ids.tolist() == sorted(set(tr.sample_ids.tolist())) and len(tr.sample_ids) == 3
    expected = seeded_noise(SAMPLE_SHAPE, [SEED + int(i) for i in tr.sample_ids])
    assert torch.equal(tr.x[0], expected)


def test_seeded_noise_rows_depend_only_on_their_seed():
    batch = seeded_noise((2, 3), [5, 9, 11])
    assert batch.shape == (3, 2, 3)
    for row, s in zip(batch, [5, 9, 11], strict=True):
        assert torch.equal(row, torch.randn(2, 3, generator=torch.Generator().manual_seed(s)))
    assert torch.equal(seeded_noise((2, 3), [9])[0], batch[1])
    assert not torch.equal(batch[0], batch[1])
    assert seeded_noise((2, 3), []).shape == (0, 2, 3)


def test_features_are_those_of_a_direct_full_forward(unet, recorded):
    tr, _ = recorded
    k = len(tr.sample_ids)
    for step in range(tr.steps):
        t = tr.timesteps[step].expand(k)
        for p in POINTS:
            view = CacheView.full(record=[p])
            with torch.no_grad():
                unet(tr.x[step], t, cache=view)
            # different batch composition (kept rows vs the batches they ran in): float32 ulp-level differences
            assert_close_scaled(tr.features[p][step], view.features[p], 1e-5)


def test_observed_features_are_bitwise_those_of_a_direct_forward_on_the_same_batch(unet, recorded):
    _, obs = recorded
    for c in obs.calls:
        view = CacheView.full(record=POINTS)
        with torch.no_grad():
            unet(c["x"], c["t"], cache=view)
        for p in POINTS:
            assert torch.equal(c["features"][p], view.features[p])


def test_trajectories_are_those_of_a_direct_ddim_run(unet, recorded):
    tr, _ = recorded
    noise = seeded_noise(SAMPLE_SHAPE, [SEED + int(i) for i in tr.sample_ids])
    infos = []
    x0 = ddim(FullPrecision(unet), noise, steps=5, spacing="linspace", callback=infos.append)
    assert_close_scaled(tr.x0, x0, 1e-5)
    for step, info in enumerate(infos):  # the same kept trajectories at every step
        assert info.t == int(tr.timesteps[step])
        assert_close_scaled(tr.x[step], info.x, 1e-5)


def test_results_do_not_depend_on_batch_size(unet, recorded):
    tr, _ = recorded
    for bs in (1, 5):
        other = _trace(unet, steps=5, num_samples=5, keep=3, batch_size=bs, seed=SEED, points=POINTS)
        assert torch.equal(other.sample_ids, tr.sample_ids)
        assert torch.equal(other.timesteps, tr.timesteps)
        for step in range(tr.steps):
            assert_close_scaled(other.x[step], tr.x[step], 1e-5)
            for p in POINTS:
                assert_close_scaled(other.features[p][step], tr.features[p][step], 1e-5)
        assert_close_scaled(other.x0, tr.x0, 1e-5)


def test_float16_storage_holds_the_float32_trajectories_rounded(unet, recorded):
    tr, _ = recorded
    half = _trace(unet, steps=5, num_samples=5, keep=3, batch_size=2, seed=SEED, points=POINTS, dtype=torch.float16)
    assert torch.equal(half.x, tr.x.half())
    for p in POINTS:
        assert torch.equal(half.features[p], tr.features[p].half())
    assert torch.equal(half.x0, tr.x0)  # sampled in float32 either way
    assert half.nbytes < tr.nbytes


def test_seed_changes_the_samples(unet, recorded):
    tr, _ = recorded
    other = _trace(unet, steps=5, num_samples=5, keep=3, batch_size=5, seed=SEED + 100)
    assert (other.x[0] - tr.x[0]).abs().max() > 0.1
    # trajectory i starts from seed + i: shifting the base seed by 2 shifts the kept trajectories by 2 ids
    shifted = _trace(unet, steps=1, num_samples=5, keep=5, batch_size=5, seed=SEED - 2)
    assert torch.equal(shifted.x[0, 2:], seeded_noise(SAMPLE_SHAPE, [SEED, SEED + 1, SEED + 2]))


def test_observers_see_every_batch_and_step(recorded):
    tr, obs = recorded
    batches = [[0, 1], [2, 3], [4]]
    assert len(obs.calls) == len(batches) * tr.steps
    kept = tr.sample_ids.tolist()
    for b, ids in enumerate(batches):
        calls = obs.calls[b * tr.steps : (b + 1) * tr.steps]
        assert [c["step"] for c in calls] == list(range(tr.steps))
        for c in calls:
            step = c["step"]
            assert c["x"].shape == (len(ids), *SAMPLE_SHAPE)
            assert torch.all(c["t"] == tr.timesteps[step]) and c["t"].shape == (len(ids),)
            assert c["cond"] is None
            assert set(c["features"]) == set(POINTS)
            for p in POINTS:
                assert c["features"][p].shape == (len(ids), *FEATURE_SHAPES[p])
            for row, sid in enumerate(ids):  # kept rows are stored, at every step, from the same trajectory
                if sid in kept:
                    j = kept.index(sid)
                    assert torch.equal(tr.x[step, j], c["x"][row])
                    for p in POINTS:
                        assert torch.equal(tr.features[p][step, j], c["features"][p][row])
        if b == 0:
            assert torch.equal(calls[0]["x"], seeded_noise(SAMPLE_SHAPE, [SEED + i for i in ids]))


def test_observers_cover_trajectories_that_are_not_kept(unet):
    obs = Observer()
    tr = _trace(unet, steps=2, num_samples=3, keep=0, batch_size=3, seed=SEED, observers=[obs])
    assert tr.x.shape == (2, 0, *SAMPLE_SHAPE) and tr.nbytes == 0
    assert [c["x"].shape[0] for c in obs.calls] == [3, 3]
    assert torch.equal(obs.calls[0]["x"], seeded_noise(SAMPLE_SHAPE, [SEED, SEED + 1, SEED + 2]))


def test_eta_positive_trace_is_reproducible(unet):
    kw = dict(steps=3, num_samples=2, batch_size=2, eta=1.0)
    a, b = _trace(unet, seed=1, **kw), _trace(unet, seed=1, **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.x0, b.x0)
    assert a.sampler["eta"] == 1.0
    eta0 = _trace(unet, seed=1, **{**kw, "eta": 0.0})
    assert torch.equal(a.x[0], eta0.x[0])  # same initial noise; the sampler's noise enters from step 1 on
    assert (a.x[1] - eta0.x[1]).abs().max() > 1e-3
    assert (a.x0 - eta0.x0).abs().max() > 1e-3
    c = _trace(unet, seed=2, **kw)
    assert (a.x[1] - c.x[1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_cache_point_raises(unet):
    with pytest.raises(ConfigError, match="up.9.block.0"):
        _trace(unet, steps=2, num_samples=1, points=["up.9.block.0"])


def test_keep_larger_than_num_samples_raises(unet):
    with pytest.raises(ConfigError, match="keep"):
        _trace(unet, steps=2, num_samples=2, keep=3)


@pytest.mark.parametrize("kw", [dict(num_samples=0), dict(num_samples=2, batch_size=0), dict(num_samples=2, keep=-1)])
def test_invalid_counts_raise(unet, kw):
    with pytest.raises(ConfigError):
        _trace(unet, steps=2, **kw)


def test_cond_with_wrong_first_dim_raises(unet):
    with pytest.raises(InputShapeError):
        _trace(unet, steps=2, num_samples=3, cond=torch.zeros(2, 4))


def test_trace_needs_a_cq_unet():
    net = torch.nn.Linear(3, 3)
    with pytest.raises(ConfigError):
        trace(net, steps=2, num_samples=1, noise=NoiseSchedule(), progress=False)


def test_plms_trace_records_every_model_call_and_fits_a_recipe(unet):
    from cq.sampling.plms import num_calls, plms

    recorded = trace(
        unet, plms, steps=4, num_samples=2, points=[unet.default_cache_point()], spacing="linspace", progress=False
    )
    assert recorded.steps == num_calls(4) == 5
    from cq.cache import DPS
    from cq.cache.deepcache import DeepCache
    from cq.correct import CacheErrorCorrector
    from cq.fit.recipe import Recipe

    recipe = Recipe(cacher=DeepCache(schedule=DPS(interval=2)), correctors=(CacheErrorCorrector(),))
    model = recipe.fit(unet, recorded, progress=False)
    assert model.num_steps == 5
    out = plms(model, seeded_noise(SAMPLE_SHAPE, range(2)), steps=4, spacing="linspace")
    assert out.shape == (2, *SAMPLE_SHAPE) and bool(torch.isfinite(out).all())
