"""CacheQuant's quantizer (after Q-Diffusion): asymmetric per-channel weights, per-step activation tables.

Weights: asymmetric, per output channel, L_2.4 range-shrink search (algorithms.md §4.1). Activations: asymmetric,
per tensor, one (scale, zero point) per sampling step, calibrated on the cached model with 32 samples at refresh
steps and 8 at cached steps (CacheQuant §4.3). Layers matching ``keep_8bit`` (by name, not by list index as the
reference) keep 8-bit weights and activations -- it matters for W4 settings.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ..calib.replay import CalibrationBatch, every_step
from ..errors import ConfigError
from ..models.layers import MatMul
from ..registry import QUANTIZERS, deprecated_names
from .quantizer import Quantizer
from .spec import QuantSpec, ScaleMethod


if TYPE_CHECKING:
    from ..calib.trace import Trace

__all__ = ["UniformQuantizer"]


@QUANTIZERS.register("uniform")
@dataclass(frozen=True, kw_only=True)
class UniformQuantizer(Quantizer):
    """Uniform affine PTQ with per-step activation tables (CacheQuant / Q-Diffusion style).

    Args:
        weight_bits, act_bits: 2..8.
        weight_symmetric: signed weights with a zero point of 0 (CacheQuant's are asymmetric). Symmetric weights
            run on the int8 kernels without the window-sum term asymmetric weights need (`cq.quant.int8`).
        attention_symmetric: signed 8-bit grids with a zero point of 0 for the attention matmuls' operands other
            than the softmax (q, k, v; the softmax keeps its unsigned [0, 1] grid, whose zero point is 0 too).
            OpenVINO's int8 matmul kernels take no zero points, so only such matmuls run on them
            (`cq.runtime.lower`); CacheQuant's operands are asymmetric (default).
        weight_method, act_method: range search, ``"mse"`` (default), ``"minmax"`` or ``"percentile"``.
        per_step: one activation table per sampling step (False: one shared range).
        activation_tables: with ``per_step``, ``"per_step"`` (CacheQuant: one (scale, zero point) per step) or
            ``"per_group"``: one per cache group (the steps sharing a refresh, from the fitted schedule), the union
            of the group's per-step ranges -- scales then change only at refresh steps (deployment with fixed
            scales); the error cost is measured in the README ("Deployable activation tables").
        keep_8bit: fnmatch patterns of layers kept at 8 bits (first and last conv by default, when quantized).
        float_io: keep the UNet's input and output layers (``unet.io_layers()``) in float -- a departure from
            CacheQuant, which runs them at 8 bits: the input layer reads Gaussian noise whose held-out tails a
            calibrated range clamps, and the output layer's weight error is a bias every sampler step integrates
            (README, "Quality on held-out seeds"). They are < 0.2% of the MACs.
        weight_rounding: ``"nearest"`` (CacheQuant), ``"gptq"`` (each layer's weight columns rounded in turn, the
            rounding error moved onto the columns left, for the output error on the calibration inputs:
            `cq.quant.gptq`, Frantar et al. 2022), ``"adaround"`` (each weight rounded up or down as learned for the
            same error, `cq.quant.adaround`, Nagel et al. 2020; below 8 bits only: `ConfigError` at 8) or
            ``"auto"`` (default): GPTQ below 8 bits, nearest at 8 -- a departure from CacheQuant for W4 (README,
            "Quality on held-out seeds"). Same storage and kernels.
        split_weights: a conv reading ``cat(cached, skip)`` gets one weight quantizer per input half, each with
            per-output-channel scales (CacheQuant / Q-Diffusion split-shortcut quantization). False: one scale per
            output channel across both halves (files saved before Quantizer version 3).
        include, skip: fnmatch patterns selecting the modules to quantize.
        refresh_samples, cached_samples: calibration samples per refresh / cached step.

    Example:
        >>> qunet = UniformQuantizer(weight_bits=4).quantize(unet, trace, cacher=cacher)
    """

    weight_bits: int = 8
    act_bits: int = 8
    weight_symmetric: bool = False
    attention_symmetric: bool = False
    weight_method: ScaleMethod = "mse"
    act_method: ScaleMethod = "mse"
    per_step: bool = True
    activation_tables: str = "per_step"
    keep_8bit: tuple[str, ...] = ("conv_in", "conv_out")
    float_io: bool = True
    split_weights: bool = True
    weight_rounding: str = "auto"
    include: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = ()
    refresh_samples: int = 32
    cached_samples: int = 8

    def __post_init__(self) -> None:
        self.uses_gptq()  # validates weight_rounding
        self.check_activation_tables()
        if self.activation_tables == "per_group" and not self.per_step:
            raise ConfigError(
                "UniformQuantizer(activation_tables='per_group') groups per-step tables: it needs per_step=True "
                "(per_step=False already shares one range across all steps)"
            )
        self.specs("", nn.Identity())  # validates the bit widths and methods through QuantSpec
        for name in ("refresh_samples", "cached_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"UniformQuantizer.{name} must be >= 1, got {getattr(self, name)}")

    def label(self) -> str:
        return f"{type(self).__name__}(W{self.weight_bits}A{self.act_bits})"

    def specs(self, name: str, module: nn.Module) -> tuple[QuantSpec | None, QuantSpec]:
        eight = any(fnmatch.fnmatchcase(name, p) for p in self.keep_8bit)
        weight = QuantSpec(
            bits=8 if eight else self.weight_bits,
            symmetric=self.weight_symmetric,
            per_channel=True,
            method=self.weight_method,
        )
        matmul = isinstance(module, MatMul)
        act = QuantSpec(
            bits=8 if eight else self.act_bits,
            symmetric=matmul and self.attention_symmetric,
            per_step=self.per_step,
            method=self.act_method,
        )
        return (None if matmul else weight), act

    def calibration_batches(
        self, trace: Trace, mask: tuple[bool, ...], source: list[int]
    ) -> Iterator[CalibrationBatch]:
        yield from every_step(mask, source, self.refresh_samples, trace.x.shape[1], self.cached_samples)


__getattr__ = deprecated_names(__name__, {"Uniform": UniformQuantizer})  # its former name, for one release
