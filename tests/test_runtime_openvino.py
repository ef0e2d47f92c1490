"""The OpenVINO runtime computes cq's fake-quantized model: per layer within one accumulator quantum (no int16
saturation on any CPU), end to end within a stated bound, full and shallow graphs, saved and reloaded alike."""

from __future__ import annotations

import copy
import io
import sys
import warnings

import pytest
import torch
from conftest import tiny_unet
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import cq
from cq.cache import DeepCache, UniformSchedule
from cq.core.step import step_scope
from cq.errors import BackendUnavailableError, ConfigError, ExportUnsupportedError, StepCountMismatchError
from cq.fit.recipe import Recipe
from cq.quant import QConv2d, QMatMul, UniformQuantizer
from cq.quant.spec import QuantSpec
from cq.runtime import cpu_line, int8_weight_limit, layer_plan, lower_layers


ov = pytest.importorskip("openvino")
STEPS = 3


def _run_openvino(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` exported to ONNX and run by OpenVINO's CPU plugin (f32 inference precision)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17, do_constant_folding=False)
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(buffer.getvalue(), b""),
        "CPU",
        {"INFERENCE_PRECISION_HINT": ov.Type.f32, "INFERENCE_NUM_THREADS": 1},
    )
    return torch.from_numpy(compiled(x.numpy())[0].copy())


def _lowered_at(fake: nn.Module, step: int, limit: int | None = None) -> nn.Module:
    lowered = lower_layers(fake, limit=limit)
    for name, act in lowered.acts.items():
        source = fake.get_submodule(name)
        act.bound = (source.scale[step].clone(), source.zero_point[step].to(torch.int32))
    for name, affine in lowered.corrections.items():
        correction = (fake.get_submodule(name) if name else fake).correction
        affine.bound = (correction.gain[step].clone(), correction.offset[step].clone())
    return lowered.body


@st.composite
def conv_cases(draw):
    cin = draw(st.sampled_from([8, 16, 32]))
    cout = draw(st.sampled_from([4, 8, 24]))
    k = draw(st.sampled_from([1, 3]))
    stride = draw(st.sampled_from([1, 2]))
    split = draw(st.sampled_from([None, cin // 2]))
    weights = draw(st.sampled_from([(7, True), (8, True), (8, False), (4, True), (4, False)]))
    limit = draw(st.sampled_from([None, 64]))  # this CPU's exact range, and that of a CPU without VNNI
    extreme = draw(st.booleans())  # inputs at the top of the range: where int16 pair sums would saturate
    seed = draw(st.integers(0, 2**31 - 1))
    return cin, cout, k, stride, split, weights, limit, extreme, seed


@given(case=conv_cases(), step=st.integers(0, STEPS - 1))
def test_lowered_conv_on_openvino_equals_fake_quant_within_one_quantum(case, step):
    cin, cout, k, stride, split, (bits, symmetric), limit, extreme, seed = case
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
    wspec = QuantSpec(bits=bits, symmetric=symmetric, per_channel=True, method="minmax")
    fake = QConv2d(
        conv, wspec, QuantSpec(bits=8, per_step=True, method="minmax"), STEPS, split=split, split_weights=bool(split)
    )
    acts = [fake.act] + ([fake.act_skip] if split else [])
    for act in acts:
        act.set_range(-3.0 * (1 + torch.rand(STEPS, generator=g)), 3.0 * (0.5 + torch.rand(STEPS, generator=g)))
    # inputs a quarter code away from the rounding boundaries (cq rounds ties up, ONNX to even, and OpenVINO
    # computes the code from the range ends: near a boundary either code is a correct rounding), codes beyond the
    # grid included; ``extreme``: every code at 255, where int16 pair sums would saturate
    halves = [slice(0, split), slice(split, cin)] if split else [slice(0, cin)]
    x = torch.empty(2, cin, 9, 9)
    for act, half in zip(acts, halves, strict=True):
        shape = x[:, half].shape
        codes = torch.full(shape, 258.0) if extreme else torch.randint(-5, 261, shape, generator=g).float()
        jitter = (torch.rand(shape, generator=g) - 0.5) * 0.5
        x[:, half] = (codes + jitter - act.zero_point[step]) * act.scale[step]
    with torch.no_grad(), step_scope(step):
        expected = fake(x)
    got = _run_openvino(_lowered_at(fake, step, limit), x)
    scales = [fake.act.scale[step]] + ([fake.act_skip.scale[step]] if split else [])
    weight_scales = [fake.weight.weight_scale] + (
        [fake.weight_skip.weight_scale] if fake.weight_skip is not None else []
    )
    quantum = max(float(s) for s in scales) * torch.stack(weight_scales).amax(0).reshape(1, -1, 1, 1)
    assert bool(((got - expected).abs() <= quantum + 1e-5 * expected.abs() + 1e-5).all()), cpu_line()


def test_the_plan_keeps_float_weights_where_int8_would_not_be_exact():
    unet = tiny_unet()
    trace = cq.trace(unet, steps=2, num_samples=1, points=[unet.default_cache_point()], seed=5, progress=False)
    w7 = Recipe(
        quantizer=UniformQuantizer(weight_bits=7, weight_symmetric=True, refresh_samples=2, cached_samples=1)
    ).fit(unet, trace, progress=False)
    w8 = Recipe(quantizer=UniformQuantizer(refresh_samples=2, cached_samples=1)).fit(unet, trace, progress=False)
    plan = layer_plan(w7.unet, limit=64)
    assert {m for n, m in plan.items() if not n.endswith(("qk", "av"))} == {"int8"}
    assert all("zero points" in m for n, m in plan.items() if n.endswith(("qk", "av")))  # asymmetric operands
    signed = Recipe(
        quantizer=UniformQuantizer(
            weight_bits=7, weight_symmetric=True, attention_symmetric=True, refresh_samples=2, cached_samples=1
        )
    ).fit(unet, trace, progress=False)
    assert set(layer_plan(signed.unet, limit=64).values()) == {"int8"}
    matmuls = [m for m in signed.unet.modules() if isinstance(m, QMatMul)]
    assert matmuls
    for m in matmuls:  # q, k, v on signed grids; the softmax on its unsigned [0, 1] grid, zero point 0
        for side, act in (("a", m.act), ("b", m.act_b)):
            probabilities = m.probabilities == side
            assert act.spec.symmetric != probabilities and bool((act.zero_point == 0).all())
    # asymmetric 8-bit codes span 256 levels: shifted to int8 with VNNI, float without
    assert {m for n, m in layer_plan(w8.unet, limit=127).items() if not n.endswith(("qk", "av"))} == {"int8"}
    assert all(
        m.startswith("float weights (weight codes span 256 levels > 129")
        for n, m in layer_plan(w8.unet, limit=64).items()
        if not n.endswith(("qk", "av"))
    )
    w8s = Recipe(quantizer=UniformQuantizer(weight_symmetric=True, refresh_samples=2, cached_samples=1)).fit(
        unet, trace, progress=False
    )
    plan = layer_plan(w8s.unet, limit=64)
    assert any("levels > 129" in m for m in plan.values())  # 8-bit codes on a CPU without VNNI
    assert {m for n, m in layer_plan(w8s.unet, limit=127).items() if not n.endswith(("qk", "av"))} == {"int8"}
    assert int8_weight_limit() in (64, 127)


def test_shifted_weight_codes_compute_the_asymmetric_weights():
    """Asymmetric 8-bit weights lowered as shifted int8 codes plus the window-sum term (the VNNI range) compute
    what the same layers with float weights compute (the range of a CPU without VNNI), layer by layer on the
    inputs each sees in the UNet -- convs, split convs, linears -- to float rounding."""
    from cq.quant import QConv1d, QLinear

    unet = tiny_unet()
    trace = cq.trace(unet, steps=2, num_samples=2, points=[unet.default_cache_point()], seed=5, progress=False)
    fake = Recipe(quantizer=UniformQuantizer(refresh_samples=2, cached_samples=1)).fit(unet, trace, progress=False)
    shifted, floats = _lowered_at(fake.unet, 0, 127), _lowered_at(fake.unet, 0, 64)
    seen: dict[str, torch.Tensor] = {}
    layers = {n: m for n, m in fake.unet.named_modules() if isinstance(m, QConv2d | QLinear | QConv1d)}

    def keep(name):
        def hook(module, args, out):
            seen.setdefault(name, args[0])

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    with torch.no_grad(), step_scope(0):
        fake.unet(trace.x[0], trace.timesteps[0].expand(2))
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(layers)

    def remainders(module):
        return sum(getattr(w, "remainder", None) is not None for w in module.modules())

    assert remainders(shifted) > 0 and remainders(floats) == 0
    for name, x in seen.items():
        with torch.no_grad():
            got, expected = shifted.get_submodule(name)(x), floats.get_submodule(name)(x)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * (1 + float(expected.abs().max()))), name


@pytest.fixture(scope="module")
def fitted():
    """A tiny UNet, DeepCache N=2 + W7A8 with signed attention operands (every layer int8 on every x86 CPU),
    fitted on a 5-step trace."""
    unet = tiny_unet()
    trace = cq.trace(unet, steps=5, num_samples=4, points=[unet.default_cache_point()], seed=11, progress=False)
    recipe = Recipe(
        cacher=DeepCache(schedule=UniformSchedule(interval=2)),
        quantizer=UniformQuantizer(
            weight_bits=7, weight_symmetric=True, attention_symmetric=True, refresh_samples=4, cached_samples=2
        ),
    )
    return unet, recipe.fit(unet, trace, progress=False)


def test_full_and_shallow_graphs_sample_the_fake_quant_model(fitted):
    unet, model = fitted
    fast = copy.deepcopy(model)
    modes = fast.to_runtime("openvino")
    assert set(modes.values()) == {"int8 (OpenVINO)"}
    assert fast.execution == modes
    x = torch.randn(3, *unet.sample_shape, generator=torch.Generator().manual_seed(123))
    t = model.sampler_settings.timesteps
    for step in (0, 1):  # a refresh (the full graph, storing the feature), then a reuse (the shallow graph)
        ts = torch.full((3,), t[step])
        with torch.no_grad():
            expected, got = model(x, ts, step=step), fast(x, ts, step=step)
            full = unet(x, ts)
        # the runtime computes each activation's code with its own float formula: an input within ~1e-6 of a
        # rounding boundary (a few per million) may take the neighbouring code, and in a random-weight UNet each
        # such flip cascades through the later quantizers. Exact away from boundaries: the per-layer test above;
        # on a trained model: the demo test below. Here: no further from fake quantization than it is from float.
        assert float((got - expected).norm()) <= float((expected - full).norm())
    assert {key[0] for key in fast.runtime._compiled} == {False, True}  # both graphs ran
    compiled = fast.runtime.compiled_models()
    assert len(compiled) == fast.runtime.compiled_graphs == 2
    for graph in compiled:  # what OpenVINO made of them: int8 convolutions (bench/openvino_graph.py counts them)
        kinds = {
            (op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
            for op in graph.get_runtime_model().get_ordered_ops()
        }
        assert ("Convolution", "u8") in kinds


@pytest.fixture(scope="module")
def demo_fitted():
    """The embedded demo model, DeepCache N=5 + W7A8 (signed attention operands) with one activation table per
    cache group, 10 DDIM steps."""
    unet = cq.models.load("demo").eval()
    trace = cq.trace(unet, steps=10, num_samples=4, points=[unet.default_cache_point()], seed=10_000, progress=False)
    recipe = Recipe(
        cacher=DeepCache(schedule=UniformSchedule(interval=5)),
        quantizer=UniformQuantizer(
            weight_bits=7,
            weight_symmetric=True,
            attention_symmetric=True,
            activation_tables="per_group",
            refresh_samples=4,
            cached_samples=2,
        ),
    )
    return unet, recipe.fit(unet, trace, progress=False)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(4.0 / (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12))


def test_the_demo_model_on_openvino_samples_what_fake_quantization_samples(demo_fitted):
    """Held-out seeds: the runtime's x0 within 40 dB (median) of fake quantization's, and as close to full
    precision as fake quantization is (mean PSNR within 0.3 dB)."""
    unet, model = demo_fitted
    fast = copy.deepcopy(model)
    fast.to_runtime("openvino")
    seeds = range(1000, 1016)
    noise = torch.stack([torch.randn(unet.sample_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        expected, got = cq.sampling.ddim(model, noise, steps=10), cq.sampling.ddim(fast, noise, steps=10)
        full = cq.sampling.ddim(cq.sampling.FullPrecision(unet), noise, steps=10)
    assert len(fast.runtime._compiled) == 4  # two tables (one per cache group) x (full, shallow)
    assert float(_psnr(got, expected).median()) >= 40.0
    assert abs(float(_psnr(got, full).mean() - _psnr(expected, full).mean())) <= 0.3


def test_a_saved_model_reloads_onto_the_runtime_identically(fitted, tmp_path):
    unet, model = fitted
    path = tmp_path / "m.cq"
    cq.save(model, path)
    fresh, loaded = copy.deepcopy(model), cq.load(path, unet=unet)
    fresh.to_runtime("openvino")
    loaded.to_runtime("openvino")
    noise = torch.randn(2, *unet.sample_shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(cq.sampling.ddim(fresh, noise, steps=5), cq.sampling.ddim(loaded, noise, steps=5))
        with pytest.raises(StepCountMismatchError, match="5"):  # the runtime keeps the model's own step check
            cq.sampling.ddim(loaded, noise, steps=8)
    with pytest.raises(StepCountMismatchError, match="refit"):  # a .cq for another step count
        cq.load(path, num_steps=8, int8=True)


def test_bad_backends_and_models_are_refused_by_name(fitted, monkeypatch):
    unet, model = fitted
    with pytest.raises(ConfigError, match="openvino"):
        copy.deepcopy(model).to_runtime("tensorrt")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the package were not installed
    with pytest.raises(BackendUnavailableError, match=r"cq\[openvino\]"):
        copy.deepcopy(model).to_runtime("openvino")
    monkeypatch.undo()
    trace = cq.trace(unet, steps=5, num_samples=2, points=[unet.default_cache_point()], seed=3, progress=False)
    a4 = Recipe(
        quantizer=UniformQuantizer(weight_bits=8, act_bits=4, keep_8bit=(), refresh_samples=2, cached_samples=1)
    ).fit(unet, trace, progress=False)
    with pytest.raises(ExportUnsupportedError, match=r"4-bit activations .* fallback=True"):
        copy.deepcopy(a4).to_runtime("openvino")
    noise = torch.randn(1, *unet.sample_shape)
    allowed = copy.deepcopy(a4)
    allowed.to_runtime("openvino", fallback=True)
    with torch.no_grad():
        got, expected = cq.sampling.ddim(allowed, noise, steps=5), cq.sampling.ddim(a4, noise, steps=5)
    assert float((got - expected).abs().max()) <= 1e-3 * float(expected.abs().max()) + 1e-3
