"""Quantization specs as values: bit width, symmetry, granularity, per-step tables, range search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError


__all__ = ["QuantSpec", "ScaleMethod"]

ScaleMethod = Literal["minmax", "percentile", "mse"]


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        bits: 2..8.
        symmetric: zero point fixed at 0 and a signed grid ``[-(2^(b-1)-1), 2^(b-1)-1]``; otherwise an unsigned
            grid ``[0, 2^b - 1]`` with a zero point (zero is always exactly representable).
        per_channel: one scale per output channel (axis 0; weights) instead of one per tensor.
        per_step: one (scale, zero point) per sampling step (CacheQuant's activation tables).
        method: range search -- ``minmax``; ``percentile`` (clip at ``percentile`` / ``1 - percentile``);
            ``mse``: shrink the min-max range by ``1 - 0.01 i``, i = 0, 2, ..., 78 (40 candidates) and keep the
            one with the lowest ``mean |x - q(x)|^p`` (Q-Diffusion / CacheQuant, p = 2.4).
        percentile: quantile for ``method="percentile"``.
        p: exponent of the ``mse`` search error.
    """

    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    per_step: bool = False
    method: ScaleMethod = "mse"
    percentile: float = 0.9999
    p: float = 2.4

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"QuantSpec.bits must be an int in [2, 8], got {self.bits!r}")
        if self.method not in ("minmax", "percentile", "mse"):
            raise ConfigError(f"QuantSpec.method must be 'minmax', 'percentile' or 'mse', got {self.method!r}")
        if not 0.5 < self.percentile <= 1.0:
            raise ConfigError(f"QuantSpec.percentile must be in (0.5, 1], got {self.percentile}")
        if not self.p > 0:
            raise ConfigError(f"QuantSpec.p must be > 0, got {self.p}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1
