"""Integer matrix products on ``torch._int_mm`` (int8 x int8 -> int32): attention matmuls, linears, 1x1 convs.

``torch._int_mm`` has no zero points, so both operands are centred int8 codes (``q - 128``) and the affine terms
are added back exactly. With ``a = sa (a8 + ca)`` and ``b = sb (b8 + cb)`` (``ca = 128 - za``, per-column ``cb``):

    a @ b = sa sb (a8 @ b8 + cb * rowsum(a8) + ca * colsum(b8) + K ca cb)

``a8 @ b8`` is exact in int32; the correction is a rank-one update. The same code runs on the CPU (any shape) and
on CUDA (cuBLASLt: ``M > 16``, ``K`` and ``N`` multiples of 8; small ``M`` is padded here, other shapes are
refused when converting -- see `int_mm_shape_ok`). Reference: ecosystem.md §E.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.step import table_step
from .codes import input_codes
from .modules import ActQuantizer, QConv2d, QLinear, QMatMul, QuantizedWeight, adopt_conv_state


__all__ = ["int_matmul", "int_mm_shape_ok", "IntMMLinear", "IntMMConv1x1", "Int8MatMul"]

_CUDA_MIN_ROWS = 17


def int_mm_shape_ok(k: int, n: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` takes a ``[M, k] @ [k, n]`` product on ``device`` (M is padded as needed)."""
    return device.type != "cuda" or (k % 8 == 0 and k >= 16 and n % 8 == 0)


def _shape_refusal(device: torch.device) -> str:
    return f"torch._int_mm on {device} needs K, N multiples of 8 (K >= 16)"


def int_matmul(a8: Tensor, b8: Tensor) -> Tensor:
    """``a8 @ b8`` (int8, 2-D) in int32; pads a short ``a8`` on CUDA, whose kernel needs more than 16 rows."""
    m = a8.shape[0]
    if a8.is_cuda and m < _CUDA_MIN_ROWS:
        a8 = torch.cat([a8, a8.new_zeros(32 - m, a8.shape[1])])
        return torch._int_mm(a8, b8)[:m]
    return torch._int_mm(a8, b8)


def _add_zero_point_terms(
    acc: Tensor, a_rowsum: Tensor, a_shift: float | Tensor, b_colsum: Tensor, b_shift: Tensor | float, k: int
) -> Tensor:
    """In place, the module docstring's ``acc + cb * rowsum(a8) + ca * colsum(b8) + K ca cb``."""
    b_shift = torch.as_tensor(b_shift, dtype=acc.dtype, device=acc.device)
    return acc.addcmul_(a_rowsum, b_shift).add_(a_shift * b_colsum + k * a_shift * b_shift)


def _centred_weight(weight: QuantizedWeight) -> tuple[Tensor, Tensor]:
    """``(w8ᵀ [K, N] int8, per-column shift [N])`` of a weight ``s (q - z)``: ``w = s (w8 + shift)``."""
    w8, shift = weight.centred()
    return w8.reshape(w8.shape[0], -1).t().contiguous(), shift.expand(w8.shape[0]).clone()


class _AffineGemm(nn.Module):
    """``x[..., K] -> x @ Wᵀ`` for one slice of the weight's input columns (derived, non-persistent state)."""

    def __init__(self, weight: QuantizedWeight, columns: slice):
        super().__init__()
        w8, shift = _centred_weight(weight)
        w8 = w8[columns].contiguous()
        self.register_buffer("w8", w8, persistent=False)
        self.register_buffer("w_shift", shift, persistent=False)
        self.register_buffer("w_colsum", w8.sum(0, dtype=torch.float32), persistent=False)
        self.register_buffer("w_scale", weight.weight_scale.float().expand(w8.shape[1]).clone(), persistent=False)

    def forward(self, x: Tensor, act: ActQuantizer, bias: Tensor | None = None) -> Tensor:
        codes = input_codes(x, act)
        k, ca = x.shape[-1], codes.shift
        acc = int_matmul(codes.centred.reshape(-1, k).contiguous(), self.w8).float()
        rowsum = codes.exact.sum(-1).reshape(-1, 1)
        y = _add_zero_point_terms(acc, rowsum, ca, self.w_colsum, self.w_shift, k).mul_(self.w_scale * codes.scale)
        if bias is not None:
            y.add_(bias)
        return y.reshape(*x.shape[:-1], -1)


