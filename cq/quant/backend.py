"""`Backend`: how quantized layers execute -- fake quantization, or integer kernels (picked by device, or named)."""

from __future__ import annotations

import enum

from ..errors import ConfigError


__all__ = ["Backend"]


class Backend(enum.StrEnum):
    """The execution backends of quantized layers; a `str`, so recipes save it as ``"int8"`` etc.

    ``FAKE``: float kernels simulating quantization (the accuracy reference). ``INT8``: integer kernels picked by
    device (oneDNN on CPUs where it is exact, ``torch._int_mm`` elsewhere; ``"auto"`` is its older name).
    ``ONEDNN`` / ``INT_MM``: that kernel family. ``OPENVINO``: the whole model lowered to the OpenVINO runtime
    (`cq.runtime`; `CompressedUNet.to_int8` picks it for ``INT8`` on x86 CPUs without VNNI).
    """

    FAKE = "fake"
    INT8 = "int8"
    ONEDNN = "onednn"
    INT_MM = "int_mm"
    OPENVINO = "openvino"

    @classmethod
    def parse(cls, value: str) -> Backend:
        """``value`` as a `Backend`; `ConfigError` naming the valid values for anything else."""
        return cls(value)

    @classmethod
    def _missing_(cls, value: object) -> Backend:
        if value == "auto":
            return cls.INT8
        valid = [b.value for b in cls]
        raise ConfigError(f"backend must be one of {valid} ('auto' = 'int8'), got {value!r}")

    @property
    def kernels(self) -> Backend | None:
        """The kernels `cq.quant.int8.to_int8` runs: ``ONEDNN``, ``INT_MM``, ``INT8`` (either, chosen per layer
        by its device), or None for ``FAKE`` (no conversion)."""
        return None if self is Backend.FAKE else self
