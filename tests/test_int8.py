"""Real int8 execution equals fake quantization (within one accumulator quantum); compressed file sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_unet
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import cq
from cq.calib.trace import seeded_noise
from cq.core.step import step_scope
from cq.errors import ConfigError
from cq.fit.recipe import Recipe
from cq.metrics.error import sqnr
from cq.models.layers import MatMul
from cq.quant import QConv2d, QLinear
from cq.quant.affine import quantize
from cq.quant.codes import input_codes, unsigned
from cq.quant.int8 import Int8Conv2d, Int8Linear, int8_available, int8_layers, to_int8
from cq.quant.int_mm import Int8MatMul, IntMMConv1x1, IntMMLinear, int_mm_shape_ok
from cq.quant.modules import ActQuantizer, QMatMul
from cq.quant.packing import pack_nibbles, unpack_nibbles
from cq.quant.spec import QuantSpec


# oneDNN's kernels run only where they are exact: CPUs with VNNI / AMX (`onednn_exact`); elsewhere cq uses
# torch._int_mm, whose tests below run everywhere.
onednn = pytest.mark.skipif(
    not int8_available(), reason="oneDNN int8 kernels absent or inexact here (no VNNI: u8 x s8 pair sums saturate)"
)

STEPS = 3


def _calibrate(module: nn.Module, x: torch.Tensor, g: torch.Generator) -> None:
    """Give every activation quantizer a random (scale, zero point) per step covering x's range roughly."""
    for q in module.modules():
        if type(q).__name__ == "ActQuantizer":
            n = q.num_tables
            shrink = 0.5 + torch.rand(n, generator=g)  # ranges from half to 1.5x the data: clipping happens
            lo = x.min() * shrink
            hi = x.max() * (0.5 + torch.rand(n, generator=g))
            q.set_range(lo, hi)


@st.composite
def conv_cases(draw):
    cin = draw(st.sampled_from([4, 8, 16, 32]))
    cout = draw(st.sampled_from([4, 8, 24]))
    k = draw(st.sampled_from([1, 3]))
    stride = draw(st.sampled_from([1, 2]))
    split = draw(st.sampled_from([None, cin // 2]))
    sym = draw(st.booleans())
    bits = draw(st.sampled_from([4, 8]))
    size = draw(st.integers(4, 12))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    return cin, cout, k, stride, split, sym, bits, size, batch, seed


@onednn
@given(case=conv_cases(), step=st.integers(0, STEPS - 1))
def test_int8_conv_equals_fake_quant_within_one_quantum(case, step):
    cin, cout, k, stride, split, sym, bits, size, batch, seed = case
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1 + 0.02 * torch.randn((), generator=g))
    wspec = QuantSpec(bits=bits, symmetric=sym, per_channel=True, method="minmax")
    aspec = QuantSpec(bits=8, per_step=True, method="minmax")
    fake = QConv2d(conv, wspec, aspec, STEPS, split=split)
    x = torch.randn(batch, cin, size, size, generator=g) * 2 + 0.5
    _calibrate(fake, x, g)
    real = Int8Conv2d(fake)
    with torch.no_grad(), step_scope(step):
        a, b = fake(x), real(x)
    # one quantum of the int32 accumulator, per output channel: input scale x weight scale (largest half)
    scales = [fake.act.scale[step]] + ([fake.act_skip.scale[step]] if split else [])
    quantum = max(float(s) for s in scales) * fake.weight.weight_scale.reshape(1, -1, 1, 1)
    assert bool(((a - b).abs() <= quantum + 1e-5 * a.abs() + 1e-6).all())


@onednn
@given(
    cin=st.sampled_from([8, 32, 64]),
    cout=st.sampled_from([8, 16]),
    sym=st.booleans(),
    seed=st.integers(0, 10**6),
    step=st.integers(0, STEPS - 1),
)
def test_int8_linear_equals_fake_quant_within_one_quantum(cin, cout, sym, seed, step):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(cin, cout)
    fake = QLinear(
        linear,
        QuantSpec(bits=8, symmetric=sym, per_channel=True, method="minmax"),
        QuantSpec(bits=8, per_step=True, method="minmax"),
        STEPS,
    )
    x = torch.randn(5, cin, generator=g)
    _calibrate(fake, x, g)
    real = Int8Linear(fake)
    with torch.no_grad(), step_scope(step):
        a, b = fake(x), real(x)
    quantum = float(fake.act.scale[step]) * fake.weight.weight_scale
    assert bool(((a - b).abs() <= quantum + 1e-5 * a.abs() + 1e-6).all())


@given(
    lo=st.floats(-50, 0),
    width=st.floats(1e-3, 100),
    seed=st.integers(0, 10**6),
    ties=st.booleans(),
)
def test_input_codes_are_the_fake_quant_codes(lo, width, seed, ties):
    """The integer kernels' codes equal `quantize`'s bit for bit, including values on rounding ties."""
    act = ActQuantizer(QuantSpec(bits=8, method="minmax"), 1)
    act.set_range(torch.tensor([lo]), torch.tensor([lo + width]))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 5, 4, 3, generator=g) * width + lo).contiguous(memory_format=torch.channels_last)
    if ties:  # exact half-way points of the grid, and values just outside the range
        half = (torch.randint(-20, 276, x.shape, generator=g).float() + 0.5 - act.zero_point) * act.scale
        x = half.contiguous(memory_format=torch.channels_last)
    expected = quantize(x, act.scale[0], act.zero_point[0], act.spec)
    with step_scope(0):
        codes = input_codes(x, act)
    assert torch.equal(codes.exact + 128, expected)
    assert torch.equal(codes.centred.float(), codes.exact)
    q = unsigned(codes)
    assert q.dtype == torch.uint8 and q.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(q.float(), expected)


