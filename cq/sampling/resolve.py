"""The sampler a model runs with and the keyword arguments it takes: one named against a preset's defaults
(`sampler_named`, what a fit calibrates with), or the one a saved model was fitted with (`fitted_sampler`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from .samplers import SAMPLERS, sampler_of


__all__ = ["sampler_named", "fitted_sampler"]


def sampler_named(name: str, kwargs: dict) -> tuple[Callable[..., Any], dict]:
    """``(sampler function, kwargs it takes)`` for the sampler ``name`` (``--sampler``); preset kwargs it lacks
    (DDIM's ``clip_x0`` under PLMS) are dropped only when they hold their default."""
    if name not in SAMPLERS:
        raise ConfigError(f"--sampler {name!r}: expected one of {', '.join(sorted(SAMPLERS))}")
    fn = SAMPLERS[name]
    params = inspect.signature(fn).parameters
    extra = {k: v for k, v in kwargs.items() if k not in params}
    if any(v for v in extra.values()):
        raise ConfigError(f"--sampler {name} does not take the preset's {extra}; use --sampler ddim")
    return fn, {k: v for k, v in kwargs.items() if k in params}


def fitted_sampler(model, spacing: str | None = None) -> tuple[Callable[..., Any], int, dict]:
    """``(sampler, steps, kwargs)`` the `CompressedUNet` ``model`` must be sampled with: its recorded
    `SamplerSettings` (a ``spacing`` other than the fitted one is refused by the sampler), else, for files written
    before those were recorded, DDIM with the preset's defaults."""
    from ..models.presets import sampling_defaults
    from .ddim import ddim

    settings = model.sampler_settings
    if settings is None:
        steps, kwargs = sampling_defaults(model.unet, model.num_steps, spacing)
        return ddim, steps, kwargs
    kwargs = settings.call_kwargs()
    if spacing is not None:
        kwargs["spacing"] = spacing
    return sampler_of(settings), kwargs.pop("steps"), kwargs
