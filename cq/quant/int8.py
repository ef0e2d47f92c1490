"""Real integer execution of fake-quant modules (CPU: oneDNN int8 convolution / linear kernels).

`to_int8(model)` swaps each `QConv2d` / `QLinear` for an `Int8Conv2d` / `Int8Linear` computing the *same*
function with integer kernels: the input is quantized to uint8 with the step's (scale, zero point), the weight
is prepacked int8, the int32 accumulation is exact and the kernel writes float32. Asymmetric (CacheQuant-style)
weights ``W = s (q - z)`` with ``q`` in [0, 255] do not fit the kernels (they ignore weight zero points), so they run
as ``q - 128`` (int8) and the remainder ``- s (z - 128) * sum_window(x)`` is added from a one-channel box sum of
the dequantized input -- exact, and about 1/C_out of the conv's work. W4 weights run in the same int8 kernels.

Falls back (and says so in `int8_layers`): `QMatMul` (attention matmuls, a few % of the MACs), layers on devices
other than the CPU, and anything the kernels refuse at conversion time. The float weights are not needed: the
modules are built from the fake-quant modules' integer buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..step import current_step
from .modules import ActQuantizer, QConv2d, QLinear, QuantizedWeight


__all__ = ["Int8Conv2d", "Int8Linear", "to_int8", "int8_layers", "int8_available"]


def int8_available() -> bool:
    """Whether this torch build has the oneDNN int8 kernels (x86 CPUs)."""
    ops = getattr(torch.ops, "onednn", None)
    return ops is not None and hasattr(ops, "qconv2d_pointwise") and torch.backends.mkldnn.is_available()


def _quantize_input(x: Tensor, act: ActQuantizer) -> tuple[Tensor, float, int]:
    """uint8 codes of ``x`` with the step's table (same rounding as `fake_quantize`)."""
    i = current_step() if act.spec.per_step else 0
    scale, zp = float(act.scale[i]), int(act.zero_point[i])
    if act.spec.symmetric or act.spec.bits != 8:
        raise NotImplementedError("int8 kernels take unsigned 8-bit activations")
    q = torch.div(x, scale).round_().add_(zp).clamp_(0, 255).to(torch.uint8)  # as fake_quantize: x / s
    return q, scale, zp


