"""`cpu_int8_path`: which exact int8 path runs a quantized UNet fastest on this CPU, decided from its features.

Measured with ``bench/peers.py`` (DDPM CIFAR-10 UNet, 2 threads; docs/benchmarks.md), against fp32 eager:

- OpenVINO with every weight in int8 (symmetric weights whose codes the CPU sums exactly): 2.7-3.5x on an
  AVX-512-VNNI EPYC, 2-2.5x on an AVX2 EPYC -- the fastest path wherever it applies;
- PyTorch's oneDNN kernels (exact only with VNNI / AMX): 1.3-1.9x, also for weights with zero points;
- OpenVINO keeping float weights (asymmetric weights, or 8-bit codes without VNNI): 1.0-1.6x;
- ``torch._int_mm`` on the CPU (1x1 convs and GEMMs only): 0.2x -- slower than float, never picked here.
"""

from __future__ import annotations

from torch import nn

from ..errors import BackendUnavailableError
from ..quant.backend import Backend
from ..quant.int8 import int8_available
from .lower import layer_plan
from .openvino import openvino_available


__all__ = ["cpu_int8_path"]


def cpu_int8_path(unet: nn.Module) -> tuple[Backend, str]:
    """``(backend, why)`` for ``CompressedUNet.to_int8("int8")`` on the CPU: `Backend.OPENVINO` where OpenVINO is
    installed and runs every layer in int8 (`layer_plan`), else `Backend.ONEDNN`'s kernels where they are exact,
    else OpenVINO with float weights where int8 would not be exact. Raises `BackendUnavailableError` (naming the
    install and the by-name alternative) where no path is faster than float."""
    has_openvino = openvino_available()
    if has_openvino and all(mode == "int8" for mode in layer_plan(unet).values()):
        return Backend.OPENVINO, "OpenVINO: every layer's codes are exact on this CPU's int8 kernels"
    if int8_available():
        return Backend.INT8, "oneDNN: exact on this CPU (VNNI / AMX)"
    if has_openvino:
        return Backend.OPENVINO, "OpenVINO: float weights where this CPU's int8 kernels would not sum them exactly"
    raise BackendUnavailableError(
        "no exact int8 path on this CPU runs faster than float: its oneDNN u8 x s8 kernels saturate (no VNNI). "
        "Install the OpenVINO runtime (pip install 'cq[openvino]'), or ask for the exact but slower PyTorch "
        "kernels by name: to_int8('int_mm')"
    )
