"""Real integer execution of fake-quant modules: `to_int8` picks the kernels by device.

CPU with VNNI or AMX (where oneDNN's u8 x s8 kernels are exact, `onednn_exact`; on older x86 CPUs they saturate
and the CPU takes the CUDA path below, on exact ``torch._int_mm``): each `QConv2d` / `QLinear` becomes an
`Int8Conv2d` / `Int8Linear` on the oneDNN int8 kernels (prepacked
weights, uint8 input with the step's scale and zero point, exact int32 accumulation, float32 output), and each
attention `QMatMul` an `Int8MatMul` on ``torch._int_mm``. Asymmetric (CacheQuant-style) weights ``W = s (q - z)``,
``q`` in [0, 255], do not fit the kernels (they ignore weight zero points), so they run as ``q - 128`` (int8) and
the remainder ``- s (z - 128) * sum_window(x)`` is added from the input's channel sum -- exact; symmetric weights
(`Uniform(weight_symmetric=True)`) need no remainder. W4 weights run in the same int8 kernels.

CUDA: linears, 1x1 convs and attention matmuls on ``torch._int_mm`` (`cq.quant.int_mm`); other convs stay fake
quantization (torch has no int8 convolution on CUDA). Every layer's mode is returned (`CompressedUNet.execution`)
and shown by ``cq report``: which layers run integer kernels and why the others do not. The float weights are
not needed: the modules are built from the fake-quant modules' integer buffers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..step import current_step
from .codes import input_codes, unsigned
from .int_mm import Int8MatMul, IntMMConv1x1, IntMMLinear, int_mm_shape_ok
from .modules import QMODULES, ActQuantizer, QConv1d, QConv2d, QLinear, QMatMul, QuantizedWeight
from .quantizer import set_submodule


__all__ = [
    "Int8Conv2d",
    "Int8Linear",
    "to_int8",
    "int8_layers",
    "int8_available",
    "onednn_exact",
    "INT8_MODULES",
    "BACKENDS",
]

BACKENDS = ("auto", "onednn", "int_mm")


def int8_available() -> bool:
    """Whether this torch build has the oneDNN int8 kernels (x86 CPUs) *and* they compute exactly here
    (`onednn_exact`): cq only ever runs integer kernels that equal fake quantization."""
    return _onednn_present() and onednn_exact()


def _onednn_present() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    return ops is not None and hasattr(ops, "qconv2d_pointwise") and torch.backends.mkldnn.is_available()


@functools.lru_cache(maxsize=1)
def onednn_exact() -> bool:
    """Whether oneDNN's u8 x s8 kernels accumulate exactly on this CPU (a one-off probe, cached per process).

    CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply u8 x s8 pairs with ``vpmaddubsw``, which saturates
    each pair's sum at int16: ``255 * 127 * 2 > 32767``. The result is then silently wrong (measured on an AVX2
    EPYC: 255 * 127 * 64 came back as 1,048,544 instead of 2,072,640). On such CPUs cq uses ``torch._int_mm``
    (exact) where it can and keeps the rest fake-quant.
    """
    if not _onednn_present():
        return False
    x = torch.full((1, 64), 255, dtype=torch.uint8)
    w = torch.full((2, 64), 127, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    ones, zeros = torch.ones(2), torch.zeros(2, dtype=torch.long)
    y = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], "")
    return bool((y == 255 * 127 * 64).all())


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
        if accumulate is None:
            y = torch.ops.onednn.qconv2d_pointwise(*qx, bias, *geometry, 1.0, 0, torch.float32, "none", [], "")
        else:
            y = torch.ops.onednn.qconv2d_pointwise.binary(
                *qx, accumulate, bias, *geometry, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], ""
            )
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
        self.in_channels, self.out_channels, self.split = conv.in_channels, conv.out_channels, conv.split
        self.kernel_size, self.groups = conv.kernel_size, conv.groups  # the MAC count reads them
        self.weight, self.bias, self.act, self.act_skip = conv.weight, conv.bias, conv.act, conv.act_skip
        self.weight_skip, self.correction = conv.weight_skip, conv.correction
        c = conv.split or conv.in_channels
        self.cached = _Half(conv, 0, c)
        self.skip = _Half(conv, c, conv.in_channels) if conv.split else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.cached(x, self.act, self.bias)
        if self.correction is not None:
            y = self.correction(y, current_step())
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
        y = torch.ops.onednn.qlinear_pointwise(*qx, 1.0, 0, torch.float32, "none", [], "")
        if self.remainder.numel():
            total.add_((128 - zp) * features).mul_(scale)
            y.addcmul_(self.remainder, total, value=-1.0)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


INT8_MODULES = (Int8Conv2d, Int8Linear, Int8MatMul, IntMMLinear, IntMMConv1x1)
FAKE_QUANT_MODULES = tuple(QMODULES.values())


def to_int8(model: nn.Module, backend: str = "auto") -> dict[str, str]:
    """Swap, in place, every convertible fake-quant module of ``model`` for its integer twin.

    Args:
        backend: ``"auto"`` (oneDNN on the CPU, ``torch._int_mm`` on CUDA), ``"onednn"`` or ``"int_mm"`` (the
            GPU path; on the CPU it runs too, which is how it is tested without a GPU).

    Returns ``{layer: "int8 (<kernel>)" | "fake-quant (<reason>)"}`` for every quantized layer.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    status: dict[str, str] = {}
    swaps = []
    for name, module in model.named_modules():
        if not isinstance(module, FAKE_QUANT_MODULES):
            continue
        device = _device(module)
        kernel = backend
        if kernel == "auto":  # oneDNN on CPUs where it is exact (VNNI / AMX), torch._int_mm elsewhere
            kernel = "onednn" if device.type == "cpu" and int8_available() else "int_mm"
        reason, build = _plan(module, kernel, device)
        if reason:
            status[name] = f"fake-quant ({reason})"
            continue
        try:
            swaps.append((name, build(module)))
            status[name] = f"int8 ({'torch._int_mm' if build in _INT_MM else 'oneDNN'})"
        except RuntimeError as e:  # the kernel refused this shape: keep the exact fake-quant module
            status[name] = f"fake-quant (kernel refused: {str(e).splitlines()[0][:80]})"
    for name, new in swaps:
        set_submodule(model, name, new)
    return status


