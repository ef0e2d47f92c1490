"""PTQ4DM (Shang et al., CVPR 2023): normally-distributed time-step calibration (NDTC), one shared range.

Calibration samples are drawn at sampler steps ``i = clamp(int(N(mean, std^2) * T), 0, T-1)`` (step 0 is the
noisiest; the reference's ``--calib_t_mode normal``, mean 0.4, std 0.4), each taking the trajectory's ``x`` at that
step. The reference then feeds ``i`` itself to the network as the timestep, mismatching the time embedding
and the noise level (algorithms.md §5.1); cq feeds the step's true timestep. Activation ranges are shared by all
steps (no per-step tables); weights are per-channel with the L_2.4 range search (QDrop "mse").
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calib.replay import CalibrationBatch
from ..errors import ConfigError
from ..models.layers import MatMul
from ..registry import QUANTIZERS
from .quantizer import Quantizer
from .spec import QuantSpec


if TYPE_CHECKING:
    from ..calib.trace import Trace

__all__ = ["PTQ4DM", "ndtc_steps"]


def ndtc_steps(num_steps: int, samples: int, mean: float, std: float, seed: int) -> torch.Tensor:
    """Sampler steps of the NDTC calibration set (``samples`` draws, clamped to ``[0, T-1]``)."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, generator=g, dtype=torch.float64) * std + mean
    return (draws * num_steps).long().clamp(0, num_steps - 1)


@QUANTIZERS.register("ptq4dm")
@dataclass(frozen=True, kw_only=True)
class PTQ4DM(Quantizer):
    """PTQ4DM-style quantizer: NDTC calibration steps and one activation range shared by all steps.

    Args:
        weight_bits, act_bits: 2..8.
        samples: calibration samples (the reference uses 1024; fewer suffice for small models).
        mean, std: of the normal over the fraction of the trajectory (0 = noisiest).
        seed: for drawing the calibration steps.
        keep_8bit, float_io, split_weights, weight_rounding, include, skip: as in `cq.quant.UniformQuantizer`.
    """

    weight_bits: int = 8
    act_bits: int = 8
    samples: int = 256
    mean: float = 0.4
    std: float = 0.4
    seed: int = 0
    keep_8bit: tuple[str, ...] = ("conv_in", "conv_out")
    float_io: bool = True
    split_weights: bool = True
    weight_rounding: str = "auto"
    include: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.uses_gptq()  # validates weight_rounding
        self.specs("", nn.Identity())
        if self.samples < 1:
            raise ConfigError(f"PTQ4DM.samples must be >= 1, got {self.samples}")
        if not self.std > 0:
            raise ConfigError(f"PTQ4DM.std must be > 0, got {self.std}")

    def label(self) -> str:
        return f"{type(self).__name__}(W{self.weight_bits}A{self.act_bits})"

    def specs(self, name: str, module: nn.Module) -> tuple[QuantSpec | None, QuantSpec]:
        eight = any(fnmatch.fnmatchcase(name, p) for p in self.keep_8bit)
        weight = QuantSpec(bits=8 if eight else self.weight_bits, per_channel=True, method="mse")
        act = QuantSpec(bits=8 if eight else self.act_bits, per_step=False, method="mse")
        return (None if isinstance(module, MatMul) else weight), act

    def calibration_batches(
        self, trace: Trace, mask: tuple[bool, ...], source: list[int]
    ) -> Iterator[CalibrationBatch]:
        keep = trace.x.shape[1]
        steps = ndtc_steps(trace.steps, self.samples, self.mean, self.std, self.seed)
        counts = torch.bincount(steps, minlength=trace.steps)
        excess = int((counts - keep).clamp(min=0).sum())
        if excess:  # the shared range is the union over steps (order and count independent), but data is data
            warnings.warn(
                f"PTQ4DM: {excess} of {self.samples} NDTC draws fall on steps already drawn more often than the "
                f"trace keeps trajectories ({keep}); they add no new samples. Record the trace with more "
                f"trajectories (at least {int(counts.max())}) to use every draw",
                stacklevel=2,
            )
        for step in torch.nonzero(counts).flatten().tolist():
            rows = torch.arange(min(int(counts[step]), keep))
            yield CalibrationBatch(step=step, rows=rows, source=None if mask[step] else source[step])
