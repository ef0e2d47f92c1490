"""cq's samplers by name, and what a sampler call will do before it runs.

`SAMPLERS` maps the names `SamplerSettings` records to the functions; `model_calls` and `settings_of_call` answer
for any sampler function (a foreign one declares its call count as a ``num_calls`` attribute, like `plms`, and may
declare its settings as ``planned_settings``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..errors import SamplerMismatchError
from .ddim import ddim
from .dpm_solver import dpm_solver
from .plms import plms
from .settings import SamplerSettings, planned_settings


__all__ = ["SAMPLERS", "sampler_of", "model_calls", "settings_of_call"]

SAMPLERS: dict[str, Callable[..., Any]] = {"ddim": ddim, "plms": plms, "dpm_solver": dpm_solver}


def sampler_of(settings: SamplerSettings) -> Callable[..., Any]:
    """The cq sampler ``settings`` were recorded with (`ddim`, `plms` or `dpm_solver`); a model fitted on another
    sampler's run (a diffusers pipeline's loop, `cq.diffusers`) is refused with `SamplerMismatchError`."""
    if settings.sampler not in SAMPLERS:
        raise SamplerMismatchError(
            f"the model was fitted on a run of {settings.sampler.split(' ')[0]!r}, not of a cq sampler "
            f"({sorted(SAMPLERS)}); sample it the way it was fitted (a `cq.diffusers` model: through its pipeline, "
            "`cq.diffusers.load(pipe, path)`), or refit it on a trace of a cq sampler"
        )
    return SAMPLERS[settings.sampler]


def model_calls(sampler: Callable[..., Any], steps: int) -> int:
    """Model calls ``sampler(model, x, steps=steps)`` makes: ``sampler.num_calls(steps)``, else one per step."""
    counter = getattr(sampler, "num_calls", None)  # declared by plms; a user's sampler may declare it too
    return counter(steps) if counter is not None else steps


def settings_of_call(sampler: Any, steps: int, num_timesteps: int, kwargs: dict[str, Any]) -> SamplerSettings | None:
    """`planned_settings` of ``sampler(model, x, steps=steps, **kwargs)`` with the sampler's own defaults filled
    in, for cq's ``ddim``, ``plms`` and ``dpm_solver``; another sampler may declare its own as a
    ``planned_settings(steps, num_timesteps, kwargs)`` attribute (`cq.diffusers` does); None for any other sampler
    (its settings are unknown)."""
    declared = getattr(sampler, "planned_settings", None)
    if sampler not in SAMPLERS.values():
        return declared(steps, num_timesteps, kwargs) if declared is not None else None
    defaults = {name: p.default for name, p in inspect.signature(sampler).parameters.items()}
    value = {k: kwargs.get(k, defaults.get(k, False)) for k in ("spacing", "eta", "clip_x0")}
    return planned_settings(sampler.__name__, steps, num_timesteps, **value)
