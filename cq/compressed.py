"""`CompressedUNet`: a UNet run with caching (and, later, quantization and corrections) over a fixed step count.

``forward(x, t, cond=None, *, step)`` is the only place the sampling step is written: it enters
``step_scope(step)`` for per-step modules and asks the cache whether ``step`` refreshes or reuses. Nothing is
counted; calling twice with the same step gives the same output. The model is tied to the step count its
schedule was fitted for: samplers with another count are refused (`StepCountMismatchError`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .cache.cacher import Cacher
from .errors import ConfigError, InputValueError, StepCountMismatchError
from .models.unet import check_cacheable
from .sampling.settings import SamplerSettings
from .step import step_scope


if TYPE_CHECKING:
    from .metrics.evaluate import Evaluation
    from .report import Report
    from .trace import Trace


__all__ = ["CompressedUNet"]


class CompressedUNet(nn.Module):
    """A cq UNet plus what compresses it, for sampling with exactly ``num_steps`` steps.

    Args:
        unet: a cq UNet (exposes ``cache_points()`` and takes ``cache=``); not modified.
        num_steps: sampler steps this model is fitted for.
        cacher: a fitted `Cacher` (e.g. ``DeepCache(schedule=Uniform(interval=5))``), or None for no caching.
        calibration_seeds: the initial-noise seeds of the trace the model was fitted on (`Trace.seeds`);
            `cq.evaluate` refuses them, so quality is only ever stated on held-out seeds.
        sampler_settings: how the trace was sampled (`Trace.settings`); the samplers refuse any other settings
            (`SamplerMismatchError`). None: only the call count ``num_steps`` is checked.

    Example:
        >>> model = CompressedUNet(unet, num_steps=50, cacher=DeepCache(schedule=Uniform(interval=5)))
        >>> x0 = cq.sampling.ddim(model, noise, steps=50)
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        num_steps: int,
        cacher: Cacher | None = None,
        calibration_seeds: tuple[int, ...] = (),
        sampler_settings: SamplerSettings | None = None,
    ):
        super().__init__()
        if not isinstance(num_steps, int) or num_steps < 1:
            raise StepCountMismatchError(f"num_steps must be an int >= 1, got {num_steps!r}")
        self.unet = unet
        self.num_steps = num_steps
        self.calibration_seeds = tuple(int(s) for s in calibration_seeds)
        if sampler_settings is not None and sampler_settings.calls != num_steps:
            raise StepCountMismatchError(
                f"sampler_settings make {sampler_settings.calls} model calls, num_steps is {num_steps}"
            )
        self.sampler_settings = sampler_settings
        self.cacher = cacher
        self.cache = cacher.build(unet, num_steps) if cacher is not None else None
        self.cache_correction: nn.Module | None = None
        self.noise_schedule = check_cacheable(unet, "CompressedUNet").noise_schedule

    def set_cache_correction(self, correction: nn.Module) -> None:
        """Install ``correction(feature, step)`` on the cached feature of shallow calls (DEC cache correction)."""
        if self.cache is None:
            raise ConfigError("a cache correction needs a cacher")
        self.cache_correction = correction
        self.cache.transform = self.cache_transform

    @property
    def cache_transform(self) -> Callable[[Tensor, int], Tensor] | None:
        """``fn(feature, step)`` applied to the cached feature before shallow calls, or None."""
        if self.cache_correction is None:
            return None
        return lambda feature, step: self.cache_correction(feature, step)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.unet.sample_shape)

    def cache_points(self) -> tuple[str, ...]:
        return tuple(self.unet.cache_points())

    def refresh_mask(self) -> tuple[bool, ...]:
        """Per step: True = full forward. All True without a cacher."""
        return self.cache.mask if self.cache is not None else (True,) * self.num_steps

    def forward(self, x: Tensor, t: Tensor, cond: Any = None, *, step: int) -> Tensor:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise StepCountMismatchError(
                f"step must be an int in [0, {self.num_steps}) for a model fitted for {self.num_steps} steps, "
                f"got {step!r}"
            )
        self._check_inputs(x, t)
        with step_scope(step):
            if self.cache is None:
                return self.unet(x, t, cond)
            return self.cache.run(self.unet, x, t, cond, step)

    def _check_inputs(self, x: Tensor, t: Tensor) -> None:
        """Refuse what the fitted tables cannot represent instead of clamping it silently: timesteps outside the
        noise schedule's ``[0, T)`` and non-finite inputs."""
        if not bool(torch.isfinite(x).all()):
            raise InputValueError("x contains NaN or inf; the sampler state diverged or the input is corrupted")
        t = torch.as_tensor(t)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputValueError("t contains NaN or inf")
        limit = self.noise_schedule.num_timesteps if self.noise_schedule is not None else None
        if t.numel() and (float(t.min()) < 0 or (limit is not None and float(t.max()) >= limit)):
            raise InputValueError(
                f"timesteps must lie in [0, {limit}) for this model's noise schedule, got {float(t.min()):g}.."
                f"{float(t.max()):g}"
            )

    def report(
        self,
        *,
        reference: nn.Module | None = None,
        trace: Trace | None = None,
        samples: int = 8,
        evaluation: Evaluation | None = None,
    ) -> Report:
        """Per-step refresh/cached, MACs and (given the full-precision UNet and a trace) teacher-forced SQNR;
        ``evaluation`` (`cq.evaluate`) adds the held-out end-to-end quality. See `cq.report`."""
        from .report import report

        return report(self, reference=reference, trace=trace, samples=samples, evaluation=evaluation)

    def to_int8(self, backend: str = "auto") -> dict[str, str]:
        """Run quantized layers on integer kernels from now on (in place); returns each layer's execution mode.

        ``backend``: ``"auto"`` picks by device (oneDNN on the CPU, ``torch._int_mm`` on CUDA; see
        `cq.quant.int8.to_int8`). The model computes the same function (up to float summation order) and
        saves the same file; ``cq.load(path, int8=True)`` converts a loaded one.
        """
        from .quant.int8 import to_int8

        self.execution = to_int8(self.unet, backend)
        return self.execution

    def save(self, path: str | Path) -> Path:
        """Write this model (recipe JSON + tensors, one safetensors file, atomic); `cq.load` reads it back."""
        from .artifact import save

        return save(self, path)

    def extra_repr(self) -> str:
        mask = self.refresh_mask()
        return f"num_steps={self.num_steps}, refreshes={sum(mask)}, cacher={self.cacher!r}"
