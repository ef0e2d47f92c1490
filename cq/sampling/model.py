"""`SamplerModel`: the declared contract between cq's samplers and what they drive.

A sampler calls ``model(x, t, cond, step=i)`` and reads three declared fields before the first call:

* ``noise_schedule`` -- the betas the model was trained with (None: the caller passes ``noise=``);
* ``num_steps`` -- the model calls it was fitted for (None: any count);
* ``sampler_settings`` -- the exact `SamplerSettings` it was fitted with (None: only ``num_steps`` is checked).

cq's own models (`CompressedUNet`, `FullPrecision`, guidance wrappers, the trace recorder) subclass
`SamplerModel` and set the fields in ``__init__``. Any other callable taking ``step=`` may be sampled too; it
may carry attributes of the same names (`fields_of` reads them; absent ones are None).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputShapeError, InputValueError, SamplerMismatchError
from .settings import SamplerSettings


if TYPE_CHECKING:
    from .noise import NoiseSchedule

__all__ = ["SamplerModel", "SamplerFields", "fields_of", "check_sampler", "check_sampler_inputs"]


@dataclass(frozen=True)
class SamplerFields:
    """What a model declares to the samplers (all None for a foreign callable)."""

    noise_schedule: NoiseSchedule | None = None
    num_steps: int | None = None
    sampler_settings: SamplerSettings | None = None


class SamplerModel(nn.Module):
    """Base class of models the samplers drive: ``forward(x, t, cond=None, *, step)`` plus declared fields."""

    def __init__(
        self,
        *,
        noise_schedule: NoiseSchedule | None = None,
        num_steps: int | None = None,
        sampler_settings: SamplerSettings | None = None,
    ):
        super().__init__()
        self.noise_schedule = noise_schedule
        self.num_steps = num_steps
        self.sampler_settings = sampler_settings

    def sampler_fields(self) -> SamplerFields:
        return SamplerFields(self.noise_schedule, self.num_steps, self.sampler_settings)


def fields_of(model: Any) -> SamplerFields:
    """The declared fields of ``model``: a `SamplerModel`'s own; any other callable may carry attributes of the
    same names (read here, the one place that probes a foreign object), else they are None."""
    if isinstance(model, SamplerModel):
        return model.sampler_fields()
    return SamplerFields(
        noise_schedule=getattr(model, "noise_schedule", None),
        num_steps=getattr(model, "num_steps", None),
        sampler_settings=getattr(model, "sampler_settings", None),
    )


def check_sampler(model: Any, asked: SamplerSettings) -> None:
    """Refuse to sample ``model`` with settings other than the ones it was fitted for.

    `SamplerModel`\\ s that declare ``sampler_settings`` (fitted `CompressedUNet`\\ s) are compared field by field;
    models that only declare ``num_steps`` (older artifacts) are compared by their call count.
    """
    declared = fields_of(model)
    fitted = declared.sampler_settings
    if fitted is not None:
        diff = fitted.differences(asked)
        if diff:
            raise SamplerMismatchError(
                f"{type(model).__name__} was fitted for {fitted.sampler}(steps={fitted.steps}, "
                f"spacing={fitted.spacing!r}, eta={fitted.eta:g}"
                + (f", clip_x0={fitted.clip_x0}" if fitted.sampler == "ddim" else "")
                + f"); this call differs in {'; '.join(diff)}. Sample it with those settings "
                "(`model.sampler_settings.call_kwargs()`), or refit on a trace recorded with the ones you want"
            )
        return
    num_steps = declared.num_steps
    if num_steps is not None and num_steps != asked.calls:
        raise SamplerMismatchError(
            f"{type(model).__name__} was fitted for {num_steps} model calls, but {asked.sampler}(steps={asked.steps}) "
            f"makes {asked.calls}"
            + (
                f" (step 0 calls the model twice: plms.num_calls({asked.steps}) = {asked.calls})"
                if asked.sampler == "plms"
                else ""
            )
            + f"; sample with a sampler making {num_steps} calls or refit on a trace with these settings"
        )


def check_sampler_inputs(x: Any, *, eta: Any, deterministic: str | None = None) -> None:
    """The scalar arguments and the initial noise of a sampler call, checked once before the first step: a NaN
    ``eta`` or one NaN pixel of ``x`` would otherwise make every output pixel NaN without an error.
    ``deterministic``: the sampler's name when it has no stochastic variant (``eta`` must then be 0)."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ConfigError(
            f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like ancestral noise), got {eta!r}"
        )
    if deterministic is not None and eta != 0:
        raise ConfigError(f"{deterministic} is deterministic: eta must be 0, got {eta}")
    if not isinstance(x, Tensor) or not torch.is_floating_point(x):
        raise InputShapeError(
            f"x (the initial noise) must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.device.type != "meta" and not bool(torch.isfinite(x).all()):
        raise InputValueError(
            "x (the initial noise) holds NaN or inf; every sample it reaches would be NaN. Draw it again "
            "(torch.randn / cq.sampling.seeded_noise) or find where it was computed"
        )
