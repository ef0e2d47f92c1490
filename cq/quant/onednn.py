"""oneDNN int8 modules: `QConv2d` / `QLinear` on the CPU's u8 x s8 kernels (``torch.ops.onednn``).

Prepacked int8 weights, uint8 input with the step's scale and zero point, exact int32 accumulation, float32
output. Asymmetric weights ``W = s (q - z)`` run as ``q - 128`` plus the exact remainder
``- s (z - 128) * sum_window(x)`` (the kernels ignore weight zero points). Which layers use them, and where they
are exact, is decided by `cq.quant.int8.to_int8`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.step import table_step
from .codes import input_codes, unsigned
from .modules import ActQuantizer, QConv2d, QLinear, QuantizedWeight, adopt_conv_state


__all__ = ["Int8Conv2d", "Int8Linear"]


def _signed_weight(weight: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(int8 codes, per-channel scale, per-channel remainder s*(z-128) or None)``: the kernels take the codes
    with zero weight zero points, the remainder is the asymmetric part ``W = s*codes - remainder``."""
    q, shift = weight.centred()
    scale = weight.weight_scale.float()
    return q, scale, None if weight.spec.symmetric else -scale * shift


class _Half(nn.Module):
    """One int8 convolution over a channel slice of the input (the whole input when unsplit).

    Holds only derived state (prepacked weight, non-persistent buffers); the activation table and the bias are
    passed in by the owning `Int8Conv2d`, which keeps the source module's state under its original names.
    """

    def __init__(self, conv: QConv2d, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        weight, offset = conv.weight_covering(start)  # a split conv may quantize each half's columns on its own
        q, scale, remainder = _signed_weight(weight)
        q = q[:, start - offset : stop - offset].contiguous()
        self.register_buffer("w_scale", scale.clone(), persistent=False)
        self.register_buffer("w_zero", torch.zeros(q.shape[0], dtype=torch.long), persistent=False)
        # prepacked oneDNN layout: an opaque tensor, derived from weight.weight_q (which stays the saved state)
        self.packed = torch.ops.onednn.qconv_prepack(
            q, scale, 1.0, 0, self.stride, self.padding, self.dilation, self.groups, None
        )
        self.register_buffer("remainder", torch.zeros(0) if remainder is None else remainder, persistent=False)
        self.register_buffer("box", torch.ones(1, 1, *q.shape[2:]), persistent=False)

    def forward(
        self, x: Tensor, act: ActQuantizer, bias: Tensor | None = None, accumulate: Tensor | None = None
    ) -> Tensor:
        """The convolution of this half; plus ``accumulate`` (fused in the kernel: no separate add pass)."""
        codes = input_codes(x[:, self.start : self.stop], act)
        scale, zp, channels = codes.scale, codes.zero_point, self.stop - self.start
        channel_sum = codes.exact.sum(1, keepdim=True) if self.remainder.numel() else None
        geometry = (self.stride, self.padding, self.dilation, self.groups)
        qx = (unsigned(codes), scale, zp, self.packed, self.w_scale, self.w_zero)
        # compiled: the overloads taking the step's scale as a tensor (those with fake kernels: qconv_pointwise's)
        op = torch.ops.onednn.qconv2d_pointwise
        if accumulate is None:
            conv = torch.ops.onednn.qconv_pointwise.tensor if codes.traced else op.default
            y = conv(*qx, bias, *geometry, 1.0, 0, torch.float32, "none", [], "")
        else:
            conv = op.binary_tensor if codes.traced else op.binary
            y = conv(*qx, accumulate, bias, *geometry, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")
        if self.remainder.numel():
            # sum over the window of the dequantized input (zero padding = code zp), times s*(z-128) per channel
            channel_sum.add_((128 - zp) * channels)  # integers: the window sums below are exact
            pointwise = self.box.shape[-2:] == (1, 1) and self.stride == [1, 1] and self.padding == [0, 0]
            if not pointwise:
                channel_sum = F.conv2d(channel_sum, self.box, None, self.stride, self.padding, self.dilation)
            channel_sum.mul_(scale)
            y.addcmul_(self.remainder.reshape(1, -1, 1, 1), channel_sum, value=-1.0)  # in place, in y's layout
        return y


class Int8Conv2d(nn.Module):
    """`QConv2d` on int8 kernels; a split input runs as two convolutions (one per activation table).

    Keeps the source's ``weight``, ``bias``, ``act``, ``act_skip`` and ``correction`` under the same names, so its
    ``state_dict()`` is the fake-quant module's and a converted model saves as it is.
    """

    def __init__(self, conv: QConv2d):
        super().__init__()
        adopt_conv_state(self, conv)
        c = conv.split or conv.in_channels
        self.cached = _Half(conv, 0, c)
        self.skip = _Half(conv, c, conv.in_channels) if conv.split else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.cached(x, self.act, self.bias)
        if self.correction is not None:
            y = self.correction(y, table_step())
        if self.skip is not None and torch.compiler.is_compiling():
            # the fused-sum kernel mutates its accumulator, which the compiler's functionalization cannot trace
            # through the opaque packed weight: two kernels and an add the compiler may fuse
            return y + self.skip(x, self.act_skip)
        if self.skip is not None:
            y = self.skip(x, self.act_skip, accumulate=y.contiguous(memory_format=torch.channels_last))
        return y

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, int8" + (f", split={self.split}" if self.split else "")


class Int8Linear(nn.Module):
    """`QLinear` on the oneDNN int8 linear kernel (``weight``, ``bias``, ``act`` kept under their names)."""

    def __init__(self, linear: QLinear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias, self.act = linear.weight, linear.bias, linear.act
        q, scale, remainder = _signed_weight(linear.weight)
        self.register_buffer("w_scale", scale.clone(), persistent=False)
        self.register_buffer("w_zero", torch.zeros(q.shape[0], dtype=torch.long), persistent=False)
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.register_buffer("remainder", torch.zeros(0) if remainder is None else remainder, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        codes = input_codes(x, self.act)
        scale, zp, features = codes.scale, codes.zero_point, x.shape[-1]
        total = codes.exact.sum(-1, keepdim=True) if self.remainder.numel() else None
        qx = (unsigned(codes), scale, zp, self.packed, self.w_scale, self.w_zero, self.bias)
        op = torch.ops.onednn.qlinear_pointwise
        y = (op.tensor if codes.traced else op.default)(*qx, 1.0, 0, torch.float32, "none", [], "")
        if self.remainder.numel():
            total.add_((128 - zp) * features).mul_(scale)
            y.addcmul_(self.remainder, total, value=-1.0)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
