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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn


if TYPE_CHECKING:
    from .noise import NoiseSchedule
    from .settings import SamplerSettings

__all__ = ["SamplerModel", "SamplerFields", "fields_of"]


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
