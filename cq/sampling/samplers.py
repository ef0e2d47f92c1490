"""cq's samplers by name, and what a sampler call will do before it runs.

`SAMPLERS` maps the names `SamplerSettings` records to the functions; `model_calls` and `settings_of_call` answer
for any sampler function (a foreign one declares its call count as a ``num_calls`` attribute, like `plms`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .ddim import ddim
from .plms import plms
from .settings import SamplerSettings, planned_settings


__all__ = ["SAMPLERS", "sampler_of", "model_calls", "settings_of_call"]

SAMPLERS: dict[str, Callable[..., Any]] = {"ddim": ddim, "plms": plms}


def sampler_of(settings: SamplerSettings) -> Callable[..., Any]:
    """The cq sampler ``settings`` were recorded with (`ddim` or `plms`)."""
    return SAMPLERS[settings.sampler]


def model_calls(sampler: Callable[..., Any], steps: int) -> int:
    """Model calls ``sampler(model, x, steps=steps)`` makes: ``sampler.num_calls(steps)``, else one per step."""
    counter = getattr(sampler, "num_calls", None)  # declared by plms; a user's sampler may declare it too
    return counter(steps) if counter is not None else steps


def settings_of_call(sampler: Any, steps: int, num_timesteps: int, kwargs: dict[str, Any]) -> SamplerSettings | None:
    """`planned_settings` of ``sampler(model, x, steps=steps, **kwargs)`` with the sampler's own defaults filled
    in, for cq's ``ddim`` and ``plms``; None for any other sampler (its settings are unknown)."""
    if sampler not in SAMPLERS.values():
        return None
    defaults = {name: p.default for name, p in inspect.signature(sampler).parameters.items()}
    value = {k: kwargs.get(k, defaults.get(k, False)) for k in ("spacing", "eta", "clip_x0")}
    return planned_settings(sampler.__name__, steps, num_timesteps, **value)
