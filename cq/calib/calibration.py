"""`Calibration`: the full-precision trajectories a fit calibrates on (or a report compares on) -- the base UNet,
its sampler and steps, the seeds, the conditioning -- and `Calibration.record`, their `Trace`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .trace import Trace, trace


if TYPE_CHECKING:
    from ..models.base import Base
    from ..models.conditioning import Conditioning, Conditions

__all__ = ["Calibration"]


@dataclass(frozen=True)
class Calibration:
    """``num_samples`` trajectories of ``unet`` from the noise of seeds ``seed..``, run by ``sampler`` (``(function,
    steps, kwargs)``) under ``conditioning`` (one row per trajectory), ``batch_size`` at a time."""

    unet: nn.Module
    sampler: tuple[Callable[..., Any], int, dict]
    conditioning: Conditioning
    num_samples: int
    seed: int
    batch_size: int

    @classmethod
    def of(
        cls,
        base: Base,
        *,
        steps: int | None = None,
        spacing: str | None = None,
        sampler: str | None = None,
        num_samples: int = 32,
        seed: int = 10_000,
        conditions: Conditions | None = None,
        guidance: float | None = None,
        batch_size: int | None = None,
    ) -> Calibration:
        """The calibration of ``cq fit`` on ``base``: ``steps`` / ``spacing`` default to the preset's, ``sampler``
        (a `cq.sampling.SAMPLERS` name) to the preset's (SD: plms, else ddim), ``guidance`` to the preset's."""
        from ..models.base import default_batch
        from ..models.conditioning import Conditions, conditioning
        from ..models.presets import sampling_defaults
        from ..sampling.resolve import sampler_named

        steps, kwargs = sampling_defaults(base.unet, steps, spacing)
        fn, kwargs = sampler_named(sampler or base.default_sampler, kwargs)
        cond = conditioning(base, conditions or Conditions(), num_samples, guidance)
        batch = min(num_samples, batch_size or default_batch(base.unet))
        return cls(base.unet, (fn, steps, kwargs), cond, num_samples, seed, batch)

    def describe(self) -> str:
        fn, steps, kwargs = self.sampler
        last = self.seed + self.num_samples - 1
        return (
            f"{fn.__name__} {steps} steps {kwargs}, {self.num_samples} calibration trajectories (seeds "
            f"{self.seed}..{last}), {self.conditioning.describe()}"
        )

    def record(
        self,
        points: Sequence[str],
        *,
        keep: int | None = None,
        storage: str | Path | None = None,
        progress: bool = True,
    ) -> Trace:
        """`cq.trace` of these trajectories, recording the features of the cache ``points``."""
        fn, steps, kwargs = self.sampler
        return trace(
            self.unet,
            fn,
            steps=steps,
            num_samples=self.num_samples,
            points=points,
            keep=keep,
            seed=self.seed,
            cond=self.conditioning.cond,
            guidance_scale=self.conditioning.scale,
            uncond=self.conditioning.uncond,
            batch_size=self.batch_size,
            storage=storage,
            progress=progress,
            **kwargs,
        )
