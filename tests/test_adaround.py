"""AdaRound weight rounding (``weight_rounding="adaround"``, `cq.quant.adaround`): learned codes are the floor or
the ceiling of w / s, never worse than nearest on the calibration inputs, and saved bit-exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cq
from cq.errors import ConfigError
from cq.fit.recipe import Recipe
from cq.quant import PTQ4DM, UniformQuantizer
from cq.quant.adaround import adaround_round, rectified_sigmoid
from cq.quant.modules import QuantizedWeight


def _problem(seed: int, out: int, d: int, bits: int, correlated: bool):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, d, generator=g)
    qmin, qmax = 0, 2**bits - 1
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
    zp = torch.round(-lo / scale).clamp(qmin, qmax)
    if correlated:
        x = torch.randn(64, d, generator=g) @ torch.randn(d, d, generator=g)
        h = x.T @ x / x.shape[0]
    else:
        h = torch.eye(d)
    return w, h, scale.expand(out, d), zp.expand(out, d), qmin, qmax


def _error(w, codes, h, s, z):
    e = (w - (codes - z) * s).double()
    return float(((e @ h.double()) * e).sum())


@settings(max_examples=15, deadline=None)
@given(
    st.integers(0, 2**16),
    st.integers(1, 6),
    st.integers(1, 12),
    st.sampled_from([2, 3, 4]),
    st.booleans(),
    st.sampled_from([0.0, 0.01, 1.0]),
)
def test_learned_codes_are_floor_or_ceil_and_never_worse_than_nearest(seed, out, d, bits, correlated, reg):
    w, h, s, z, qmin, qmax = _problem(seed, out, d, bits, correlated)
    codes = adaround_round(w, h, s, z, qmin, qmax, iterations=60, regularisation=reg)
    assert codes.shape == w.shape and torch.equal(codes, codes.round())
    floor = (torch.floor(w / s) + z).clamp(qmin, qmax)
    ceil = (torch.floor(w / s) + 1 + z).clamp(qmin, qmax)
    assert bool(((codes == floor) | (codes == ceil)).all())
    nearest = (torch.round(w / s) + z).clamp(qmin, qmax)
    assert _error(w, codes, h, s, z) <= _error(w, nearest, h, s, z) * (1 + 1e-6) + 1e-9


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 5), st.integers(1, 10))
def test_zero_regularisation_and_identity_data_recover_nearest(seed, out, d):
    w, h, s, z, qmin, qmax = _problem(seed, out, d, 4, correlated=False)
    codes = adaround_round(w, h, s, z, qmin, qmax, iterations=40, regularisation=0.0)
    nearest = (torch.round(w / s) + z).clamp(qmin, qmax)
    assert _error(w, codes, h, s, z) <= _error(w, nearest, h, s, z) * (1 + 1e-6) + 1e-9


def test_correlated_inputs_beat_nearest():
    w, h, s, z, qmin, qmax = _problem(3, 16, 24, 3, correlated=True)
    codes = adaround_round(w, h, s, z, qmin, qmax, iterations=300)
    nearest = (torch.round(w / s) + z).clamp(qmin, qmax)
    assert _error(w, codes, h, s, z) < 0.9 * _error(w, nearest, h, s, z)


@given(st.floats(-50, 50, allow_nan=False))
def test_the_rectified_sigmoid_covers_0_to_1(v):
    h = float(rectified_sigmoid(torch.tensor(v)))
    assert 0.0 <= h <= 1.0
    if abs(v) > 1e-3:  # the learned code rounds up where V >= 0: where h(V) passes 1/2
        assert (h > 0.5) == (v > 0)


def test_bad_names_and_8_bit_reconstruction_are_refused():
    with pytest.raises(ConfigError, match="must be one of"):
        UniformQuantizer(weight_bits=4, weight_rounding="adaroud")
    with pytest.raises(ConfigError, match="no-op.*weight_bits=4"):
        UniformQuantizer(weight_rounding="adaround")
    with pytest.raises(ConfigError, match="no-op"):
        PTQ4DM(weight_rounding="adaround")
    assert UniformQuantizer(weight_bits=4, weight_rounding="adaround").rounding() == "adaround"
    assert UniformQuantizer(weight_bits=4).rounding() == "gptq" and UniformQuantizer().rounding() == "nearest"


@pytest.fixture(scope="module")
def fitted(unet):
    from cq.quant import adaround

    full, adaround.ITERATIONS = adaround.ITERATIONS, 40  # the test model's fit in seconds, not minutes
    try:
        yield _fit(unet)
    finally:
        adaround.ITERATIONS = full


def _fit(unet):
    trace = cq.trace(unet, steps=4, num_samples=4, seed=600, progress=False)
    models = {}
    for rounding in ("nearest", "adaround"):
        recipe = Recipe(quantizer=UniformQuantizer(weight_bits=4, weight_rounding=rounding))
        models[rounding] = recipe.fit(unet, trace, progress=False)
    return models


def _codes(model):
    return {n: m.weight_q.clone() for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}


def test_a_fit_learns_codes_within_one_step_of_nearest(fitted):
    nearest, learned = _codes(fitted["nearest"]), _codes(fitted["adaround"])
    assert nearest.keys() == learned.keys()
    moved = 0
    for name, q in learned.items():
        diff = (q.long() - nearest[name].long()).abs()
        assert int(diff.max()) <= 1, name
        moved += int(diff.sum())
    assert moved > 0  # it did re-round


def test_save_and_load_keep_the_learned_codes_bit_exact(fitted, tmp_path):
    model = fitted["adaround"]
    loaded = cq.load(cq.save(model, tmp_path / "ada.cq"))
    assert loaded.recipe.quantizer.weight_rounding == "adaround"
    a, b = _codes(model), _codes(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_an_interruption_keeps_the_finished_layers(unet, monkeypatch):
    from cq.quant import quantizer as qmod

    calls = {"n": 0}
    real = qmod.adaround_round

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, iterations=5, **kwargs)

    monkeypatch.setattr(qmod, "adaround_round", flaky)
    trace = cq.trace(unet, steps=4, num_samples=2, seed=650, progress=False)
    q = UniformQuantizer(weight_bits=4, weight_rounding="adaround")
    model = q.prepare(unet, trace.steps)
    with pytest.warns(UserWarning, match="interrupted: 2 of"):
        done = q.round_weights(model, unet, trace, progress=False)
    assert len(done) == 2


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 16), st.integers(1, 40))
def test_the_loss_factor_keeps_the_input_energy(seed, d, rows):
    from cq.quant.adaround import input_factor

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    h = x.T @ x / rows
    f = input_factor(h, energy=1.0).double()
    assert f.shape[0] == d and f.shape[1] <= d
    assert torch.allclose(f @ f.T, h, atol=1e-5 * float(h.diagonal().sum()) + 1e-9)
    e = torch.randn(3, d, generator=g, dtype=torch.float64)
    kept = input_factor(h, energy=0.9).double()
    exact = float(((e @ h) * e).sum())
    assert float((e @ kept).pow(2).sum()) <= exact * (1 + 1e-5) + 1e-9  # a truncation only drops energy
