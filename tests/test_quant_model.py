"""Quantizing a UNet: module replacement, per-step tables, calibration on the cached model, state dicts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import cq
from cq.cache import UniformSchedule
from cq.cache.deepcache import DeepCache
from cq.calib.trace import seeded_noise
from cq.compressed import CompressedUNet
from cq.core.step import step_scope
from cq.errors import ConfigError, StepNotSetError
from cq.metrics.error import sqnr
from cq.models.layers import MatMul
from cq.quant import PTQ4DM, ActQuantizer, QConv2d, QLinear, QMatMul, UniformQuantizer, quantized_modules
from cq.quant.calibrate import observe
from cq.quant.ptq4dm import ndtc_steps
from cq.quant.spec import QuantSpec
from cq.registry import QUANTIZERS, from_dict, to_dict
from cq.sampling import FullPrecision, ddim


STEPS = 6


@pytest.fixture(scope="module")
def trace(unet):
    return cq.trace(
        unet, steps=STEPS, num_samples=8, points=[unet.default_cache_point()], spacing="linspace", progress=False
    )


@pytest.fixture(scope="module")
def cacher(unet, trace):
    return DeepCache(schedule=UniformSchedule(interval=3)).fit(unet, trace)


@pytest.fixture(scope="module")
def w8a8(unet, trace, cacher):
    return UniformQuantizer(refresh_samples=8, cached_samples=4).quantize(unet, trace, cacher=cacher, progress=False)


def _float_ops(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear, MatMul)]


def test_every_conv_linear_and_matmul_but_the_io_layers_is_replaced(unet, w8a8):
    replaced = quantized_modules(w8a8)
    assert set(replaced) == set(_float_ops(unet)) - set(unet.io_layers())
    assert _float_ops(w8a8) == list(unet.io_layers())  # the input and output layers stay float (float_io)
    everything = UniformQuantizer(float_io=False).prepare(unet, STEPS)
    assert set(quantized_modules(everything)) == set(_float_ops(unet)) and _float_ops(everything) == []
    kinds = {type(unet.get_submodule(n)): k for n, k in replaced.items()}
    assert kinds == {nn.Conv2d: "QConv2d", nn.Linear: "QLinear", MatMul: "QMatMul"}
    assert "QConv2d" in repr(w8a8) and "per-step" in repr(w8a8)  # the module tree shows what was quantized


def test_input_unet_is_untouched(unet, w8a8):
    assert _float_ops(unet) and not quantized_modules(unet)


def test_skip_and_include_patterns(unet, trace):
    q = UniformQuantizer(skip=("*attn*", "temb.*")).prepare(unet, STEPS)
    names = quantized_modules(q)
    assert not any("attn" in n or n.startswith("temb.") for n in names)
    assert isinstance(q.get_submodule("mid.attn_1.q"), nn.Conv2d)
    only = UniformQuantizer(include=("conv_in",), float_io=False).prepare(unet, STEPS)
    assert list(quantized_modules(only)) == ["conv_in"]
    with pytest.raises(ConfigError, match="select no module"):  # the io layers are float by default
        UniformQuantizer(include=("conv_in",)).prepare(unet, STEPS)
    with pytest.raises(ConfigError, match="select no module"):
        UniformQuantizer(include=("nothing*",)).prepare(unet, STEPS)


def test_concat_inputs_get_split_quantizers(unet, w8a8):
    for name, channels in unet.concat_splits().items():
        module = w8a8.get_submodule(name)
        assert isinstance(module, QConv2d) and module.split == channels and module.act_skip is not None
    assert w8a8.get_submodule("up.1.block.0.conv2").act_skip is None


def test_first_and_last_layers_stay_8bit_by_name(unet, trace, cacher):
    q = UniformQuantizer(weight_bits=4, refresh_samples=4, cached_samples=2, float_io=False).prepare(unet, STEPS)
    assert q.conv_in.weight.spec.bits == 8 and q.conv_out.weight.spec.bits == 8
    assert q.get_submodule("up.0.block.0.conv1").weight.spec.bits == 4
    assert int(q.get_submodule("up.0.block.0.conv1").weight.weight_q.max()) <= 15


def test_no_observer_or_hook_is_left_after_convert(w8a8):
    for module in w8a8.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert type(module).__name__ != "RangeTables"
    assert all(bool(q.calibrated.all()) for q in w8a8.modules() if isinstance(q, ActQuantizer))


def test_observe_removes_its_hooks_even_on_error(unet):
    q = UniformQuantizer().prepare(unet, STEPS)
    with pytest.raises(RuntimeError, match="boom"), observe(q):
        raise RuntimeError("boom")
    assert not any(m._forward_pre_hooks for m in q.modules())


def test_calibration_runs_the_cached_model(unet, trace, cacher):
    """Deep layers are observed only at refresh steps (the shallow path skips them), tail layers at every step."""
    q = UniformQuantizer(refresh_samples=4, cached_samples=2, float_io=False).prepare(unet, STEPS)
    tables = UniformQuantizer(refresh_samples=4, cached_samples=2).calibrate(q, trace, cacher=cacher, progress=False)
    mask = torch.tensor(cacher.schedule.refresh_mask(STEPS))
    assert torch.equal(tables.seen["mid.block_1.conv1.act"], mask)
    assert bool(tables.seen["conv_out.act"].all()) and bool(tables.seen["conv_in.act"].all())
    assert tables.unobserved == []


def test_per_step_tables_differ_between_steps(w8a8):
    scales = w8a8.get_submodule("up.0.block.2.conv2").act.scale
    assert scales.shape == (STEPS,) and len(set(scales.tolist())) > 1


def test_unset_step_raises(w8a8, trace):
    x, t = trace.x[0, :2], trace.timesteps[0].expand(2)
    with pytest.raises(StepNotSetError), torch.no_grad():
        w8a8(x, t)


@given(step=st.integers(0, STEPS - 1))
def test_same_step_gives_the_same_output(w8a8, trace, step):
    x, t = trace.x[step, :2], trace.timesteps[step].expand(2)
    with torch.no_grad(), step_scope(step):
        a, b = w8a8(x, t), w8a8(x, t)
    assert torch.equal(a, b)


def test_step_selects_the_table(w8a8, trace):
    x, t = trace.x[2, :2], trace.timesteps[2].expand(2)
    with torch.no_grad():
        outs = []
        for step in (2, 4):
            with step_scope(step):
                outs.append(w8a8(x, t))
    assert not torch.equal(*outs)  # same input, another step's scales


def test_quantized_state_dict_round_trips(unet, trace, w8a8):
    state = w8a8.state_dict()
    assert state["up.0.block.0.conv1.weight.weight_q"].dtype == torch.uint8
    float_convs = {k for k, v in state.items() if k.endswith(".weight") and v.is_floating_point() and v.ndim == 4}
    assert float_convs == {"conv_in.weight", "conv_out.weight"}  # only the io layers keep float weights
    fresh = UniformQuantizer().prepare(unet, STEPS)  # weights quantized from the float model, tables uncalibrated
    fresh.load_state_dict(state)
    x, t = trace.x[1, :3], trace.timesteps[1].expand(3)
    with torch.no_grad(), step_scope(1):
        assert torch.equal(fresh(x, t), w8a8(x, t))


def test_w8a8_is_close_to_full_precision_and_w4a8_is_worse(unet, trace, cacher, w8a8):
    w4a8 = UniformQuantizer(weight_bits=4, refresh_samples=8, cached_samples=4).quantize(
        unet, trace, cacher=cacher, progress=False
    )
    x, t = trace.x[3, :4], trace.timesteps[3].expand(4)
    with torch.no_grad(), step_scope(3):
        ref, out8, out4 = unet(x, t), w8a8(x, t), w4a8(x, t)
    # Random-weight tiny UNet: 8-bit noise per layer compounds over ~40 layers; 20 dB leaves a wide margin
    # over the ~30 dB measured when this test was written (the trained demo model is checked in test_demo.py).
    assert sqnr(out8, ref) > 20
    assert sqnr(out4, ref) < sqnr(out8, ref)


def test_quantized_model_samples_through_compressed_unet(unet, trace, cacher, w8a8):
    noise = seeded_noise((1, 16, 16), range(2))
    model = CompressedUNet(w8a8, num_steps=STEPS, cacher=cacher)
    out = ddim(model, noise, steps=STEPS, spacing="linspace")
    ref = ddim(FullPrecision(unet), noise, steps=STEPS, spacing="linspace")
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_trace_step_count_must_match(unet, trace):
    q = UniformQuantizer().prepare(unet, STEPS + 1)
    with pytest.raises(ConfigError, match="tables"):
        UniformQuantizer().calibrate(q, trace, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# PTQ4DM


@given(T=st.integers(1, 300), n=st.integers(1, 500), seed=st.integers(0, 1000))
def test_ndtc_steps_stay_in_range(T, n, seed):
    steps = ndtc_steps(T, n, mean=0.4, std=0.4, seed=seed)
    assert steps.shape == (n,) and int(steps.min()) >= 0 and int(steps.max()) <= T - 1


def test_ndtc_steps_follow_the_normal():
    steps = ndtc_steps(100, 20_000, mean=0.4, std=0.1, seed=0).double()
    assert steps.mean() == pytest.approx(39.5, abs=0.5)  # int() truncation shifts the mean by ~0.5
    assert steps.std() == pytest.approx(10.0, rel=0.05)


def test_ptq4dm_feeds_the_true_timestep_of_each_calibration_step(unet, trace):
    """The reference feeds the loop index as the timestep; cq must feed trace.timesteps[step]."""
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, t, cond=None, *, cache=None):
            from cq.core.step import current_step

            seen.append((current_step(), t.clone(), x.clone()))
            return x

    PTQ4DM(samples=40).calibrate(Recorder(), trace, progress=False)
    assert seen
    for step, t, x in seen:
        assert bool((t == trace.timesteps[step]).all()) and int(trace.timesteps[step]) != step or STEPS == 1
        assert torch.equal(x, trace.x[step, : x.shape[0]])


def test_ptq4dm_warns_when_draws_exceed_the_stored_trajectories(trace):
    """NDTC draws beyond a step's stored trajectories were dropped silently; they are now counted and
    reported, and every batch holds distinct rows."""
    keep = trace.x.shape[1]
    with pytest.warns(UserWarning, match="add no new samples"):
        batches = list(PTQ4DM(samples=keep * trace.steps * 4).calibration_batches(trace, (True,) * trace.steps, []))
    assert all(len(b.rows.unique()) == len(b.rows) <= keep for b in batches)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(PTQ4DM(samples=2).calibration_batches(trace, (True,) * trace.steps, []))


def test_ptq4dm_shares_one_range_across_steps(unet, trace, cacher):
    q = PTQ4DM(samples=24).quantize(unet, trace, cacher=cacher, progress=False)
    tables = [m for m in q.modules() if isinstance(m, ActQuantizer)]
    assert tables and all(m.num_tables == 1 and not m.spec.per_step for m in tables)
    x, t = trace.x[2, :2], trace.timesteps[2].expand(2)
    with torch.no_grad():
        out = q(x, t)  # no step needed: nothing is per step
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------------
# Registry


quantizers = st.one_of(
    st.builds(
        UniformQuantizer,
        weight_bits=st.integers(2, 8),
        act_bits=st.integers(2, 8),
        per_step=st.booleans(),
        keep_8bit=st.lists(st.sampled_from(["conv_in", "conv_out", "*.q"]), max_size=2).map(tuple),
        weight_method=st.sampled_from(["mse", "minmax", "percentile"]),
        weight_rounding=st.sampled_from(["nearest", "gptq", "auto"]),
    ),
    st.builds(UniformQuantizer, weight_bits=st.integers(2, 7), weight_rounding=st.just("adaround")),
    st.builds(
        PTQ4DM,
        weight_bits=st.integers(2, 8),
        samples=st.integers(1, 2000),
        mean=st.floats(0, 1),
        std=st.floats(0.01, 1),
    ),
)


@given(quantizer=quantizers)
def test_quantizers_round_trip(quantizer):
    assert from_dict(to_dict(quantizer)) == quantizer


def test_registered_quantizers():
    assert set(QUANTIZERS.names()) >= {"uniform", "ptq4dm"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: UniformQuantizer(weight_bits=9),
        lambda: UniformQuantizer(act_bits=1),
        lambda: UniformQuantizer(refresh_samples=0),
        lambda: PTQ4DM(std=0),
        lambda: PTQ4DM(samples=0),
        lambda: UniformQuantizer(weight_rounding="stochastic"),
        lambda: PTQ4DM(weight_rounding=None),
    ],
)
def test_invalid_quantizers_raise(make):
    with pytest.raises(ConfigError):
        make()


def test_qmodules_keep_shapes(w8a8, unet):
    for name, kind in quantized_modules(w8a8).items():
        original = unet.get_submodule(name)
        module = w8a8.get_submodule(name)
        if kind == "QConv2d":
            assert module.dequantized_weight().shape == original.weight.shape
        elif kind == "QLinear":
            assert isinstance(module, QLinear) and module.weight.weight_q.shape == original.weight.shape
        else:
            assert isinstance(module, QMatMul)


def test_softmax_operands_keep_the_fixed_unit_range(unet, w8a8):
    """Softmax probabilities are quantized on [0, 1] whatever calibration saw: a peaked attention on a held-out
    sample is never clamped (any probability is within half a step, 1/510, of its quantized value)."""
    qmatmuls = [m for m in w8a8.modules() if type(m).__name__ == "QMatMul"]
    av = [m for n, m in w8a8.named_modules() if n.endswith(".av")]
    assert av and all(m.act_b.fixed_range == (0.0, 1.0) and m.act.fixed_range is None for m in av)
    assert all(
        m.act.fixed_range is None and m.act_b.fixed_range is None for n, m in w8a8.named_modules() if n.endswith(".qk")
    )
    probs = torch.softmax(torch.randn(4, 64, 64) * 10, dim=-1)  # peaked rows: values near 1
    for m in av:
        with step_scope(0):
            assert float((m.act_b(probs) - probs).abs().max()) <= 1 / 510 + 1e-7
    assert len(qmatmuls) == 2 * len(av)


def test_version_1_quantizers_keep_their_io_layers_quantized():
    from cq.registry import from_dict, to_dict

    data = to_dict(UniformQuantizer())
    data.pop("float_io")
    data["version"] = 1
    assert from_dict(data).float_io is False and from_dict(to_dict(UniformQuantizer())).float_io is True


def test_shared_ranges_cover_every_step_in_any_order(unet, trace):
    """A shared (one-table) range is the union of the per-step ranges: independent of the order the steps are
    calibrated in, and never narrower than any step's own range."""
    from cq.calib.replay import CalibrationBatch, replay
    from cq.quant.calibrate import RangeTables, observe

    def tables(order):
        model = UniformQuantizer(per_step=False).prepare(unet, STEPS)
        batches = [CalibrationBatch(step=i, rows=torch.arange(3)) for i in order]
        with observe(model, RangeTables()) as t:
            replay(model, trace, batches)
        return t

    forward, backward = tables(range(STEPS)), tables(reversed(range(STEPS)))
    for name in forward.lo:
        assert torch.equal(forward.lo[name], backward.lo[name]) and torch.equal(forward.hi[name], backward.hi[name])
        steps = forward.steps[name]
        assert float(forward.lo[name][0]) == min(float(v[0]) for v in steps.values())
        assert float(forward.hi[name][0]) == max(float(v[1]) for v in steps.values())


