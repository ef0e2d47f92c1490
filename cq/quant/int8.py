"""Real integer execution of fake-quant modules: `to_int8` picks the kernels by device.

CPU with VNNI or AMX (where oneDNN's u8 x s8 kernels are exact, `onednn_exact`; on older x86 CPUs they saturate
and the CPU takes the CUDA path below, on exact ``torch._int_mm``): each `QConv2d` / `QLinear` becomes an
`Int8Conv2d` / `Int8Linear` on the oneDNN int8 kernels (`cq.quant.onednn`: prepacked weights, uint8 input with
the step's scale and zero point, exact int32 accumulation, float32 output), and each attention `QMatMul` an
`Int8MatMul` on ``torch._int_mm``. Asymmetric (CacheQuant-style) weights ``W = s (q - z)``, ``q`` in [0, 255],
do not fit the kernels (they ignore weight zero points), so they run as ``q - 128`` (int8) and the remainder
``- s (z - 128) * sum_window(x)`` is added from the input's channel sum -- exact; symmetric weights
(`UniformQuantizer(weight_symmetric=True)`) need no remainder. W4 weights run in the same int8 kernels.

CUDA: linears, 1x1 convs and attention matmuls on ``torch._int_mm`` (`cq.quant.int_mm`); other convs stay fake
quantization (torch has no int8 convolution on CUDA). Every layer's mode is returned (`CompressedUNet.execution`)
and shown by ``cq report``: which layers run integer kernels and why the others do not. The float weights are
not needed: the modules are built from the fake-quant modules' integer buffers.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import ConfigError
from .backend import Backend
from .layer_table import LayerKind, fake_quant_classes, integer_classes, kind_of
from .modules import ActQuantizer
from .onednn import Int8Conv2d, Int8Linear  # re-exported: `from cq.quant.int8 import Int8Conv2d` keeps working
from .quantizer import set_submodule


__all__ = [
    "Int8Conv2d",
    "Int8Linear",
    "to_int8",
    "int8_layers",
    "int8_available",
    "onednn_exact",
]


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


def to_int8(model: nn.Module, backend: Backend | str = Backend.INT8) -> dict[str, str]:
    """Swap, in place, every convertible fake-quant module of ``model`` for its integer twin.

    Args:
        backend: a `Backend` with kernels: ``"int8"`` (alias ``"auto"``: oneDNN on the CPU where it is exact,
            ``torch._int_mm`` elsewhere), ``"onednn"`` or ``"int_mm"`` (the GPU path; on the CPU it runs too,
            which is how it is tested without a GPU).

    Returns ``{layer: "int8 (<kernel>)" | "fake-quant (<reason>)"}`` for every quantized layer.
    """
    backend = Backend.parse(backend)
    if backend.kernels is None or backend is Backend.OPENVINO:  # the runtime lowers the whole model, not layers
        kernels = [b.value for b in Backend if b.kernels is not None and b is not Backend.OPENVINO]
        raise ConfigError(f"to_int8 runs integer kernels: backend must be one of {kernels}, got {backend.value!r}")
    status: dict[str, str] = {}
    swaps = []
    for name, module in model.named_modules():
        row = kind_of(module)
        if row is None or not isinstance(module, row.fake_cls):
            continue
        device = module_device(module)
        kernel = backend
        if kernel is Backend.INT8:  # oneDNN on CPUs where it is exact (VNNI / AMX), torch._int_mm elsewhere
            kernel = Backend.ONEDNN if device.type == "cpu" and int8_available() else Backend.INT_MM
        reason, build = _plan(module, row, kernel, device)
        if reason:
            status[name] = f"fake-quant ({reason})"
            continue
        try:
            swaps.append((name, build(module)))
            status[name] = f"int8 ({'oneDNN' if build is row.onednn_cls else 'torch._int_mm'})"
        except RuntimeError as e:  # the kernel refused this shape: keep the exact fake-quant module
            status[name] = f"fake-quant (kernel refused: {str(e).splitlines()[0][:80]})"
    for name, new in swaps:
        set_submodule(model, name, new)
    return status


def module_device(module: nn.Module) -> torch.device:
    return next(iter(module.buffers())).device


def _plan(
    module: nn.Module, row: LayerKind, kernel: Backend, device: torch.device
) -> tuple[str, type[nn.Module] | None]:
    """``(reason it stays fake-quant or "", integer module class)``; a kind without a oneDNN kernel (attention
    matmuls) takes its ``torch._int_mm`` one."""
    acts = [m for m in module.children() if isinstance(m, ActQuantizer)]
    if any(a.spec.bits != 8 or a.spec.symmetric for a in acts):
        return "activations are not unsigned 8-bit", None
    if not all(bool(a.calibrated.all()) for a in acts):
        return "activations not calibrated", None
    if kernel is Backend.ONEDNN and row.onednn_cls is not None:
        if device.type != "cpu":
            return f"oneDNN int8 kernels run on the CPU; the layer is on {device}", None
        if not _onednn_present():
            return "no oneDNN int8 kernels in this torch build", None
        if not onednn_exact():
            raise ConfigError(
                "oneDNN's u8 x s8 kernels saturate on this CPU (no VNNI: pair sums clip at int16), so they would "
                "not compute the quantized model; use backend='int8' or 'int_mm' (exact torch._int_mm kernels)"
            )
        return "", row.onednn_cls
    if row.int_mm_cls is None:
        return f"{row.float_cls.__name__}: no integer kernel wired", None
    return row.int_mm_cls.refusal(module, device), row.int_mm_cls


def int8_layers(model: nn.Module) -> dict[str, int]:
    """Count of integer-kernel vs fake-quant layers in ``model``."""
    kinds = {"int8": 0, "fake-quant": 0}
    for module in model.modules():
        if isinstance(module, integer_classes()):
            kinds["int8"] += 1
        elif isinstance(module, fake_quant_classes()):
            kinds["fake-quant"] += 1
    return kinds
