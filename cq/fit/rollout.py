"""`CalibrationRollout`: the end-to-end error of a candidate compressed model on calibration trajectories.

What a schedule that `needs_rollout` (e.g. `cq.cache.search.TrajectorySearch`) searches on. `Recipe.fit` builds
one per fit (`Recipe.rollout`) and hands it to the cacher. A call builds the model the recipe would build with
the candidate cacher, through `Recipe.fit`'s own steps (`measure`: `cq.fit.steps.fit_after_cacher`) -- its
``body`` with the correctors of `Stage.BEFORE_QUANTIZATION` (the DEC cache correction, cheap: it is fitted from
the trace's features alone) --, samples it end to end with the trace's own sampler settings from the initial noise
of the trace's first trajectories, and returns each trajectory's x0 MSE against the trace's full-precision x0
(`errors`). Only calibration trajectories are used, never held-out seeds. A guided trace (rows ``2i`` /
``2i + 1``: the unconditional / conditional halves of trajectory ``i``) is rolled out guided, with the trace's
scale and the unconditional context of its first row.

Quantization is in the loop with tables shared by every candidate: `CalibrationRollout.of` calibrates the recipe's
quantizer once on the trace with every step a full call, and each candidate samples that quantized body through
its own cache. Calibrating through each candidate's cache instead, as the final fit does, costs ~10-18 s per
candidate on the demo model, and its recalibration noise swamps the differences a search is after; without
quantization the rollouts misrank schedules at N=2, where the quantization error is of the cache error's order and
depends on the schedule (README, "The search on 128 calibration trajectories"). The correctors of
`Stage.AFTER_QUANTIZATION` (the DEC quantization correction) stay out: they are fitted through the candidate's
quantized cache, a replay per candidate. A schedule declaring ``quantized_rollout = False`` gets the full-precision
UNet as body.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..cache.cacher import Cacher
from ..correct import Corrector, Stage
from ..errors import ConfigError
from ..quant import Quantizer
from ..sampling.guidance import ClassifierFreeGuidance
from ..sampling.samplers import sampler_of
from .steps import fit_after_cacher


if TYPE_CHECKING:
    from ..calib.trace import Trace
    from ..compressed import CompressedUNet

__all__ = ["CalibrationRollout"]


@dataclass(frozen=True)
class CalibrationRollout:
    """``rollout(cacher, trajectories)`` -> ``[trajectories]`` x0 MSE of the recipe's model with ``cacher``
    (``trajectories=None``: every trajectory the trace kept).

    Args:
        correctors: the `Stage.BEFORE_QUANTIZATION` correctors of the recipe being fitted (refitted per
            candidate; `Recipe.fit` passes ``recipe.stage(Stage.BEFORE_QUANTIZATION)``).
        unet: the full-precision UNet (not modified).
        trace: the calibration trace; needs sampler settings (`cq.trace` records them).
        body: what the candidates sample with: None, the full-precision ``unet``; or a quantized copy of it
            calibrated once for the trace's step count (`CalibrationRollout.of`).
    """

    correctors: tuple[Corrector, ...]
    unet: nn.Module
    trace: Trace
    body: nn.Module | None = None

    @classmethod
    def of(
        cls,
        unet: nn.Module,
        trace: Trace,
        *,
        correctors: tuple[Corrector, ...] = (),
        quantizer: Quantizer | None = None,
        progress: bool = False,
    ) -> CalibrationRollout:
        """The rollout `Recipe.fit` hands a cacher that `needs_rollout`: the recipe's `Stage.BEFORE_QUANTIZATION`
        ``correctors`` and, given a ``quantizer`` (the recipe's, when the cacher's `quantized_rollout`), the body it
        quantizes once on ``trace`` with every step a full call (per-step tables of every layer; the candidates'
        caches then choose which run). The trace is checked before the quantizer calibrates."""
        rollout = cls(correctors, unet, trace)
        if quantizer is None:
            return rollout
        if not isinstance(quantizer, Quantizer):
            raise ConfigError(
                f"CalibrationRollout.of: quantizer must be a cq.quant.Quantizer (the recipe's) or None, got "
                f"{type(quantizer).__name__}"
            )
        return replace(rollout, body=quantizer.quantize(unet, trace, progress=progress))

    def __post_init__(self) -> None:
        object.__setattr__(self, "correctors", tuple(self.correctors))
        if not all(isinstance(c, Corrector) for c in self.correctors):
            raise ConfigError(
                "CalibrationRollout.correctors must be Corrector values (the recipe's Stage.BEFORE_QUANTIZATION "
                f"ones), got {[type(c).__name__ for c in self.correctors]}"
            )
        wrong = [c for c in self.correctors if c.stage is not Stage.BEFORE_QUANTIZATION]
        if wrong:
            raise ConfigError(
                f"a rollout refits the correctors of Stage.BEFORE_QUANTIZATION only (those after quantization are "
                f"fitted through each candidate's quantized cache, a replay per candidate); got {wrong!r}"
            )
        if self.body is not None and not isinstance(self.body, nn.Module):
            raise ConfigError(
                f"CalibrationRollout.body must be the UNet's quantized copy (an nn.Module) or None, got "
                f"{type(self.body).__name__}; build it with CalibrationRollout.of(unet, trace, quantizer=...)"
            )
        if self.trace.settings is None:
            raise ConfigError(
                "a schedule searched on rollouts needs the trace's sampler settings to roll candidates out; record "
                "the trace with cq.trace(unet, sampler, ...) (a trace built by hand has none)"
            )

    @property
    def guided(self) -> bool:
        return self.trace.guidance_scale != 1.0

    @torch.no_grad()
    def __call__(self, cacher: Cacher, trajectories: int | None) -> Tensor:
        return self.measure(cacher, trajectories)[1]

    @torch.no_grad()
    def measure(self, cacher: Cacher, trajectories: int | None) -> tuple[CompressedUNet, Tensor]:
        """The candidate with ``cacher`` (fitted) -- what `Recipe.fit` builds after its cacher, here for a recipe of
        the `correctors` alone on `body`, through the same code -- and its x0 MSE (`errors`)."""
        trajectories = self.trajectories(trajectories)
        model = fit_after_cacher(self.unet, self.trace, cacher=cacher, correctors=self.correctors, body=self.body)
        return model, self.errors(model, trajectories)

    def trajectories(self, trajectories: int | None) -> int:
        """``trajectories`` checked against the trace's kept ones (None: all of them)."""
        kept = self.trace.x0.shape[0]
        trajectories = kept if trajectories is None else trajectories
        if isinstance(trajectories, bool) or not isinstance(trajectories, int) or not 1 <= trajectories <= kept:
            raise ConfigError(
                f"a rollout uses 1..{kept} of the trace's kept trajectories, asked for {trajectories!r}; record "
                "more (cq.trace(..., num_samples=, keep=)) or lower the schedule's trajectories"
            )
        return trajectories

    @torch.no_grad()
    def errors(self, model: nn.Module, trajectories: int | None) -> Tensor:
        """``[trajectories]`` x0 MSE of ``model`` sampled end to end from the trace's first calibration
        trajectories (their initial noise, the trace's sampler settings and guidance) against the trace's x0."""
        trajectories = self.trajectories(trajectories)
        trace = self.trace
        device = next(self.unet.parameters(), torch.empty(0)).device
        rows = slice(1, 2 * trajectories, 2) if self.guided else slice(0, trajectories)  # guided: conditional rows
        noise = trace.x[0, rows].to(device=device, dtype=torch.float32)
        cond = trace.cond[0, rows].to(device) if trace.cond is not None else None
        denoiser = model
        if self.guided:
            denoiser = ClassifierFreeGuidance(model, trace.guidance_scale, trace.cond[0, :1].to(device))
        sampler = sampler_of(trace.settings)
        x0 = sampler(denoiser, noise, cond=cond, **trace.settings.call_kwargs())
        reference = trace.x0[:trajectories].to(x0.device, torch.float32)
        return (x0.double() - reference.double()).pow(2).flatten(1).mean(1).cpu()