def test_split_convs_quantize_each_input_half_on_its_own(unet):
    """A conv reading cat(cached, skip) has per-output-channel scales per half (CacheQuant), so a half
    with small weights is not quantized on the other half's scale; version-2 recipes keep one scale."""
    splits = unet.concat_splits()
    assert splits
    for split_weights in (True, False):
        q = UniformQuantizer(split_weights=split_weights).prepare(unet, num_steps=2)
        for name, c in splits.items():
            module, w = q.get_submodule(name), unet.get_submodule(name).weight
            if split_weights:
                assert module.weight.weight_q.shape[1] == c and module.weight_skip.weight_q.shape[1] == w.shape[1] - c
                assert module.weight.weight_scale.shape == module.weight_skip.weight_scale.shape == (w.shape[0],)
            else:
                assert module.weight_skip is None and module.weight.weight_q.shape == w.shape
    v2 = from_dict({"kind": "quantizer", "type": "uniform", "version": 2})
    assert v2.split_weights is False and UniformQuantizer().split_weights is True


@given(scale=st.floats(1e-3, 1e-1), seed=st.integers(0, 10**6))
def test_split_weight_error_is_per_half(scale, seed):
    """A half whose weights are `scale` times smaller keeps its relative precision with split weights: its error is
    bounded by half its own step, never by the other half's."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(8, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.weight[:, 4:] *= scale
    spec = QuantSpec(bits=8, symmetric=False, per_channel=True, per_step=False, method="minmax")
    act = QuantSpec(bits=8, symmetric=False, per_channel=False, per_step=False, method="minmax")
    q = QConv2d(conv, spec, act, 1, split=4, split_weights=True)
    small = conv.weight[:, 4:]
    err = (q.dequantized_weight()[:, 4:] - small).abs().amax()
    assert float(err) <= float(small.abs().amax()) / 255 + 1e-7