def _signed_weight(weight: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(int8 codes, per-channel scale, per-channel remainder s*(z-128) or None)``."""
    q, scale = weight.weight_q, weight.weight_scale.float()
    if weight.spec.symmetric:
        return q.to(torch.int8), scale, None
    shifted = (q.to(torch.int16) - 128).to(torch.int8)
    remainder = scale * (weight.weight_zero_point.float() - 128)
    return shifted, scale, remainder


class _Half(nn.Module):
    """One int8 convolution over a channel slice of the input (the whole input when unsplit)."""

    def __init__(self, conv: QConv2d, start: int, stop: int, act: ActQuantizer, with_bias: bool):
        super().__init__()
        self.start, self.stop, self.act = start, stop, act
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        w = conv.weight
        q, scale, remainder = _signed_weight(w)
        q = q[:, start:stop].contiguous()
        self.register_buffer("w_scale", scale.clone())
        self.register_buffer("w_zero", torch.zeros(q.shape[0], dtype=torch.long))
        # prepacked oneDNN layout: an opaque tensor, kept out of state_dict (save the fake-quant model instead)
        self.packed = torch.ops.onednn.qconv_prepack(
            q, scale, 1.0, 0, self.stride, self.padding, self.dilation, self.groups, None
        )
        self.register_buffer("remainder", remainder if remainder is not None else torch.zeros(0))
        self.register_buffer("box", torch.ones(1, 1, *q.shape[2:]))
        self.bias = conv.bias if with_bias else None

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, self.start : self.stop]
        xq, scale, zp = _quantize_input(x.contiguous(memory_format=torch.channels_last), self.act)
        y = torch.ops.onednn.qconv2d_pointwise(
            xq,
            scale,
            zp,
            self.packed,
            self.w_scale,
            self.w_zero,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
        if self.remainder.numel():
            # sum over the window of the dequantized input (zero padding = code zp), times s*(z-128) per channel
            centered = xq.sum(1, keepdim=True, dtype=torch.float32).sub_(zp * xq.shape[1]).mul_(scale)
            pointwise = self.box.shape[-2:] == (1, 1) and self.stride == [1, 1] and self.padding == [0, 0]
            window = centered if pointwise else F.conv2d(centered, self.box, None, self.stride, self.padding,
                                                         self.dilation)
            y.addcmul_(self.remainder.reshape(1, -1, 1, 1), window, value=-1.0)  # in place, in y's layout
        return y


class Int8Conv2d(nn.Module):
    """`QConv2d` on int8 kernels; a split input runs as two convolutions (one per activation table)."""

    def __init__(self, conv: QConv2d):
        super().__init__()
        self.in_channels, self.out_channels, self.split = conv.in_channels, conv.out_channels, conv.split
        if conv.split:
            self.cached = _Half(conv, 0, conv.split, conv.act, with_bias=True)
            self.skip = _Half(conv, conv.split, conv.in_channels, conv.act_skip, with_bias=False)
        else:
            self.cached = _Half(conv, 0, conv.in_channels, conv.act, with_bias=True)
            self.skip = None
        self.correction = conv.correction

    def forward(self, x: Tensor) -> Tensor:
        y = self.cached(x)
        if self.correction is not None:
            y = self.correction(y, current_step())
        if self.skip is not None:
            y = y + self.skip(x)
        return y

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, int8" + (f", split={self.split}" if self.split else "")


class Int8Linear(nn.Module):
    """`QLinear` on the oneDNN int8 linear kernel."""

    def __init__(self, linear: QLinear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.act = linear.act
        q, scale, remainder = _signed_weight(linear.weight)
        self.register_buffer("w_scale", scale.clone())
        self.register_buffer("w_zero", torch.zeros(q.shape[0], dtype=torch.long))
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.register_buffer("remainder", remainder if remainder is not None else torch.zeros(0))
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        xq, scale, zp = _quantize_input(x, self.act)
        y = torch.ops.onednn.qlinear_pointwise(
            xq, scale, zp, self.packed, self.w_scale, self.w_zero, self.bias, 1.0, 0, torch.float32, "none", [], ""
        )
        if self.remainder.numel():
            total = xq.sum(-1, keepdim=True, dtype=torch.float32).sub_(zp * xq.shape[-1]).mul_(scale)
            y.addcmul_(self.remainder, total, value=-1.0)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def to_int8(model: nn.Module) -> dict[str, str]:
    """Swap, in place, every convertible fake-quant module of ``model`` for its int8 twin.

    Returns ``{layer: "int8" | "fake-quant (<reason>)"}`` for every quantized layer.
    """
    status: dict[str, str] = {}
    if not int8_available():
        for name, module in model.named_modules():
            if isinstance(module, QConv2d | QLinear):
                status[name] = "fake-quant (no oneDNN int8 kernels in this torch build)"
        return status
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, QConv2d | QLinear):
            reason = _unsupported(module)
            if reason:
                status[name] = f"fake-quant ({reason})"
                continue
            try:
                swaps.append((name, Int8Conv2d(module) if isinstance(module, QConv2d) else Int8Linear(module)))
                status[name] = "int8"
            except RuntimeError as e:  # the kernel refused this shape: keep the exact fake-quant module
                status[name] = f"fake-quant (kernel refused: {str(e).splitlines()[0][:80]})"
        elif type(module).__name__ == "QMatMul":
            status[name] = "fake-quant (attention matmul: no int8 batched kernel)"
        elif type(module).__name__ == "QConv1d":
            status[name] = "fake-quant (Conv1d: not converted yet)"
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return status


def _unsupported(module: nn.Module) -> str:
    if module.act.spec.bits != 8 or module.act.spec.symmetric:
        return f"activations are {module.act.spec.bits}-bit {'signed' if module.act.spec.symmetric else ''}"
    if isinstance(module, QConv2d) and module.act_skip is not None and module.act_skip.spec.bits != 8:
        return "split activations are not 8-bit"
    device = module.weight.weight_q.device
    if device.type != "cpu":
        return f"int8 kernels run on the CPU; the layer is on {device}"
    return ""


def int8_layers(model: nn.Module) -> dict[str, int]:
    """Count of int8 vs fake-quant layers in ``model``."""
    kinds = {"int8": 0, "fake-quant": 0}
    for module in model.modules():
        if isinstance(module, Int8Conv2d | Int8Linear):
            kinds["int8"] += 1
        elif type(module).__name__ in ("QConv2d", "QConv1d", "QLinear", "QMatMul"):
            kinds["fake-quant"] += 1
    return kinds
