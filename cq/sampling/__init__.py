"""Samplers sharing one signature: ``sampler(model, x, *, steps, cond=None, eta=0.0, callback=None, generator=None)``.

Each calls ``model(x, t, cond, step=i)``; plain networks go through `FullPrecision`.
"""

from .adapter import FullPrecision
from .ddim import StepInfo, ddim
from .noise import NoiseSchedule, ddim_timesteps


__all__ = ["ddim", "FullPrecision", "NoiseSchedule", "StepInfo", "ddim_timesteps"]