def _product_quantum(fake: nn.Module, step: int) -> torch.Tensor:
    scales = [m.scale[step] for m in fake.children() if isinstance(m, ActQuantizer)]
    return max(float(s) for s in scales) * fake.weight.weight_scale


@given(
    cin=st.sampled_from([8, 24, 64]),
    cout=st.sampled_from([8, 16]),
    rows=st.integers(1, 40),
    sym=st.booleans(),
    seed=st.integers(0, 10**6),
    step=st.integers(0, STEPS - 1),
)
def test_int_mm_linear_equals_fake_quant_within_one_quantum(cin, cout, rows, sym, seed, step):
    g = torch.Generator().manual_seed(seed)
    fake = QLinear(
        nn.Linear(cin, cout),
        QuantSpec(bits=8, symmetric=sym, per_channel=True, method="minmax"),
        QuantSpec(bits=8, per_step=True, method="minmax"),
        STEPS,
    )
    x = torch.randn(rows, cin, generator=g) * 2 - 0.3
    _calibrate(fake, x, g)
    with torch.no_grad(), step_scope(step):
        a, b = fake(x), IntMMLinear(fake)(x)
    assert bool(((a - b).abs() <= _product_quantum(fake, step) + 1e-5 * a.abs() + 1e-6).all())


@given(
    cin=st.sampled_from([16, 32]),
    cout=st.sampled_from([8, 24]),
    split=st.booleans(),
    sym=st.booleans(),
    size=st.integers(2, 6),
    seed=st.integers(0, 10**6),
    step=st.integers(0, STEPS - 1),
)
def test_int_mm_conv1x1_equals_fake_quant_within_one_quantum(cin, cout, split, sym, size, seed, step):
    g = torch.Generator().manual_seed(seed)
    fake = QConv2d(
        nn.Conv2d(cin, cout, 1),
        QuantSpec(bits=8, symmetric=sym, per_channel=True, method="minmax"),
        QuantSpec(bits=8, per_step=True, method="minmax"),
        STEPS,
        split=cin // 2 if split else None,
    )
    x = torch.randn(2, cin, size, size, generator=g) * 2 + 0.5
    _calibrate(fake, x, g)
    with torch.no_grad(), step_scope(step):
        a, b = fake(x), IntMMConv1x1(fake)(x)
    quantum = _product_quantum(fake, step).reshape(1, -1, 1, 1)
    assert bool(((a - b).abs() <= quantum + 1e-5 * a.abs() + 1e-6).all())


