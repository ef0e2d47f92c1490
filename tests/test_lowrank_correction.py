"""The low-rank cache correction: closed-form fit never worse than DEC's per-channel affine on its
statistics, ordinary least squares at full rank without ridge, identity on exact caches; in a recipe it corrects
shallow calls, saves and loads bit-identically, and refuses bad settings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cq
from cq.cache import UniformSchedule
from cq.cache.deepcache import DeepCache
from cq.calib.trace import seeded_noise
from cq.correct import (
    CacheErrorCorrector,
    CacheErrorLowRank,
    ChannelMoments,
    CrossMoments,
    LowRankAffine,
    affine_fit,
    low_rank_affine_fit,
)
from cq.errors import ConfigError
from cq.fit.recipe import Recipe
from cq.registry import from_dict, to_dict
from cq.sampling import ddim


@st.composite
def mixed_pairs(draw):
    """Paired ``[B, C, H, W]`` float64 tensors where y mixes x's channels, plus noise."""
    b, c, h = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(b, c, h, h, generator=g, dtype=torch.float64) * draw(st.floats(0.1, 10)) + draw(st.floats(-3, 3))
    mix = torch.randn(c, c, generator=g, dtype=torch.float64)
    y = torch.einsum("dc,bchw->bdhw", mix, x) + torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64)
    y = y + draw(st.floats(0, 2)) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, y


def low_rank(x, y, rank, ridge, chunks=1):
    m = CrossMoments(1, x.shape[1])
    for xs, ys in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
        m.update(0, xs, ys)
    module = LowRankAffine(1, x.shape[1], rank).double()
    module.fill(*low_rank_affine_fit(m, rank, ridge))
    return module


def affine_error(x, y):
    m = ChannelMoments(1, x.shape[1])
    m.update(0, x, y)
    a, b = (v[0].double().reshape(1, -1, 1, 1) for v in affine_fit(m))
    return float((a * x + b - y).pow(2).mean())


@given(data=mixed_pairs(), rank=st.integers(1, 6), ridge=st.sampled_from([0.0, 1e-3, 1.0]), chunks=st.integers(1, 3))
def test_low_rank_fit_is_never_worse_than_per_channel_affine(data, rank, ridge, chunks):
    x, y = data
    rank = min(rank, x.shape[1])
    module = low_rank(x, y, rank, ridge, chunks=min(chunks, x.shape[0]))
    error = float((module(x, 0) - y).pow(2).mean())
    assert error <= affine_error(x, y) * (1 + 1e-4) + 1e-6


@given(data=mixed_pairs())
def test_full_rank_without_ridge_is_ordinary_least_squares(data):
    x, y = data
    c = x.shape[1]
    design = torch.cat([x.transpose(0, 1).reshape(c, -1).T, torch.ones(x.numel() // c, 1, dtype=x.dtype)], 1)
    target = y.transpose(0, 1).reshape(c, -1).T
    if torch.linalg.matrix_rank(design) < c + 1:
        return  # under-determined: any of many maps fits
    best = torch.linalg.lstsq(design, target).solution
    lstsq_error = float((design @ best - target).pow(2).mean())
    error = float((low_rank(x, y, c, 0.0)(x, 0) - y).pow(2).mean())
    assert error == pytest.approx(lstsq_error, rel=1e-4, abs=1e-8)


@given(data=mixed_pairs(), rank=st.integers(1, 6))
def test_low_rank_fit_is_identity_when_stale_equals_fresh(data, rank):
    x, _ = data
    module = low_rank(x, x, min(rank, x.shape[1]), 1e-3)
    assert torch.allclose(module(x, 0), x, atol=1e-4 * (1 + float(x.abs().max())))


def test_steps_without_data_are_identity():
    m = CrossMoments(3, 4)
    m.update(1, torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))
    module = LowRankAffine(3, 4, 2)
    module.fill(*low_rank_affine_fit(m, 2, 1e-3))
    assert module.is_identity(0) and module.is_identity(2) and not module.is_identity(1)


# ---------------------------------------------------------------------------------------------------------------
# In a recipe

STEPS = 6


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(unet, steps=STEPS, num_samples=6, points=["up.0.block.2"], spacing="linspace", progress=False)


def recipe(corrector):
    cacher = DeepCache(schedule=UniformSchedule(interval=3), point="up.0.block.2")
    return Recipe(cacher=cacher, correctors=(corrector,))


def test_low_rank_corrects_cached_features_better_than_affine(unet, trace):
    model = recipe(CacheErrorLowRank(rank=4)).fit(unet, trace, progress=False)
    affine = recipe(CacheErrorCorrector()).fit(unet, trace, progress=False)
    feats = trace.features["up.0.block.2"]
    for step, refresh in enumerate(model.cache.mask):
        stale, fresh = feats[model.cache.source[step]], feats[step]
        if refresh:
            assert model.cache.correction.is_identity(step)
            continue
        ours = (model.cache.corrected(stale, step) - fresh).pow(2).mean()
        dec = (affine.cache.corrected(stale, step) - fresh).pow(2).mean()
        assert ours <= dec * (1 + 1e-4) + 1e-9


def test_low_rank_save_load_is_bit_identical(unet, trace, tmp_path):
    model = recipe(CacheErrorLowRank(rank=3, ridge=0.01)).fit(unet, trace, progress=False)
    noise = seeded_noise((1, 16, 16), range(2))
    before = ddim(model, noise, steps=STEPS, spacing="linspace")
    loaded = cq.load(cq.save(model, tmp_path / "m.cq"), unet=unet)
    assert loaded.recipe == model.recipe and loaded.cache.correction.rank == 3
    assert torch.equal(ddim(loaded, noise, steps=STEPS, spacing="linspace"), before)


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"rank": 2.5}, {"rank": True}, {"ridge": -1.0}, {"chunk": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ConfigError, match="CacheErrorLowRank"):
        CacheErrorLowRank(**kwargs)


def test_one_cache_correction_per_recipe():
    with pytest.raises(ConfigError, match="cache.correction"):
        Recipe(
            cacher=DeepCache(schedule=UniformSchedule(interval=3)),
            correctors=(CacheErrorCorrector(), CacheErrorLowRank()),
        )


def test_needs_a_cacher_and_the_traced_point(unet, trace):
    with pytest.raises(ConfigError, match="cacher"):
        CacheErrorLowRank().fit(cq.CompressedUNet(unet, num_steps=STEPS), unet, trace)
    other = cq.CompressedUNet(unet, num_steps=STEPS, cacher=DeepCache(schedule=UniformSchedule(interval=2)))
    with pytest.raises(ConfigError, match="trace features"):
        CacheErrorLowRank().fit(other, unet, trace)


@given(corrector=st.builds(CacheErrorLowRank, rank=st.none() | st.integers(1, 64), ridge=st.floats(0, 10)))
def test_round_trip(corrector):
    assert from_dict(to_dict(corrector)) == corrector
