"""GPTQ weight rounding (`cq.quant.gptq`): the algorithm's invariants and its effect on a fitted UNet."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cq
from cq.cache import UniformSchedule
from cq.cache.deepcache import DeepCache
from cq.core.step import step_scope
from cq.errors import ConfigError
from cq.quant import QConv2d, UniformQuantizer
from cq.quant.affine import qparams, search_range
from cq.quant.gptq import gptq_round
from cq.quant.spec import QuantSpec
from cq.registry import from_dict, to_dict


STEPS = 6


def _grid(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, QuantSpec]:
    spec = QuantSpec(bits=bits, per_channel=True)
    scale, zp = qparams(*search_range(weight, spec), spec)
    return scale[:, None].expand_as(weight), zp[:, None].expand_as(weight), spec


def _nearest(weight, scale, zp, spec):
    return (torch.round(weight.double() / scale.double()) + zp.double()).clamp(spec.qmin, spec.qmax)


def _output_error(weight, codes, scale, zp, x):
    return float((((codes - zp.double()) * scale.double() - weight.double()) @ x.double().T).square().mean())


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 12), d=st.integers(1, 40), bits=st.sampled_from([3, 4, 8]), c=st.floats(0.01, 100))
def test_uncorrelated_inputs_give_round_to_nearest(out, d, bits, c):
    """With H = c I no column's error is worth moving onto another: GPTQ is exactly round-to-nearest."""
    w = torch.randn(out, d, generator=torch.Generator().manual_seed(out * 100 + d))
    scale, zp, spec = _grid(w, bits)
    codes = gptq_round(w, c * torch.eye(d), scale, zp, spec.qmin, spec.qmax)
    assert torch.equal(codes, _nearest(w, scale, zp, spec))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([3, 4]), d=st.integers(16, 64))
def test_codes_stay_on_the_grid_and_correlated_output_error_drops(seed, bits, d):
    """On correlated inputs the output error |(W - Q) x|² falls well below round-to-nearest's (GPTQ's purpose),
    and every code is an integer inside [qmin, qmax]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, d, generator=g)
    mix = torch.randn(d, d, generator=g) + 2 * torch.eye(d)
    x = torch.randn(4 * d, d, generator=g) @ mix  # correlated input columns
    scale, zp, spec = _grid(w, bits)
    codes = gptq_round(w, x.double().T @ x.double() / x.shape[0], scale, zp, spec.qmin, spec.qmax)
    assert torch.equal(codes, codes.round()) and codes.min() >= spec.qmin and codes.max() <= spec.qmax
    nearest = _nearest(w, scale, zp, spec)
    assert _output_error(w, codes, scale, zp, x) < 0.9 * _output_error(w, nearest, scale, zp, x)  # seen: <= 0.72


def test_dead_input_columns_are_rounded_to_nearest():
    w = torch.randn(4, 6)
    h = torch.eye(6)
    h[2, 2] = 0.0  # an input the calibration never excites
    scale, zp, spec = _grid(w, 4)
    codes = gptq_round(w, h, scale, zp, spec.qmin, spec.qmax)
    assert torch.isfinite(codes).all() and torch.equal(codes[:, 2], _nearest(w, scale, zp, spec)[:, 2])


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(
        unet, steps=STEPS, num_samples=8, points=[unet.default_cache_point()], spacing="linspace", progress=False
    )


@pytest.fixture(scope="module")
def cacher(unet, trace):
    return DeepCache(schedule=UniformSchedule(interval=3)).fit(unet, trace)


def _quantize(unet, trace, cacher, rounding):
    q = UniformQuantizer(weight_bits=4, weight_rounding=rounding, refresh_samples=8, cached_samples=4)
    return q.quantize(unet, trace, cacher=cacher, progress=False)


def test_gptq_keeps_storage_and_lowers_each_layers_output_error(unet, trace, cacher):
    """Same scales, zero points and state-dict keys as round-to-nearest (so artifacts and int8 kernels are
    unchanged), other codes, and a lower error of the whole W4A8 UNet on held-out inputs."""
    nearest, gptq = _quantize(unet, trace, cacher, "nearest"), _quantize(unet, trace, cacher, "gptq")
    sn, sg = nearest.state_dict(), gptq.state_dict()
    assert sn.keys() == sg.keys()
    assert all(torch.equal(sn[k], sg[k]) for k in sn if k.endswith(("weight_scale", "weight_zero_point")))
    changed = [k for k in sn if k.endswith("weight_q") and not torch.equal(sn[k], sg[k])]
    assert len(changed) > 10
    held_out = cq.trace(unet, steps=STEPS, num_samples=4, seed=777, spacing="linspace", progress=False)
    err = {"nearest": 0.0, "gptq": 0.0}
    with torch.no_grad():
        for step in range(STEPS):
            x, t = held_out.x[step], held_out.timesteps[step].expand(4)
            ref = unet(x, t)
            with step_scope(step):
                err["nearest"] += float((nearest(x, t) - ref).square().mean())
                err["gptq"] += float((gptq(x, t) - ref).square().mean())
    assert err["gptq"] < 0.7 * err["nearest"], err


def test_auto_rounds_with_gptq_below_8_bits_only():
    assert UniformQuantizer(weight_bits=4).uses_gptq() and not UniformQuantizer().uses_gptq()
    assert UniformQuantizer(weight_rounding="gptq").uses_gptq()
    assert not UniformQuantizer(weight_bits=4, weight_rounding="nearest").uses_gptq()


def test_quantizers_saved_before_version_4_keep_round_to_nearest():
    data = to_dict(UniformQuantizer(weight_bits=4))
    data.pop("weight_rounding")
    data["version"] = 3
    assert from_dict(data).weight_rounding == "nearest"
    assert from_dict(to_dict(UniformQuantizer(weight_bits=4))).weight_rounding == "auto"


def test_round_weights_refuses_a_calibrated_model(unet, trace, cacher):
    q = UniformQuantizer(weight_bits=4, refresh_samples=8, cached_samples=4)
    model = q.quantize(unet, trace, cacher=cacher, progress=False)
    assert any(isinstance(m, QConv2d) for m in model.modules())
    with pytest.raises(ConfigError, match="before calibration"):
        q.round_weights(model, unet, trace, cacher=cacher, progress=False)