@given(
    m=st.integers(1, 20),
    k=st.integers(1, 33),
    n=st.integers(1, 20),
    batch=st.integers(1, 3),
    seed=st.integers(0, 10**6),
)
def test_int8_matmul_equals_fake_quant_within_one_quantum(m, k, n, batch, seed):
    """Both operands asymmetric (zero points handled by row / column sums), one product per batch entry."""
    g = torch.Generator().manual_seed(seed)
    fake = QMatMul(MatMul(), None, QuantSpec(bits=8, per_step=True, method="minmax"), STEPS)
    a = torch.randn(batch, m, k, generator=g) + 0.7
    b = torch.rand(batch, n, k, generator=g).transpose(1, 2)  # a transposed view, as softmax·v feeds it
    fake.act.set_range(a.min().expand(STEPS), a.max().expand(STEPS) * 0.8)
    fake.act_b.set_range(torch.zeros(STEPS), b.max().expand(STEPS))
    with torch.no_grad(), step_scope(1):
        x, y = fake(a, b), Int8MatMul(fake)(a, b)
    quantum = float(fake.act.scale[1] * fake.act_b.scale[1])
    assert bool(((x - y).abs() <= quantum + 1e-5 * x.abs() + 1e-5).all())


def test_int_mm_shape_rules_follow_the_device():
    """cuBLASLt's int8 GEMM needs K, N multiples of 8 (K >= 16); the CPU kernel takes any shape."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert int_mm_shape_ok(64, 128, cuda) and not int_mm_shape_ok(12, 128, cuda) and not int_mm_shape_ok(64, 3, cuda)
    assert int_mm_shape_ok(12, 3, cpu)


@given(codes=st.lists(st.integers(0, 15), min_size=0, max_size=99), signed=st.booleans())
def test_nibble_packing_round_trips(codes, signed):
    offset = 8 if signed else 0
    t = torch.tensor(codes, dtype=torch.int16) - offset
    dtype = torch.int8 if signed else torch.uint8
    packed = pack_nibbles(t.to(dtype), offset)
    assert packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(unpack_nibbles(packed, (len(codes),), dtype, offset), t.to(dtype))


def test_nibble_packing_refuses_wide_codes():
    with pytest.raises(ValueError, match="0, 15"):
        pack_nibbles(torch.tensor([16], dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------------------
# On a model


@pytest.fixture(scope="module")
def setup():
    unet = tiny_unet()
    trace = cq.trace(
        unet, steps=6, num_samples=6, points=[unet.default_cache_point()], spacing="linspace", progress=False
    )
    return unet, trace


def _fit(setup, bits: str):
    unet, trace = setup
    recipe = cq.cachequant(interval=3, bits=bits)
    recipe = cq.Recipe(
        cacher=recipe.cacher,
        correctors=recipe.correctors,
        quantizer=cq.quant.UniformQuantizer(
            weight_bits=recipe.quantizer.weight_bits, refresh_samples=4, cached_samples=2
        ),
    )
    return recipe.fit(unet, trace, progress=False)


def test_int8_model_matches_fake_quant_and_reloads(setup, tmp_path):
    unet, trace = setup
    model = _fit(setup, "w8a8")
    fake = copy.deepcopy(model)
    path = cq.save(model, tmp_path / "m.cq")
    # the PyTorch kernels by name where oneDNN is inexact: there `to_int8()` runs the OpenVINO runtime instead
    # (test_runtime_openvino.py; test_default_int8_is_the_fastest_exact_path below)
    kernels = "onednn" if int8_available() else "int_mm"
    status = model.to_int8(kernels)
    assert int8_layers(model.unet)["int8"] > 0 and int8_layers(fake.unet)["int8"] == 0
    if int8_available():  # every layer on oneDNN / _int_mm; elsewhere 3x3 convs stay fake-quant (with the reason)
        assert all(v.startswith("int8") for v in status.values()), status
    else:
        assert all(v.startswith("int8 (torch._int_mm)") or "no int8 convolution" in v for v in status.values())
    # Per layer the two agree to float rounding (tests above); a 1-ulp difference can flip one activation code
    # downstream, so whole-network outputs agree to quantization-noise level: > 25 dB on this random net at
    # every step (measured 32-59 dB). Sample-level agreement is checked on the trained demo model.
    for step in range(6):
        x, t = trace.x[step, :4], trace.timesteps[step].expand(4)
        expected, got = fake(x, t, step=step), model(x, t, step=step)  # in step order: caches fill alike
        assert sqnr(got, expected) > 25
    loaded = cq.load(path)
    loaded.to_int8(kernels)
    noise = seeded_noise((1, 16, 16), range(2))
    assert torch.equal(
        cq.sampling.ddim(loaded, noise, steps=6, spacing="linspace"),
        cq.sampling.ddim(model, noise, steps=6, spacing="linspace"),
    )
    # integer modules keep the quantized state under the fake-quant names: a converted model saves the same file
    from safetensors.torch import load_file

    again = load_file(str(cq.save(model, tmp_path / "again.cq")))
    first = load_file(str(path))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


@pytest.fixture(scope="module")
def wide():
    """Channel counts closer to real UNets (64/128): per-channel metadata is a realistic share of the file."""
    unet = tiny_unet(ch=64)
    trace = cq.trace(
        unet, steps=6, num_samples=4, points=[unet.default_cache_point()], spacing="linspace", progress=False
    )
    return unet, trace


@pytest.mark.parametrize(("bits", "limit"), [("w8a8", 0.27), ("w4a8", 0.15)])
def test_compressed_file_size(wide, tmp_path, bits, limit):
    """Kept in float32: biases, GroupNorm affine, per-channel weight scales, per-step activation tables and DEC
    tables -- O(channels x steps), not O(weights), and precision-critical; zero points are stored as uint8,
    4-bit codes two per byte. First/last layers stay 8-bit in W4A8 (CacheQuant)."""
    from safetensors.torch import save_file

    unet, _ = wide
    fp32 = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(fp32))
    path = cq.save(_fit(wide, bits), tmp_path / f"{bits}.cq")
    ratio = path.stat().st_size / fp32.stat().st_size
    assert ratio <= limit, f"{bits}: {ratio:.3f} of fp32"
    model = cq.load(path)
    assert model.unet.get_submodule("up.0.block.0.conv1").weight.weight_q.dtype == torch.uint8


def test_int_mm_backend_runs_gemm_layers_and_says_why_the_rest_do_not(setup):
    """The GPU path (``torch._int_mm``), exercised on the CPU: 1x1 convs, linears and attention matmuls run on
    integer GEMMs; 3x3 convs keep fake quantization and their status says so."""
    unet, trace = setup
    model = _fit(setup, "w8a8")
    fake = copy.deepcopy(model)
    status = model.to_int8(backend="int_mm")
    assert status["up.0.block.0.nin_shortcut"] == "int8 (torch._int_mm)"
    assert status["mid.attn_1.qk"] == "int8 (torch._int_mm)"
    assert status["temb.dense.0"] == "int8 (torch._int_mm)"
    assert status["up.0.block.0.conv1"].startswith("fake-quant (3x3 conv: torch has no int8 convolution")
    assert isinstance(model.unet.get_submodule("up.0.block.0.nin_shortcut"), IntMMConv1x1)
    for step in range(6):
        x, t = trace.x[step, :4], trace.timesteps[step].expand(4)
        assert sqnr(model(x, t, step=step), fake(x, t, step=step)) > 25


def test_to_int8_refuses_unknown_backends_and_keeps_uncalibrated_layers(setup):
    unet, _ = setup
    with pytest.raises(ConfigError, match="backend must be one of"):
        to_int8(unet, backend="tensorrt")
    prepared = cq.quant.UniformQuantizer().prepare(unet, 6)  # structure only: no activation range yet
    status = to_int8(prepared)
    assert status and all(v == "fake-quant (activations not calibrated)" for v in status.values())
    assert int8_layers(prepared)["int8"] == 0


@onednn
def test_recipe_with_a_kernel_backend_fits_converts_saves_and_loads_converted(setup, tmp_path):
    unet, trace = setup
    assert cq.quant_only("w8a8", backend="int8").backend == "int8"
    recipe = Recipe(quantizer=cq.quant.UniformQuantizer(refresh_samples=4, cached_samples=2), backend="onednn")
    model = recipe.fit(unet, trace, progress=False)
    assert int8_layers(model.unet)["fake-quant"] == 0
    assert set(model.execution.values()) == {"int8 (oneDNN)", "int8 (torch._int_mm)"}
    summary = cq.report(model)
    assert summary.quantized_layers == len(model.execution)
    assert any(n.startswith("execution: ") and n.endswith("layer(s) int8 (oneDNN)") for n in summary.notes)
    loaded = cq.load(cq.save(model, tmp_path / "m.cq"))  # the recipe names its kernels: no flag needed
    assert loaded.recipe.backend == "onednn" and int8_layers(loaded.unet) == int8_layers(model.unet)
    x, t = trace.x[2, :3], trace.timesteps[2].expand(3)
    assert torch.equal(loaded(x, t, step=2), model(x, t, step=2))


def test_recipe_backend_is_checked():
    with pytest.raises(ConfigError, match="backend must be one of"):
        Recipe(quantizer=cq.quant.UniformQuantizer(), backend="int4")
    with pytest.raises(ConfigError, match="needs a quantizer"):
        Recipe(cacher=cq.deepcache(5).cacher, backend="int8")


def test_auto_backend_picks_int_mm_gemms_for_cuda_layers(setup, monkeypatch):
    """Selection by device, checked without a GPU: layers reported on CUDA get ``torch._int_mm`` modules for
    linears, 1x1 convs and matmuls, and fake quantization (with the reason) for 3x3 convs."""
    import cq.quant.int8 as int8

    model = _fit(setup, "w8a8")
    monkeypatch.setattr(int8, "module_device", lambda module: torch.device("cuda"))
    status = model.to_int8()  # backend "auto"
    assert status["up.0.block.0.nin_shortcut"] == "int8 (torch._int_mm)"
    assert status["temb.dense.0"] == "int8 (torch._int_mm)"
    assert status["mid.attn_1.qk"] == "int8 (torch._int_mm)"
    assert status["up.0.block.0.conv1"] == "fake-quant (3x3 conv: torch has no int8 convolution on cuda)"
    assert not any(isinstance(m, Int8Conv2d | Int8Linear) for m in model.unet.modules())


def test_onednn_is_used_only_where_it_is_exact(setup):
    """On CPUs without VNNI oneDNN's u8 x s8 kernels saturate (a silent wrong result): auto never picks them
    there, and asking for them by name is refused."""
    import cq.quant.int8 as int8
    from cq.quant.int8 import onednn_exact

    model = _fit(setup, "w8a8")
    status = int8.to_int8(copy.deepcopy(model).unet, "int8")  # PyTorch's kernels, as auto picks without OpenVINO
    assert any(v == "int8 (oneDNN)" for v in status.values()) == onednn_exact()
    if not onednn_exact():
        with pytest.raises(ConfigError, match="saturate"):
            model.to_int8(backend="onednn")


def test_default_int8_is_the_fastest_exact_path(setup, monkeypatch):
    """``to_int8()`` on the CPU (`cpu_int8_path`): OpenVINO wherever it is installed (every layer in int8 where
    the CPU sums its codes exactly), else oneDNN where it is exact; with neither, a `BackendUnavailableError`
    naming the install and the by-name alternative."""
    import sys

    from cq.errors import BackendUnavailableError

    pytest.importorskip("openvino")
    unet, trace = setup
    base = _fit(setup, "w8a8")  # asymmetric 8-bit weights: zero points stay float on OpenVINO
    symmetric = cq.Recipe(
        cacher=base.recipe.cacher,
        correctors=base.recipe.correctors,
        quantizer=cq.quant.UniformQuantizer(
            weight_bits=7, weight_symmetric=True, attention_symmetric=True, refresh_samples=4, cached_samples=2
        ),
    ).fit(unet, trace, progress=False)
    status = copy.deepcopy(symmetric).to_int8()
    assert set(status.values()) == {"int8 (OpenVINO)"}, status
    status = copy.deepcopy(base).to_int8()
    assert all("(OpenVINO" in v for v in status.values()), status
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    if int8_available():
        assert any(v == "int8 (oneDNN)" for v in copy.deepcopy(symmetric).to_int8().values())
    else:
        with pytest.raises(BackendUnavailableError, match=r"cq\[openvino\].*int_mm"):
            copy.deepcopy(base).to_int8()


def test_a_conditional_unet_without_exact_onednn_is_refused_naming_why(monkeypatch):
    """OpenVINO's graphs take no conditioning: where oneDNN is inexact, a conditional UNet gets a
    `BackendUnavailableError` that says so (not advice to install a runtime that would not help)."""
    from cq.errors import BackendUnavailableError
    from cq.models import build
    from cq.runtime import dispatch

    pytest.importorskip("openvino")
    monkeypatch.setattr(dispatch, "int8_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match=r"take no conditioning.*'fake'.*int_mm"):
        dispatch.cpu_int8_path(build("tiny-sd"))
