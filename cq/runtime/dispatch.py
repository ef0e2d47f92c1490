"""`cpu_int8_path`: which exact int8 path runs a quantized UNet fastest on this CPU, decided from what is installed
and the CPU's features.

Measured with ``bench/peers.py`` and ``cq demo`` (2 threads; docs/benchmarks.md), against fp32 eager:

- OpenVINO with every weight in int8 (symmetric weights whose codes the CPU sums exactly): 2.7-3.5x on the DDPM
  CIFAR-10 UNet on an AVX-512-VNNI EPYC, 1.9-2.4x on an AVX2 EPYC (W7A8; NNCF's int8 1.7-2.0x there) -- the
  fastest path wherever it applies;
- OpenVINO keeping some weights float (8-bit codes without VNNI, or weights it cannot take in int8): 1.0-1.6x on
  the CIFAR-10 UNet and 1.2x (W8A8) / 1.9x (CacheQuant) on the 1.6 M-parameter demo model (W8A8 on an AVX2
  EPYC: 1.1-1.4x) -- never slower than float on any model measured;
- PyTorch's oneDNN kernels (exact only with VNNI / AMX): 1.3-1.9x on the CIFAR-10 UNet but 0.7x on the demo
  model (a quantize and a dequantize per layer in eager PyTorch outweigh its small convolutions), so it runs only
  where OpenVINO is not installed;
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
    """``(backend, why)`` for ``CompressedUNet.to_int8("int8")`` on the CPU: `Backend.OPENVINO` wherever OpenVINO
    is installed and the UNet is unconditional (the runtime's graphs take no conditioning; every layer in int8
    where `layer_plan` says so, float weights elsewhere), else
    `Backend.INT8`'s oneDNN kernels where they are exact (VNNI / AMX). Raises `BackendUnavailableError` (naming
    the install and the by-name alternative) where neither applies."""
    if openvino_available() and _unconditional(unet):
        plan = layer_plan(unet)
        floats = sum(mode != "int8" for mode in plan.values())
        if not floats:
            return Backend.OPENVINO, "OpenVINO: every layer's codes are exact on this CPU's int8 kernels"
        return Backend.OPENVINO, (
            f"OpenVINO: {len(plan) - floats}/{len(plan)} layers in int8, the rest keep float weights where this "
            "CPU's int8 kernels would not sum them exactly"
        )
    if int8_available():
        return Backend.INT8, "oneDNN: exact on this CPU (VNNI / AMX); pip install 'cq[openvino]' runs faster"
    runtime = (
        "cq's OpenVINO graphs take no conditioning, so they cannot run this conditional UNet"
        if openvino_available()
        else "install the OpenVINO runtime (pip install 'cq[openvino]') for unconditional UNets"
    )
    raise BackendUnavailableError(
        "no exact int8 path on this CPU runs faster than float: its oneDNN u8 x s8 kernels saturate (no VNNI); "
        f"{runtime}. Keep fake quantization (backend='fake'), or ask for the exact but slower PyTorch kernels by "
        "name: to_int8('int_mm')"
    )


def _unconditional(unet: nn.Module) -> bool:
    """Whether ``unet`` takes no conditioning (`CacheableUNet.example_cond` is None): what the OpenVINO graphs run."""
    example = getattr(unet, "example_cond", None)
    return example is not None and example() is None
