"""Noise schedules (betas) and the timestep sequences of the original samplers.

``linear``: ``linspace(beta_start, beta_end, T)`` (Ho et al.; the ddim code's "linear").
``quad`` / ``scaled_linear``: ``linspace(sqrt(beta_start), sqrt(beta_end), T)**2`` -- the ddim code calls it
"quad", LDM calls it "linear", diffusers "scaled_linear"; both names are accepted because both are in use.
Betas are computed in float64, as the originals do, and only cast when used.

``prediction``: what the network outputs. ``"eps"`` (the noise; DDPM, LDM, SD 1.x, SD 2 base) or ``"v"`` (the
velocity ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` of Salimans & Ho 2022; SD 2.x 768-v, CompVis
``parameterization: "v"``, diffusers ``prediction_type: "v_prediction"``). The samplers turn every model output
into eps through `eps_from_output`, the one place the conversion lives.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError


__all__ = [
    "NoiseSchedule",
    "check_steps",
    "ddim_timesteps",
    "dpm_solver_timesteps",
    "eps_from_output",
    "Spacing",
    "Prediction",
]

Spacing = Literal["uniform", "quad", "ldm", "linspace"]
Prediction = Literal["eps", "v"]


@dataclass(frozen=True, kw_only=True)
class NoiseSchedule:
    """Discrete-time variance schedule of a diffusion model (T training timesteps)."""

    kind: Literal["linear", "quad", "scaled_linear"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000
    prediction: Prediction = "eps"

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise ConfigError(
                f"NoiseSchedule.prediction must be 'eps' (the model predicts the noise) or 'v' (the velocity, "
                f"SD 2.x 768-v), got {self.prediction!r}"
            )
        if self.kind not in ("linear", "quad", "scaled_linear"):
            raise ConfigError(f"NoiseSchedule.kind must be 'linear', 'quad' or 'scaled_linear', got {self.kind!r}")
        if self.num_timesteps < 1:
            raise ConfigError(f"NoiseSchedule.num_timesteps must be >= 1, got {self.num_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(
                f"NoiseSchedule needs 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )

    def betas(self) -> Tensor:
        """``[T]`` float64 betas."""
        if self.kind == "linear":
            b = np.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=np.float64)
        else:
            b = np.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_timesteps, dtype=np.float64) ** 2
        return torch.from_numpy(b)

    def alphas_cumprod(self) -> Tensor:
        """``[T]`` float64 cumulative products of ``1 - beta``."""
        return torch.cumprod(1.0 - self.betas(), dim=0)


def eps_from_output(output: Tensor, x: Tensor, abar: float, prediction: Prediction) -> Tensor:
    """The noise estimate of a model ``output`` at ``x = x_t`` with ``abar = alphas_cumprod[t]``.

    ``"eps"``: the output itself. ``"v"``: ``eps = sqrt(abar) v + sqrt(1 - abar) x_t`` (from ``x_t = sqrt(abar) x0
    + sqrt(1 - abar) eps`` and ``v = sqrt(abar) eps - sqrt(1 - abar) x0``; CompVis ``predict_eps_from_z_and_v``,
    diffusers ``DDIMScheduler`` with ``prediction_type="v_prediction"``).
    """
    if prediction == "eps":
        return output
    if prediction == "v":
        return abar**0.5 * output + (1 - abar) ** 0.5 * x
    raise ConfigError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def check_steps(steps: object, num_timesteps: int | None = None) -> int:
    """``steps`` if it is an int >= 1 (and <= ``num_timesteps`` when given); else a `ConfigError` saying so (a float
    or negative step count would fail deep inside a sampler or the trace buffers)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1 (sampler steps), got {steps!r}; pass e.g. steps=50")
    if num_timesteps is not None and steps > num_timesteps:
        raise ConfigError(f"steps must be in [1, {num_timesteps}] (the model's training timesteps), got {steps}")
    return int(steps)


def ddim_timesteps(num_timesteps: int, steps: int, spacing: Spacing = "uniform") -> list[int]:
    """Timesteps visited by DDIM, in increasing order (the sampler walks them from the last to the first).

    * ``uniform``: ``range(0, T, T // steps)`` (ermongroup/ddim ``--skip_type uniform``); exact only when
      ``steps`` divides ``T``, otherwise the ddim code would take more steps than asked and cq raises.
    * ``quad``: ``int(linspace(0, sqrt(0.8 T), steps) ** 2)`` (ddim ``--skip_type quad``, CacheQuant's CIFAR default).
    * ``ldm``: ``range(0, T, T // steps) + 1`` (CompVis LDM ``make_ddim_timesteps``; the last step lands on
      ``alphas_cumprod[0]``, not 1).
    * ``linspace``: ``round(linspace(0, T - 1, steps))``, exactly ``steps`` distinct values for any ``steps <= T``.
    """
    steps = check_steps(steps, num_timesteps)
    if spacing in ("uniform", "ldm"):
        seq = list(range(0, num_timesteps, num_timesteps // steps))
        if len(seq) != steps:
            raise ConfigError(
                f"spacing={spacing!r} gives {len(seq)} timesteps for steps={steps} (T={num_timesteps} is not a "
                f"multiple of steps); pick steps dividing {num_timesteps} or use spacing='linspace'"
            )
        if spacing == "ldm":
            if seq[-1] + 1 >= num_timesteps:
                raise ConfigError(
                    f"spacing='ldm' shifts timesteps by +1, so steps={steps} would reach t={seq[-1] + 1} >= "
                    f"T={num_timesteps}; use fewer steps"
                )
            return [s + 1 for s in seq]
        return seq
    if spacing == "quad":
        return [int(s) for s in np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2]
    if spacing == "linspace":
        return [int(s) for s in np.round(np.linspace(0, num_timesteps - 1, steps))]
    raise ConfigError(f"spacing must be 'uniform', 'quad', 'ldm' or 'linspace', got {spacing!r}")


def dpm_solver_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> list[int]:
    """The timesteps `dpm_solver` visits, in increasing order (it walks them from the last), as diffusers'
    ``DPMSolverMultistepScheduler.set_timesteps`` computes them for ``timestep_spacing=spacing`` (steps_offset 0)."""
    steps = check_steps(steps, num_timesteps)
    T = num_timesteps
    if spacing == "linspace":
        seq = np.linspace(0, T - 1, steps + 1).round()[1:]
    elif spacing == "leading":
        ratio = T // (steps + 1)
        if ratio < 1:
            raise ConfigError(f"spacing='leading' needs steps + 1 <= T={T}, got steps={steps}; use 'linspace'")
        seq = np.arange(1, steps + 1) * ratio
    elif spacing == "trailing":
        seq = (np.arange(T, 0, -T / steps).round() - 1)[::-1]
    else:
        raise ConfigError(f"dpm_solver spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")
    out = [int(t) for t in seq]
    if len(out) != steps or len(set(out)) != steps:
        raise ConfigError(
            f"spacing={spacing!r} gives {len(set(out))} distinct timesteps for steps={steps} (T={T}); "
            "use fewer steps or spacing='linspace'"
        )
    return out