_INT_MM = (IntMMLinear, IntMMConv1x1, Int8MatMul)


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.buffers())).device


def _plan(module: nn.Module, kernel: str, device: torch.device) -> tuple[str, type[nn.Module] | None]:
    """``(reason it stays fake-quant or "", integer module class)``."""
    acts = [m for m in module.children() if isinstance(m, ActQuantizer)]
    if any(a.spec.bits != 8 or a.spec.symmetric for a in acts):
        return "activations are not unsigned 8-bit", None
    if not all(bool(a.calibrated.all()) for a in acts):
        return "activations not calibrated", None
    if isinstance(module, QConv1d):
        return "Conv1d: no integer kernel wired", None
    if isinstance(module, QMatMul):
        return "", Int8MatMul
    if kernel == "onednn":
        if device.type != "cpu":
            return f"oneDNN int8 kernels run on the CPU; the layer is on {device}", None
        if not _onednn_present():
            return "no oneDNN int8 kernels in this torch build", None
        if not onednn_exact():
            raise ConfigError(
                "oneDNN's u8 x s8 kernels saturate on this CPU (no VNNI: pair sums clip at int16), so they would "
                "not compute the quantized model; use backend='auto' or 'int_mm' (exact torch._int_mm kernels)"
            )
        return "", Int8Conv2d if isinstance(module, QConv2d) else Int8Linear
    if isinstance(module, QConv2d):
        if not IntMMConv1x1.supports(module):
            size = "x".join(map(str, module.kernel_size))
            return f"{size} conv: torch has no int8 convolution on {device}", None
        split = module.split
        widths, n = ([split, module.in_channels - split] if split else [module.in_channels]), module.out_channels
    else:
        widths, n = [module.in_features], module.out_features
    if not all(int_mm_shape_ok(k, n, device) for k in widths):
        return f"torch._int_mm on {device} needs K, N multiples of 8 (K >= 16)", None
    return "", IntMMConv1x1 if isinstance(module, QConv2d) else IntMMLinear


def int8_layers(model: nn.Module) -> dict[str, int]:
    """Count of integer-kernel vs fake-quant layers in ``model``."""
    kinds = {"int8": 0, "fake-quant": 0}
    for module in model.modules():
        if isinstance(module, INT8_MODULES):
            kinds["int8"] += 1
        elif isinstance(module, FAKE_QUANT_MODULES):
            kinds["fake-quant"] += 1
    return kinds
