"""What this CPU's integer kernels can do exactly: its instruction-set flags, and the widest int8 weight they take.

x86 CPUs without VNNI multiply u8 x s8 pairs with ``vpmaddubsw``, whose pair sums saturate at int16: with uint8
activations ``255 * 127 * 2 > 32767``. oneDNN (under PyTorch and OpenVINO) and ONNX Runtime's u8 x s8 kernels then
return silently wrong sums. Weights whose codes stay within ``[-64, 64]`` cannot overflow (``255 * 64 * 2 =
32640``), so on such CPUs a layer runs on int8 kernels only when its weight codes fit 7 bits
(`UniformQuantizer(weight_bits=7, weight_symmetric=True)` makes every layer fit); VNNI (``vpdpbusd``) and AMX
accumulate in int32 and take any 8-bit codes.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path


__all__ = ["cpu_flags", "cpu_line", "has_vnni", "int8_weight_limit"]

_SHOWN = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_vnni() -> bool:
    """Whether int8 dot products accumulate in int32 without an int16 step (AVX-512 VNNI, AVX-VNNI or AMX)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_weight_limit() -> int:
    """The largest weight code magnitude the CPU's u8 x s8 kernels sum exactly: 127 with VNNI / AMX, else 64."""
    return 127 if has_vnni() or platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86") else 64


def cpu_line() -> str:
    """One line for benchmark tables: model name and the int8-relevant flags, present (+) or absent (-)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    return f"{model}: " + " ".join(("+" if f in flags else "-") + f for f in _SHOWN)
