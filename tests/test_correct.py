"""DEC: the affine fit is per-channel least squares, identity on exact caches, never worse on its data;
the quantization correction's fold is exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cq
from cq.cache import CacheView, UniformSchedule
from cq.cache.deepcache import DeepCache
from cq.compressed import CompressedUNet
from cq.core.step import step_scope
from cq.correct import CacheErrorCorrector, ChannelAffine, ChannelMoments, QuantErrorCorrector, affine_fit
from cq.errors import ConfigError
from cq.quant import UniformQuantizer
from cq.registry import CORRECTORS, from_dict, to_dict


@st.composite
def pairs(draw):
    """Paired ``[B, C, H, W]`` tensors where y depends on x per channel, plus noise."""
    b, c, h = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(b, c, h, h, generator=g, dtype=torch.float64) * draw(st.floats(0.1, 10)) + draw(st.floats(-3, 3))
    slope = torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64)
    y = slope * x + torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64)
    y = y + draw(st.floats(0, 2)) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, y


def fit(x: torch.Tensor, y: torch.Tensor, chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    m = ChannelMoments(1, x.shape[1])
    for xs, ys in zip(x.chunk(chunks), y.chunk(chunks), strict=True):  # streamed in pieces
        m.update(0, xs, ys)
    a, b = affine_fit(m)
    return a[0].double(), b[0].double()


@given(data=pairs(), chunks=st.integers(1, 3))
def test_affine_fit_equals_per_channel_lstsq(data, chunks):
    x, y = data
    a, b = fit(x, y, chunks=min(chunks, x.shape[0]))
    for c in range(x.shape[1]):
        xc, yc = x[:, c].reshape(-1), y[:, c].reshape(-1)
        if float(xc.var(unbiased=False)) < 1e-9:
            continue  # a constant x: any slope fits
        design = torch.stack([xc, torch.ones_like(xc)], dim=1)
        sol = torch.linalg.lstsq(design, yc[:, None]).solution.flatten()
        assert float(a[c]) == pytest.approx(float(sol[0]), rel=1e-4, abs=1e-5)
        assert float(b[c]) == pytest.approx(float(sol[1]), rel=1e-4, abs=1e-4 * (1 + float(yc.abs().max())))


@given(data=pairs())
def test_affine_fit_is_identity_when_x_equals_y(data):
    x, _ = data
    a, b = fit(x, x)
    varying = x.transpose(0, 1).reshape(x.shape[1], -1).var(1, unbiased=False) > 1e-9
    assert torch.allclose(a[varying], torch.ones_like(a[varying]), atol=1e-5)
    assert torch.allclose(b, torch.zeros_like(b), atol=1e-4 * (1 + float(x.abs().max())))


@given(data=pairs())
def test_affine_fit_never_increases_mse_on_its_data(data):
    x, y = data
    a, b = fit(x, y)
    corrected = a.reshape(1, -1, 1, 1) * x + b.reshape(1, -1, 1, 1)
    before = (x - y).pow(2).mean(dim=(0, 2, 3))
    after = (corrected - y).pow(2).mean(dim=(0, 2, 3))
    assert bool((after <= before * (1 + 1e-5) + 1e-9).all())


def test_affine_fit_defaults_for_missing_and_constant_data():
    m = ChannelMoments(3, 2)
    x = torch.full((2, 2, 3, 3), 4.0)
    y = torch.full((2, 2, 3, 3), 6.0)
    m.update(1, x, y)
    a, b = affine_fit(m)
    assert torch.equal(a[0], torch.ones(2)) and torch.equal(b[0], torch.zeros(2))  # no data: identity
    assert torch.allclose(a[1], torch.ones(2)) and torch.allclose(b[1], torch.full((2,), 2.0))  # constant x


def test_channel_affine_applies_the_step_row():
    corr = ChannelAffine(3, 2)
    corr.gain[1] = torch.tensor([2.0, -1.0])
    corr.offset[1] = torch.tensor([0.5, 1.0])
    h = torch.ones(1, 2, 2, 2)
    out = corr(h, 1)
    assert torch.equal(out[:, 0], torch.full((1, 2, 2), 2.5)) and torch.equal(out[:, 1], torch.zeros(1, 2, 2))
    assert torch.equal(corr(h, 0), h) and corr.is_identity(0) and not corr.is_identity(1)


# ---------------------------------------------------------------------------------------------------------------
# On a UNet


STEPS = 6


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(
        unet, steps=STEPS, num_samples=8, points=[unet.default_cache_point()], spacing="linspace", progress=False
    )


@pytest.fixture(scope="module")
def cacher(unet, trace):
    return DeepCache(schedule=UniformSchedule(interval=3)).fit(unet, trace)


def test_cache_correction_is_identity_at_refresh_steps_and_reduces_error(unet, trace, cacher):
    model = CompressedUNet(unet, num_steps=STEPS, cacher=cacher)
    CacheErrorCorrector().fit(model, unet, trace)
    corr = model.cache.correction
    point = cacher.point
    feats = trace.features[point]
    for step, refresh in enumerate(cacher.schedule.refresh_mask(STEPS)):
        if refresh:
            assert corr.is_identity(step)
            continue
        stale, fresh = feats[model.cache.source[step]], feats[step]
        before = (stale - fresh).pow(2).mean()
        after = (corr(stale, step) - fresh).pow(2).mean()
        assert after <= before + 1e-7


def test_cache_correction_is_applied_to_shallow_calls(unet, trace, cacher):
    model = CompressedUNet(unet, num_steps=STEPS, cacher=cacher)
    CacheErrorCorrector().fit(model, unet, trace)
    assert not model.cache.mask[1]
    model(trace.x[0, :2], trace.timesteps[0].expand(2), step=0)
    raw = model.cache.read(1, 2)
    x, t = trace.x[1, :2], trace.timesteps[1].expand(2)
    out = model(x, t, step=1)
    point = model.cache.point
    assert torch.equal(out, unet(x, t, cache=CacheView.shallow(point, model.cache.correction(raw, 1))))
    assert not torch.equal(out, unet(x, t, cache=CacheView.shallow(point, raw)))


@pytest.fixture(scope="module")
def quantized_model(unet, trace, cacher):
    qunet = UniformQuantizer(refresh_samples=8, cached_samples=4).quantize(unet, trace, cacher=cacher, progress=False)
    return CompressedUNet(qunet, num_steps=STEPS, cacher=cacher)


def test_quant_correction_fold_is_exact(unet, trace, quantized_model):
    model = quantized_model
    QuantErrorCorrector(samples=4).fit(model, unet, trace)
    targets = QuantErrorCorrector().targets(model)
    assert set(targets) == {
        f"{model.unet.cache_consumer(model.cache.point)}.conv1",
        f"{model.unet.cache_consumer(model.cache.point)}.nin_shortcut",
    }
    for name, conv in targets.items():
        c = conv.split
        x = torch.randn(2, conv.in_channels, 16, 16)
        for step in range(STEPS):
            with step_scope(step):
                out = conv(x)
                xq = conv.quantize_input(x)
            w = conv.dequantized_weight()
            args = (conv.stride, conv.padding, conv.dilation, conv.groups)
            cached = torch.nn.functional.conv2d(xq[:, :c], w[:, :c], conv.bias, *args)
            skip = torch.nn.functional.conv2d(xq[:, c:], w[:, c:], None, *args)
            a = conv.correction.gain[step].reshape(1, -1, 1, 1)
            b = conv.correction.offset[step].reshape(1, -1, 1, 1)
            assert torch.allclose(out, a * cached + b + skip, atol=1e-5, rtol=1e-5), name
            folded = torch.nn.functional.conv2d(
                xq[:, :c], a.reshape(-1, 1, 1, 1) * w[:, :c], a.flatten() * conv.bias + b.flatten(), *args
            )
            assert torch.allclose(out, folded + skip, atol=1e-4, rtol=1e-5), name  # a*W and a*bias + b


@pytest.mark.parametrize("deep_features", ["full_precision", "quantized"])
def test_quant_correction_reduces_the_cached_half_error(unet, trace, cacher, deep_features):
    """On its fitting data the corrected cached-half output is closer to full precision than the uncorrected."""
    qunet = UniformQuantizer(weight_bits=4, refresh_samples=8, cached_samples=8).quantize(
        unet, trace, cacher=cacher, progress=False
    )
    model = CompressedUNet(qunet, num_steps=STEPS, cacher=cacher)
    corrector = QuantErrorCorrector(samples=8, deep_features=deep_features)
    name, conv = next(iter(corrector.targets(model).items()))
    ref_conv = unet.get_submodule(name)
    captured = {}
    handle = conv.register_forward_pre_hook(lambda m, a: captured.__setitem__(cq.core.step.current_step(), a[0]))
    try:
        from cq.calib.replay import CalibrationBatch, every_step, replay

        batches = every_step(model.cache.mask, model.cache.source, 8, 8)
        if deep_features == "full_precision":  # refresh steps read their own full-precision feature
            batches = [CalibrationBatch(b.step, b.rows, b.step if b.source is None else b.source) for b in batches]
        replay(qunet, trace, batches, cache=model.cache)
    finally:
        handle.remove()
    corrector.fit(model, unet, trace)
    c = conv.split
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    for step, x in captured.items():
        y = torch.nn.functional.conv2d(x[:, :c], ref_conv.weight[:, :c], conv.bias, *args)
        with step_scope(step):
            xq = conv.act(x[:, :c])
        plain = torch.nn.functional.conv2d(xq, conv.dequantized_weight()[:, :c], conv.bias, *args)
        corrected = conv.correction(plain, step)
        assert (corrected - y).pow(2).mean() <= (plain - y).pow(2).mean() * (1 + 1e-5)


def test_quant_correction_feeds_full_precision_deep_features_by_default(unet, trace, quantized_model, monkeypatch):
    """As the reference (error_dec/*_dec.py), every step's tail input during the fit comes from the
    trace's full-precision feature -- shallow calls only, refresh steps on their own feature; version-1 files keep
    the quantized deep features they were fitted with."""
    import cq.correct.quant_error as module

    seen = []
    real = module.replay
    monkeypatch.setattr(
        module, "replay", lambda u, t, batches, **kw: seen.extend(batches) or real(u, t, batches, **kw)
    )
    QuantErrorCorrector(samples=2).fit(quantized_model, unet, trace)
    mask, source = quantized_model.cache.mask, quantized_model.cache.source
    assert [(b.step, b.source) for b in seen] == [(i, i if r else source[i]) for i, r in enumerate(mask)]
    seen.clear()
    QuantErrorCorrector(samples=2, deep_features="quantized").fit(quantized_model, unet, trace)
    assert [b.source for b in seen] == [None if r else source[i] for i, r in enumerate(mask)]
    old = from_dict({"kind": "corrector", "type": "quant_error", "version": 1, "samples": 4})
    assert old.deep_features == "quantized" and QuantErrorCorrector().deep_features == "full_precision"
    with pytest.raises(ConfigError, match="deep_features"):
        QuantErrorCorrector(deep_features="fp")


def test_correctors_need_the_right_model(unet, trace):
    plain = CompressedUNet(unet, num_steps=STEPS)
    with pytest.raises(ConfigError, match="cacher"):
        CacheErrorCorrector().fit(plain, unet, trace)
    cached = CompressedUNet(unet, num_steps=STEPS, cacher=DeepCache(schedule=UniformSchedule(interval=2)))
    with pytest.raises(ConfigError, match="quantize"):
        QuantErrorCorrector().fit(cached, unet, trace)


@given(
    corrector=st.one_of(
        st.builds(CacheErrorCorrector, chunk=st.integers(1, 64)),
        st.builds(QuantErrorCorrector, samples=st.integers(1, 64)),
    )
)
def test_correctors_round_trip(corrector):
    assert from_dict(to_dict(corrector)) == corrector


def test_registered_correctors():
    assert set(CORRECTORS.names()) >= {"cache_error", "quant_error"}
