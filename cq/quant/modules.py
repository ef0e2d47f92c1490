"""Fake-quant modules that replace ``nn.Conv2d``, ``nn.Conv1d``, ``nn.Linear`` and `MatMul` (`cq.quant.layer_table`).

Each module quantizes its weight (data-free, at construction) and its input activation(s) with an
`ActQuantizer`. An activation quantizer passes values through until calibration gives it a range
(``calibrated``); with ``per_step`` it holds one (scale, zero point) per sampling step and reads the step from
`cq.core.step.current_step` -- never from a counter. Modules whose input is ``cat(cached, skip)`` get two activation
quantizers split at the concat's channel boundary.

Weights are quantized when the module is built (the search needs only the weight) and the float copy is
dropped: ``weight_q`` (uint8/int8), ``weight_scale``, ``weight_zero_point`` are buffers, so ``state_dict()`` is
the quantized checkpoint.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.step import step_row, table_step
from ..errors import CqError
from ..models.layers import MatMul
from .affine import fake_quantize, qparams, search_range
from .spec import QuantSpec


__all__ = ["ActQuantizer", "QuantizedWeight", "QConv2d", "QConv1d", "QLinear", "QMatMul", "adopt_conv_state"]


class ActQuantizer(nn.Module):
    """Activation fake quantization with one parameter set, or one per sampling step (``spec.per_step``).

    ``fixed_range``: the values' known bounds (softmax probabilities: ``(0, 1)``). The range is set from it at
    construction and calibration leaves it alone, so no held-out input is ever clamped inside its bounds.
    """

    def __init__(self, spec: QuantSpec, num_steps: int, fixed_range: tuple[float, float] | None = None):
        super().__init__()
        self.spec = spec
        self.fixed_range = fixed_range
        n = num_steps if spec.per_step else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n))
        self.register_buffer("calibrated", torch.zeros(n, dtype=torch.bool))
        if fixed_range is not None:
            lo, hi = fixed_range
            self.set_range(torch.full((n,), float(lo)), torch.full((n,), float(hi)))

    @property
    def num_tables(self) -> int:
        return self.scale.shape[0]

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Set every table from ``[n]`` range bounds (``n`` = 1 or num_steps)."""
        scale, zp = qparams(lo, hi, self.spec)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.calibrated.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        i = table_step() if self.spec.per_step else 0
        scale, zero_point, calibrated = (step_row(t, i) for t in (self.scale, self.zero_point, self.calibrated))
        if torch.compiler.is_compiling():  # no data-dependent branch in a graph: an uncalibrated table passes x
            return torch.where(calibrated, fake_quantize(x, scale, zero_point, self.spec), x)
        if not bool(calibrated):
            return x
        return fake_quantize(x, scale, zero_point, self.spec)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{'s' if s.symmetric else 'u'}int{s.bits}, {'per-step' if s.per_step else 'shared'} x"
            f"{self.num_tables}, " + (f"fixed range {self.fixed_range}" if self.fixed_range else s.method)
        )


class QuantizedWeight(nn.Module):
    """A weight quantized per output channel (or per tensor), stored as integers plus scales and zero points."""

    def __init__(self, weight: Tensor, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        if weight.is_meta:  # a skeleton to load a saved model into: integer buffers of the right shapes, no search
            channels = weight.shape[0] if spec.per_channel else 1
            dtype = torch.int8 if spec.symmetric else torch.uint8
            self.register_buffer("weight_q", torch.empty(weight.shape, dtype=dtype, device="meta"))
            self.register_buffer("weight_scale", torch.empty(channels, device="meta"))
            self.register_buffer("weight_zero_point", torch.empty(channels, dtype=dtype, device="meta"))
            return
        lo, hi = search_range(weight, spec)
        scale, zp = qparams(lo, hi, spec)
        shape = (-1,) + (1,) * (weight.ndim - 1) if spec.per_channel else ()
        q = (torch.round(weight.detach().float() / scale.reshape(shape)) + zp.reshape(shape)).clamp(
            spec.qmin, spec.qmax
        )
        self.register_buffer("weight_q", q.to(torch.int8 if spec.symmetric else torch.uint8))
        self.register_buffer("weight_scale", scale.reshape(-1).clone())
        # zero points are integers in [qmin, qmax]: stored as such (1 byte per channel, not 4)
        self.register_buffer("weight_zero_point", zp.reshape(-1).to(self.weight_q.dtype))

    def dequantized(self) -> Tensor:
        shape = (-1,) + (1,) * (self.weight_q.ndim - 1) if self.spec.per_channel else ()
        scale, zp = self.weight_scale.reshape(shape), self.weight_zero_point.reshape(shape).float()
        return (self.weight_q.float() - zp) * scale

    def centred(self) -> tuple[Tensor, Tensor]:
        """``(w8, shift)`` with ``W = scale * (w8 + shift)``: int8 codes for the integer kernels (signed codes as
        they are, unsigned ones as ``q - 128``) and the per-channel float shift (``0`` / ``128 - z``)."""
        if self.spec.symmetric:
            return self.weight_q.to(torch.int8), torch.zeros_like(self.weight_scale)
        w8 = (self.weight_q.to(torch.int16) - 128).to(torch.int8)
        return w8, 128 - self.weight_zero_point.float()

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{'s' if s.symmetric else 'u'}int{s.bits} {'per-channel' if s.per_channel else 'per-tensor'} {s.method}"
        )


def _frozen_bias(layer: nn.Conv1d | nn.Conv2d | nn.Linear) -> nn.Parameter | None:
    """A float layer's bias as its fake-quant replacement keeps it: a copy, not trained (None without a bias)."""
    return None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)


