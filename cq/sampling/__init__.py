"""Samplers sharing one signature: ``sampler(model, x, *, steps, cond=None, eta=0.0, callback=None, generator=None)``.

Each calls ``model(x, t, cond, step=i)``; plain networks go through `FullPrecision`. ``step`` is the model-call
index: DDIM and DPM-Solver++(2M) (`dpm_solver`) make one call per step; PLMS makes
``plms.num_calls(steps) = steps + 1`` (two at step 0).
"""

from .adapter import FullPrecision
from .ddim import StepInfo, ddim
from .dpm_solver import dpm_solver
from .guidance import ClassifierFreeGuidance
from .model import SamplerFields, SamplerModel, check_sampler, fields_of
from .noise import NoiseSchedule, ddim_timesteps, dpm_solver_timesteps
from .plms import plms
from .samplers import SAMPLERS, model_calls, sampler_of, settings_of_call
from .seeded import seeded_noise
from .settings import SamplerSettings


__all__ = [
    "ddim",
    "plms",
    "dpm_solver",
    "dpm_solver_timesteps",
    "FullPrecision",
    "ClassifierFreeGuidance",
    "NoiseSchedule",
    "StepInfo",
    "ddim_timesteps",
    "SamplerSettings",
    "check_sampler",
    "SamplerModel",
    "SamplerFields",
    "fields_of",
    "SAMPLERS",
    "sampler_of",
    "model_calls",
    "settings_of_call",
    "seeded_noise",
]
