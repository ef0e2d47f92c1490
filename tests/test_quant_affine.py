"""Uniform affine quantization: error bounds, idempotence, monotonicity, zero, per-channel extrema, search."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cq.errors import ConfigError
from cq.quant.affine import dequantize, fake_quantize, lp_error, qparams, quantize, search_range
from cq.quant.spec import QuantSpec


specs = st.builds(
    QuantSpec,
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
    method=st.sampled_from(["minmax", "percentile", "mse"]),
    percentile=st.floats(0.9, 1.0),
)


@st.composite
def tensors(draw, min_channels=1):
    channels = draw(st.integers(min_channels, 6))
    width = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    loc = draw(st.floats(-5, 5))
    spread = draw(st.floats(1e-3, 50))
    g = torch.Generator().manual_seed(seed)
    return loc + spread * torch.randn(channels, width, generator=g)


def _params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = search_range(x, spec)
    scale, zp = qparams(lo, hi, spec)
    shape = (-1, 1) if spec.per_channel else ()
    return scale.reshape(shape), zp.reshape(shape)


@given(x=tensors(), spec=specs)
def test_error_is_at_most_half_a_step_inside_the_grid(x, spec):
    scale, zp = _params(x, spec)
    lo, hi = (spec.qmin - zp) * scale, (spec.qmax - zp) * scale
    inside = (x >= lo) & (x <= hi)
    err = (x - fake_quantize(x, scale, zp, spec)).abs()
    bound = (scale / 2).expand_as(x) * (1 + 1e-5) + 1e-7
    assert bool((err[inside] <= bound[inside]).all())


@given(x=tensors(), spec=specs)
def test_fake_quantize_is_idempotent(x, spec):
    scale, zp = _params(x, spec)
    once = fake_quantize(x, scale, zp, spec)
    assert torch.equal(fake_quantize(once, scale, zp, spec), once)


@given(x=tensors(), spec=specs)
def test_fake_quantize_is_monotone(x, spec):
    scale, zp = _params(x, spec)
    order = x.argsort(dim=1)
    out = fake_quantize(x, scale, zp, spec).gather(1, order)
    assert bool((out[:, 1:] >= out[:, :-1]).all())


@given(x=tensors(), spec=specs)
def test_zero_is_exactly_representable(x, spec):
    scale, zp = _params(x, spec)
    zero = torch.zeros_like(x)
    assert torch.equal(fake_quantize(zero, scale, zp, spec), zero)
    assert bool((zp == zp.round()).all()) and bool((zp >= spec.qmin).all()) and bool((zp <= spec.qmax).all())


@given(x=tensors(min_channels=2), bits=st.integers(2, 8), symmetric=st.booleans())
def test_per_channel_minmax_covers_each_channel(x, bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric, per_channel=True, method="minmax")
    scale, zp = _params(x, spec)
    assert scale.shape == (x.shape[0], 1)
    # every element, extremes included, is within half a step of the grid: nothing is clipped away
    err = (x - fake_quantize(x, scale, zp, spec)).abs()
    assert bool((err <= (scale / 2) * (1 + 1e-5) + 1e-7).all())
    # each channel's scale follows its own range, not the tensor's
    own = torch.maximum(x.amax(1), torch.zeros(())) - torch.minimum(x.amin(1), torch.zeros(()))
    expected = own / (spec.qmax - spec.qmin) if not symmetric else torch.maximum(x.amax(1), -x.amin(1)) / spec.qmax
    assert torch.allclose(scale.flatten(), expected.clamp_min(1e-12), rtol=1e-5)


@given(
    x=tensors(),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
    p=st.sampled_from([2.0, 2.4, 3.0]),
)
def test_mse_search_is_never_worse_than_minmax(x, bits, symmetric, per_channel, p):
    mse = QuantSpec(bits=bits, symmetric=symmetric, per_channel=per_channel, method="mse", p=p)
    minmax = QuantSpec(bits=bits, symmetric=symmetric, per_channel=per_channel, method="minmax", p=p)
    err_mse = lp_error(x, *search_range(x, mse), mse)
    err_minmax = lp_error(x, *search_range(x, minmax), mse)
    assert bool((err_mse <= err_minmax).all())


def test_mse_search_clips_outliers():
    x = torch.cat([torch.randn(10_000), torch.tensor([80.0])])  # one huge outlier
    spec = QuantSpec(bits=4, method="mse")
    lo, hi = search_range(x, spec)
    assert hi < 80.0 * 0.9  # the search shrinks the range ...
    assert lp_error(x, lo, hi, spec) < lp_error(x, x.min(), x.max(), spec)  # ... and lowers the error


def test_quantize_dequantize_round_trip_on_the_grid():
    spec = QuantSpec(bits=8)
    scale, zp = torch.tensor(0.5), torch.tensor(10.0)
    q = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32)
    assert torch.equal(quantize(dequantize(q, scale, zp), scale, zp, spec), q)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_invalid_bit_widths_raise(bits):
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"method": "kl"}, "method"), ({"percentile": 0.3}, "percentile"), ({"p": 0}, "p")]
)
def test_invalid_spec_fields_raise(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        QuantSpec(**kwargs)


@given(bits=st.integers(2, 8))
def test_grid_bounds(bits):
    assert QuantSpec(bits=bits).qmin == 0 and QuantSpec(bits=bits).qmax == 2**bits - 1
    sym = QuantSpec(bits=bits, symmetric=True)
    assert sym.qmin == -sym.qmax and sym.qmax == 2 ** (bits - 1) - 1


@given(x=tensors(), bits=st.integers(2, 8), symmetric=st.booleans())
def test_one_pass_search_equals_the_candidate_loop(x, bits, symmetric):
    flat = x.reshape(-1)
    per_tensor = QuantSpec(bits=bits, symmetric=symmetric, method="mse")
    one_channel = QuantSpec(bits=bits, symmetric=symmetric, per_channel=True, method="mse")  # runs the loop
    lo, hi = search_range(flat, per_tensor)
    lo_loop, hi_loop = search_range(flat[None, :], one_channel)
    assert torch.allclose(lo, lo_loop[0]) and torch.allclose(hi, hi_loop[0])


@given(
    seed=st.integers(0, 10**6),
    dist=st.sampled_from(["normal", "laplace", "student"]),
    bits=st.sampled_from([4, 6, 8]),
)
def test_the_sampled_range_search_is_nearly_as_good_as_the_full_one(seed, dist, bits):
    """Calibration searches a weighted sample of a large activation (exact tails + strided middle);
    on the whole tensor its L_p error stays within 5% of the full search's optimum (the strided sample plus the
    two extremes over-weighted them: up to 3.9x the optimum on Student-t data at 4 bits)."""
    from cq.quant.calibrate import SEARCH_ELEMENTS, TAIL_ELEMENTS, _weighted_sample

    torch.manual_seed(seed)
    n = SEARCH_ELEMENTS * 32
    if dist == "normal":
        x = torch.randn(n)
    elif dist == "laplace":
        x = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    else:
        x = torch.distributions.StudentT(4.0).sample((n,))
    spec = QuantSpec(bits=bits, per_step=True)
    best = lp_error(x, *search_range(x, spec), spec)
    values, weights = _weighted_sample(x)
    assert values.numel() <= SEARCH_ELEMENTS + 2 * TAIL_ELEMENTS and abs(float(weights.sum()) - 1) < 1e-4
    assert values.min() == x.min() and values.max() == x.max()
    sampled = lp_error(x, *search_range(values, spec, weights=weights), spec)
    assert float(sampled) <= 1.05 * float(best)


def test_weighted_search_refuses_mismatched_weights():
    x = torch.randn(100)
    with pytest.raises(ConfigError, match="weights"):
        search_range(x, QuantSpec(bits=8), weights=torch.ones(99))
    with pytest.raises(ConfigError, match="per_channel"):
        search_range(x.reshape(4, 25), QuantSpec(bits=8, per_channel=True), weights=torch.ones(4, 25))
