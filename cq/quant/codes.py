"""Integer codes of an activation for the integer kernels, bit-identical to fake quantization's.

`input_codes` applies `cq.quant.affine.quantize`'s arithmetic op for op (an add and a multiply, then ``floor``
and ``clamp``), in place, and keeps the codes *centred*: ``q - 128`` as int8. Centred codes are what
``torch._int_mm`` multiplies (signed x signed); `unsigned` turns them into the uint8 codes the oneDNN kernels
take by flipping the sign bit of each byte. Casting float -> int8 is vectorized where float -> uint8 is not (it
cost more than all the rest together), so the whole path is about 3x faster than a naive ``round().to(uint8)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..core.step import step_row, table_step
from .modules import ActQuantizer


__all__ = ["InputCodes", "input_codes", "unsigned"]


class InputCodes(NamedTuple):
    """``x ~= scale * (centred + 128 - zero_point)``; ``exact`` holds ``centred`` as float (integer-valued).

    ``scale`` / ``zero_point`` are Python numbers in eager mode and 0-d tensors (the step's table row, gathered
    with the tensor step) while `torch.compile` traces: reading them back as numbers would break the graph and
    specialize it on one step's values."""

    centred: Tensor  # int8, q - 128, in x's memory layout
    exact: Tensor  # float32, the same values: row / window sums without a cast
    scale: float | Tensor
    zero_point: int | Tensor

    @property
    def traced(self) -> bool:
        """Whether the scale and zero point are tensors (a compiled graph): kernels take their tensor overloads."""
        return isinstance(self.scale, Tensor)

    @property
    def shift(self) -> int | Tensor:
        """``128 - zero_point``: dequantized value = scale * (centred + shift)."""
        return 128 - self.zero_point


def input_codes(x: Tensor, act: ActQuantizer) -> InputCodes:
    """Codes of ``x`` with the table of the current step (``act`` must be unsigned 8-bit and calibrated)."""
    if act.spec.symmetric or act.spec.bits != 8:
        raise NotImplementedError("the integer kernels take unsigned 8-bit activations")
    i = table_step() if act.spec.per_step else 0
    scale, zp = step_row(act.scale, i), step_row(act.zero_point, i)
    exact = torch.add(x, (zp + 0.5) * scale).mul_(torch.reciprocal(scale)).floor_().clamp_(0, 255).sub_(128)
    if torch.compiler.is_compiling():
        return InputCodes(exact.to(torch.int8), exact, scale, zp.to(torch.int64))
    return InputCodes(exact.to(torch.int8), exact, float(scale), int(zp))


def unsigned(codes: InputCodes) -> Tensor:
    """uint8 codes ``q`` (a 4-D input channels-last, as the oneDNN kernels want it); reuses the int8 buffer."""
    q = codes.centred.view(torch.uint8).bitwise_xor_(128)
    return q.contiguous(memory_format=torch.channels_last) if q.ndim == 4 else q