class _QConv(nn.Module):
    """What a fake-quant convolution takes over from the float one whatever its dimension: zero padding only, the
    geometry (shape fields) and the bias. The subclass quantizes the weight and the input."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise CqError(f"{type(self).__name__} supports zero padding only, got {conv.padding_mode!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.bias = _frozen_bias(conv)


class QConv2d(_QConv):
    """Fake-quant ``nn.Conv2d``: input activation(s) and weight quantized; ``split`` splits a concat input.

    ``split_weights`` (with ``split``): the weight columns of the two input halves are quantized separately
    (``weight`` over ``[:split]``, ``weight_skip`` over ``[split:]``), each with its own per-output-channel scales,
    as CacheQuant's split-shortcut quantization does (``QuantModule`` ``split`` in ``quant_layer.py``): the cached
    feature and the skip have different ranges, so do their weights' columns.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        weight_spec: QuantSpec,
        act_spec: QuantSpec,
        num_steps: int,
        split: int | None = None,
        split_weights: bool = False,
    ):
        super().__init__(conv)
        self.split = split
        halves = bool(split) and split_weights
        w = conv.weight
        self.weight = QuantizedWeight(w[:, :split] if halves else w, weight_spec)
        self.weight_skip = QuantizedWeight(w[:, split:], weight_spec) if halves else None
        self.act = ActQuantizer(act_spec, num_steps)
        self.act_skip = ActQuantizer(act_spec, num_steps) if split else None
        self.correction: nn.Module | None = None  # DEC: per-step affine of the cached half's output

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.act_skip is None:
            return self.act(x)
        return torch.cat([self.act(x[:, : self.split]), self.act_skip(x[:, self.split :])], dim=1)

    def dequantized_weight(self) -> Tensor:
        """The full ``[out, in, kh, kw]`` weight as the convolution sees it."""
        if self.weight_skip is None:
            return self.weight.dequantized()
        return torch.cat([self.weight.dequantized(), self.weight_skip.dequantized()], dim=1)

    def weight_covering(self, start: int) -> tuple[QuantizedWeight, int]:
        """``(quantized weight, its first input channel)`` holding input channel ``start``."""
        if self.weight_skip is not None and start >= self.split:
            return self.weight_skip, self.split
        return self.weight, 0

    def forward(self, x: Tensor) -> Tensor:
        xq, w = self.quantize_input(x), self.dequantized_weight()
        args = (self.stride, self.padding, self.dilation, self.groups)
        if self.correction is None:
            return F.conv2d(xq, w, self.bias, *args)
        # Cached half corrected per step: a*(conv(xq_c, W_c) + bias) + b == conv(xq_c, a*W_c) + a*bias + b
        c = self.split
        cached = F.conv2d(xq[:, :c], w[:, :c], self.bias, *args)
        return self.correction(cached, table_step()) + F.conv2d(xq[:, c:], w[:, c:], None, *args)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}" + (
            f", split={self.split}" + (" (weights per half)" if self.weight_skip is not None else "")
            if self.split
            else ""
        )


def adopt_conv_state(target: nn.Module, conv: QConv2d) -> None:
    """Give an integer-kernel replacement of ``conv`` its shape fields (the MAC count reads them) and its
    quantizers, weights and correction under the same names, so the state dict is unchanged by the conversion."""
    target.in_channels, target.out_channels, target.split = conv.in_channels, conv.out_channels, conv.split
    target.kernel_size, target.groups = conv.kernel_size, conv.groups
    target.weight, target.bias, target.act, target.act_skip = conv.weight, conv.bias, conv.act, conv.act_skip
    target.weight_skip, target.correction = conv.weight_skip, conv.correction


class QConv1d(_QConv):
    """Fake-quant ``nn.Conv1d`` (LDM's legacy attention ``qkv`` / ``proj_out``); runs as fake quantization."""

    def __init__(
        self,
        conv: nn.Conv1d,
        weight_spec: QuantSpec,
        act_spec: QuantSpec,
        num_steps: int,
        split: int | None = None,
        split_weights: bool = False,
    ):
        super().__init__(conv)
        self.weight = QuantizedWeight(conv.weight, weight_spec)
        self.act = ActQuantizer(act_spec, num_steps)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(
            self.act(x), self.weight.dequantized(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"


class QLinear(nn.Module):
    """Fake-quant ``nn.Linear``."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_spec: QuantSpec,
        act_spec: QuantSpec,
        num_steps: int,
        split: int | None = None,
        split_weights: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = QuantizedWeight(linear.weight, weight_spec)
        self.bias = _frozen_bias(linear)
        self.act = ActQuantizer(act_spec, num_steps)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act(x), self.weight.dequantized(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class QMatMul(nn.Module):
    """Fake-quant `MatMul` (attention q·kᵀ, softmax·v): both operands quantized with ``act_spec``; the softmax
    operand (``matmul.probabilities``) on the fixed range [0, 1] of an unsigned grid (zero point 0)."""

    def __init__(
        self,
        matmul: MatMul,
        weight_spec: QuantSpec | None,
        act_spec: QuantSpec,
        num_steps: int,
        split: int | None = None,
        split_weights: bool = False,
    ):
        super().__init__()
        unit, unsigned = (0.0, 1.0), dataclasses.replace(act_spec, symmetric=False)
        self.probabilities = matmul.probabilities
        a, b = (unsigned if matmul.probabilities == side else act_spec for side in "ab")
        self.act = ActQuantizer(a, num_steps, unit if matmul.probabilities == "a" else None)
        self.act_b = ActQuantizer(b, num_steps, unit if matmul.probabilities == "b" else None)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(self.act(a), self.act_b(b))
