"""The layer table (one row per layer kind) and the `Backend` enum: one vocabulary each, used everywhere."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import cq
from cq.cli import build_parser
from cq.core.step import step_scope
from cq.errors import ConfigError
from cq.metrics import count_macs
from cq.models.layers import MatMul
from cq.quant import (
    FLOAT_TO_FAKE,
    LAYERS,
    ActQuantizer,
    Backend,
    QuantSpec,
    fake_quant_classes,
    float_classes,
    integer_classes,
    kind_of,
)
from cq.quant.int8 import _onednn_present, int8_layers, to_int8
from cq.quant.int_mm import IntMMConv1x1
from cq.registry import to_dict


STEPS = 2
WSPEC = QuantSpec(bits=8, per_channel=True, method="minmax")
ASPEC = QuantSpec(bits=8, per_step=True, method="minmax")


def _calibrate(module: nn.Module) -> nn.Module:
    """Give every activation quantizer without a fixed range the range [-3, 3] (what to_int8 needs)."""
    for q in module.modules():
        if isinstance(q, ActQuantizer) and q.fixed_range is None:
            q.set_range(torch.full((q.num_tables,), -3.0), torch.full((q.num_tables,), 3.0))
    return module


def _macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    with torch.no_grad(), step_scope(0):
        out = module(*inputs)
    return kind_of(module).macs(module, inputs[0].shape, out.shape)


def test_every_float_class_has_one_row_and_maps_to_its_fake_class():
    assert [row.name for row in LAYERS] == ["conv2d", "conv1d", "linear", "matmul"]
    assert set(FLOAT_TO_FAKE) == set(float_classes()) == {nn.Conv2d, nn.Conv1d, nn.Linear, MatMul}
    assert set(FLOAT_TO_FAKE.values()) == set(fake_quant_classes())
    every = [cls for row in LAYERS for cls in row.classes]
    assert len(every) == len(set(every)), "a class belongs to two rows"
    assert not set(integer_classes()) & (set(float_classes()) | set(fake_quant_classes()))
    for row in LAYERS:
        assert FLOAT_TO_FAKE[row.float_cls] is row.fake_cls
        assert all(kind_of(cls.__new__(cls)) is row for cls in row.classes)
    with pytest.raises(TypeError):
        FLOAT_TO_FAKE[nn.ReLU] = nn.ReLU  # the table is read-only


def test_kind_of_follows_subclasses_and_ignores_other_modules():
    class MyConv(nn.Conv2d):
        pass

    assert kind_of(MyConv(1, 1, 1)).name == "conv2d"
    assert kind_of(nn.GroupNorm(1, 4)) is None and kind_of(nn.Identity()) is None


def test_prepare_replaces_each_float_layer_by_its_rows_fake_class(unet):
    prepared = cq.quant.UniformQuantizer(float_io=False).prepare(unet, STEPS)
    floats = {n: m for n, m in unet.named_modules() if type(m) in FLOAT_TO_FAKE}
    assert floats
    for name, module in floats.items():
        assert type(prepared.get_submodule(name)) is kind_of(module).fake_cls


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2]))
    cin = 4 * draw(st.integers(1, 6)) * groups
    cout = 4 * draw(st.integers(1, 4)) * groups
    k = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from([0, 1]))
    split = draw(st.sampled_from([None, cin // 2])) if groups == 1 else None
    size = draw(st.integers(k, 9))
    return cin, cout, k, stride, padding, groups, split, size, draw(st.integers(1, 3))


@given(case=conv_cases())
def test_conv_macs_are_equal_for_float_fake_and_every_integer_conversion(case):
    """The MAC rule counts the same for a conv in every stage: float, fake-quant, oneDNN, torch._int_mm."""
    cin, cout, k, stride, padding, groups, split, size, batch = case
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups)
    fake = _calibrate(cq.quant.QConv2d(conv, WSPEC, ASPEC, STEPS, split=split))
    x = torch.randn(batch, cin, size, size)
    expected = _macs(conv, x)
    out = (size + 2 * padding - k) // stride + 1
    assert expected == batch * cout * out * out * (cin // groups) * k * k
    stages = [fake]
    row = kind_of(conv)
    if _onednn_present():  # builds on any x86 torch; its values are exact only with VNNI, its shapes always
        stages.append(row.onednn_cls(fake))
    if IntMMConv1x1.supports(fake):
        stages.append(row.int_mm_cls(fake))
    assert all(_macs(m, x) == expected for m in stages), [type(m).__name__ for m in stages]


@given(
    cin=st.integers(1, 40),
    cout=st.integers(1, 24),
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
)
def test_linear_macs_are_equal_for_float_fake_and_every_integer_conversion(cin, cout, lead):
    linear = nn.Linear(cin, cout)
    fake = _calibrate(cq.quant.QLinear(linear, WSPEC, ASPEC, STEPS))
    x = torch.randn(*lead, cin)
    expected = _macs(linear, x)
    assert expected == torch.Size(lead).numel() * cout * cin
    row = kind_of(linear)
    integer = [row.int_mm_cls(fake)] + ([row.onednn_cls(fake)] if _onednn_present() else [])
    assert all(_macs(m, x) == expected for m in [fake, *integer])


@given(m=st.integers(1, 9), k=st.integers(1, 17), n=st.integers(1, 9), batch=st.integers(1, 3))
def test_matmul_and_conv1d_macs_are_equal_in_every_stage(m, k, n, batch):
    matmul = MatMul()
    fake = _calibrate(cq.quant.QMatMul(matmul, None, ASPEC, STEPS))
    a, b = torch.randn(batch, m, k), torch.randn(batch, k, n)
    stages = [fake] + [cls(fake) for cls in kind_of(matmul).integer_classes]
    assert _macs(matmul, a, b) == batch * m * n * k
    assert all(_macs(s, a, b) == batch * m * n * k for s in stages)
    conv1d = nn.Conv1d(k, n, 3, padding=1)
    fake1d = _calibrate(cq.quant.QConv1d(conv1d, WSPEC, ASPEC, STEPS))
    x = torch.randn(batch, k, m)
    assert kind_of(conv1d).integer_classes == ()
    assert _macs(conv1d, x) == _macs(fake1d, x) == batch * n * m * k * 3


@pytest.mark.parametrize("backend", ["int8", "int_mm"])
def test_a_model_counts_the_same_macs_per_layer_float_fake_and_converted(unet, backend):
    """Per layer, and in `report`: converting to integer kernels changes no MAC count. Symmetric 7-bit weights:
    integer kernels on every x86 CPU (8-bit codes keep float weights on OpenVINO without VNNI)."""
    quantizer = cq.quant.UniformQuantizer(weight_bits=7, weight_symmetric=True)
    fake = _calibrate(quantizer.prepare(unet, STEPS))
    converted = copy.deepcopy(fake)
    status = to_int8(converted, backend)
    assert int8_layers(converted)["int8"] > 0 and any(v.startswith("int8") for v in status.values())
    x, t = torch.randn(2, *unet.sample_shape), torch.full((2,), 10)
    with step_scope(0):
        counts = [count_macs(m, x, t).by_module for m in (unet, fake, converted)]
    assert counts[0] and counts[0] == counts[1] == counts[2]
    before = cq.report(cq.CompressedUNet(fake, num_steps=STEPS))
    model = cq.CompressedUNet(copy.deepcopy(fake), num_steps=STEPS)
    execution = model.to_int8(backend)  # "int8" may run on a runtime holding its own graph
    after = cq.report(model)
    assert after.total_macs == before.total_macs and after.full_macs == before.full_macs
    assert after.quantized_layers == before.quantized_layers and after.float_layers == before.float_layers
    integer = sum(mode.startswith("int8") for mode in execution.values())
    assert after.integer_layers == integer > 0 == before.integer_layers


def test_backend_parse_accepts_the_values_and_auto_and_names_them_otherwise():
    assert [Backend.parse(b.value) for b in Backend] == list(Backend)
    assert Backend.parse("auto") is Backend.INT8 and Backend.parse(Backend.ONEDNN) is Backend.ONEDNN
    with pytest.raises(ConfigError, match="backend must be one of") as error:
        Backend.parse("bogus")
    assert all(repr(b.value) in str(error.value) for b in Backend) and "'bogus'" in str(error.value)
    assert Backend.FAKE.kernels is None and all(b.kernels is b for b in Backend if b is not Backend.FAKE)


def test_backend_is_saved_as_its_string_and_used_by_recipe_to_int8_and_cli(unet):
    recipe = cq.quant_only("w8a8", backend="auto")
    assert recipe.backend is Backend.INT8 and recipe.int8_kernels is Backend.INT8
    assert json.loads(json.dumps(to_dict(recipe)))["backend"] == "int8"
    assert cq.quant_only("w8a8").int8_kernels is None
    with pytest.raises(ConfigError, match="backend must be one of"):
        to_int8(cq.quant.UniformQuantizer().prepare(unet, STEPS), Backend.FAKE)  # fake has no kernels to convert to
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    option = next(a for a in commands.choices["fit"]._actions if a.dest == "backend")
    assert option.choices == [b.value for b in Backend]


def test_affine_helpers_are_exported():
    from cq.quant import affine

    assert cq.quant.qparams is affine.qparams and cq.quant.fake_quantize is affine.fake_quantize