class IntMMLinear(nn.Module):
    """`QLinear` on ``torch._int_mm`` (the GPU path; exact like the oneDNN one). Keeps the source's state."""

    def __init__(self, linear: QLinear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias, self.act = linear.weight, linear.bias, linear.act
        self.gemm = _AffineGemm(linear.weight, slice(None))

    @staticmethod
    def refusal(linear: QLinear, device: torch.device) -> str:
        """Why ``linear`` cannot run on ``torch._int_mm`` on ``device`` ("" when it can)."""
        return "" if int_mm_shape_ok(linear.in_features, linear.out_features, device) else _shape_refusal(device)

    def forward(self, x: Tensor) -> Tensor:
        return self.gemm(x, self.act, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int_mm"


class IntMMConv1x1(nn.Module):
    """A 1x1, stride-1 `QConv2d` as a GEMM over pixels on ``torch._int_mm``; a split input runs as two GEMMs."""

    def __init__(self, conv: QConv2d):
        super().__init__()
        adopt_conv_state(self, conv)
        c = conv.split or conv.in_channels
        self.cached = _AffineGemm(conv.weight, slice(0, c))
        self.skip = None
        if conv.split:  # the skip half's columns: in their own quantized weight, or after the cached half's
            weight, offset = conv.weight_covering(c)
            self.skip = _AffineGemm(weight, slice(c - offset, None))

    @staticmethod
    def supports(conv: QConv2d) -> bool:
        return (
            tuple(conv.kernel_size) == (1, 1)
            and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (0, 0)
            and conv.groups == 1
        )

    @classmethod
    def refusal(cls, conv: QConv2d, device: torch.device) -> str:
        """Why ``conv`` cannot run on ``torch._int_mm`` on ``device`` ("" when it can)."""
        if not cls.supports(conv):
            size = "x".join(map(str, conv.kernel_size))
            return f"{size} conv: torch has no int8 convolution on {device}"
        widths = [conv.split, conv.in_channels - conv.split] if conv.split else [conv.in_channels]
        ok = all(int_mm_shape_ok(k, conv.out_channels, device) for k in widths)
        return "" if ok else _shape_refusal(device)

    def forward(self, x: Tensor) -> Tensor:
        pixels = x.permute(0, 2, 3, 1)  # NHWC view: channels last in memory when x is channels-last
        c = self.split or self.in_channels
        y = self.cached(pixels[..., :c], self.act, self.bias).permute(0, 3, 1, 2)
        if self.correction is not None:
            y = self.correction(y, table_step())
        if self.skip is not None:
            y = y + self.skip(pixels[..., c:], self.act_skip).permute(0, 3, 1, 2)
        return y

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, int_mm" + (f", split={self.split}" if self.split else "")


class Int8MatMul(nn.Module):
    """`QMatMul` (attention ``q·kᵀ``, ``softmax·v``) on ``torch._int_mm``, one product per batch entry.

    On CUDA, products whose ``K`` or ``N`` the kernel refuses run as fake quantization (same result)."""

    def __init__(self, matmul: QMatMul):
        super().__init__()
        self.act, self.act_b = matmul.act, matmul.act_b

    @staticmethod
    def refusal(matmul: QMatMul, device: torch.device) -> str:
        """Never refused when converting: shapes are known only per call, and `forward` falls back then."""
        return ""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if not int_mm_shape_ok(a.shape[-1], b.shape[-1], a.device):  # shapes are known only now: fall back
            return torch.matmul(self.act(a), self.act_b(b))
        a_codes, b_codes = input_codes(a, self.act), input_codes(b, self.act_b)
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a8 = a_codes.centred.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b8 = b_codes.centred.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        acc = torch.stack([int_matmul(a8[i], b8[i]) for i in range(a8.shape[0])]).float()
        k, ca, cb = a.shape[-1], a_codes.shift, b_codes.shift
        rowsum = a_codes.exact.sum(-1, keepdim=True).expand(*batch, a.shape[-2], 1).reshape(-1, a.shape[-2], 1)
        colsum = b_codes.exact.sum(-2, keepdim=True).expand(*batch, 1, b.shape[-1]).reshape(-1, 1, b.shape[-1])
        acc = _add_zero_point_terms(acc, rowsum, ca, colsum, cb, k).mul_(a_codes.scale * b_codes.scale)
        return acc.reshape(*batch, a.shape[-2], b.shape[-1])

    def extra_repr(self) -> str:
        return "int_mm"
