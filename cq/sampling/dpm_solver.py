"""DPM-Solver++(2M): the multistep second-order solver of the diffusion ODE in data prediction (Lu et al. 2022,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Alg. 2), as diffusers'
``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`` runs it with its defaults
(``solver_type="midpoint"``, ``final_sigmas_type="zero"``, ``lower_order_final=True``).

With ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``, ``lambda_t = log(alpha_t / sigma_t)`` and the data
prediction ``x0_i = (x_i - sigma_i eps_i) / alpha_i`` of step ``i`` (timesteps ``t_0 > t_1 > ...``, ``h_i =
lambda_{i+1} - lambda_i``)::

    step 0 (first order, = DDIM):  x_1 = (sigma_1 / sigma_0) x_0 - alpha_1 (e^{-h_0} - 1) x0_0
    step i (second order):         D = x0_i + (x0_i - x0_{i-1}) / (2 r_i),   r_i = h_{i-1} / h_i
                                   x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D
    last step:                     lands on sigma = 0 (alpha = 1): x = x0 of the last step (first order)

One model call per step, ``step=i`` passed explicitly; deterministic (``eta`` must be 0).

Timesteps (``spacing``, the names of diffusers' ``timestep_spacing`` for this scheduler, which differ from DDIM's:
DPM-Solver divides the range into ``steps + 1`` points and drops ``t = 0``):

* ``linspace`` (diffusers' default): ``round(linspace(0, T - 1, steps + 1))[1:]``;
* ``leading``: ``arange(1, steps + 1) * (T // (steps + 1))`` (+ ``steps_offset``, e.g. 1 in SD's config: not modelled;
  fit through `cq.diffusers` for that);
* ``trailing``: ``round(arange(T, 0, -T / steps)) - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapter import check_step_aware
from .ddim import StepInfo, resolve_noise_schedule
from .model import check_sampler, check_sampler_inputs
from .noise import NoiseSchedule, dpm_solver_timesteps, eps_from_output
from .settings import planned_settings


__all__ = ["dpm_solver", "dpm_solver_timesteps", "DPMSpacing"]

DPMSpacing = Literal["linspace", "leading", "trailing"]


@torch.no_grad()
def dpm_solver(
    model: Callable[..., Tensor],
    x: Tensor,
    *,
    steps: int,
    cond: Any = None,
    eta: float = 0.0,
    spacing: DPMSpacing = "linspace",
    noise: NoiseSchedule | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Run DPM-Solver++(2M) from ``x`` (= x_T) and return x_0.

    Args:
        model: an eps- or v-prediction model (its noise schedule's ``prediction``) called as
            ``model(x, t, cond, step=i)``; wrap plain networks in `FullPrecision`.
        x: initial noise ``[B, ...]``.
        steps: solver steps (= model calls).
        cond: conditioning passed through to the model unchanged.
        eta: must be 0 (the ODE solver is deterministic).
        spacing: timestep convention, see `dpm_solver_timesteps` (diffusers' names for this scheduler).
        noise: the model's noise schedule; default ``model.noise_schedule``.
        callback: called with a `StepInfo` after every step (``x0_pred`` is the step's data prediction).
        generator: unused (deterministic); accepted for the common sampler signature.
        progress: show a tqdm bar.
    """
    del generator
    check_sampler_inputs(x, eta=eta, deterministic="DPM-Solver++(2M)")
    check_step_aware(model)
    noise = resolve_noise_schedule(model, noise)
    seq = dpm_solver_timesteps(noise.num_timesteps, steps, spacing)[::-1]  # noisiest first
    check_sampler(model, planned_settings("dpm_solver", steps, noise.num_timesteps, spacing=spacing))
    abar = noise.alphas_cumprod()
    alpha = [math.sqrt(abar[t].item()) for t in seq] + [1.0]  # the run ends on sigma = 0
    sigma = [math.sqrt(1.0 - abar[t].item()) for t in seq] + [0.0]
    lam = [math.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1], strict=True)]

    n = x.shape[0]
    x0_prev: Tensor | None = None
    for i in tqdm(range(steps), desc="dpm-solver++", disable=not progress, leave=False):
        t = seq[i]
        out = model(x, torch.full((n,), t, dtype=torch.long, device=x.device), cond, step=i)
        eps = eps_from_output(out, x, abar[t].item(), noise.prediction)
        x0 = (x - sigma[i] * eps) / alpha[i]
        if i == steps - 1:  # sigma_{i+1} = 0: h is infinite, the first-order update gives x0 exactly
            x_next = x0
        else:
            h = lam[i + 1] - lam[i]
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (lam[i] - lam[i - 1]) / 2)
            x_next = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * d
        if callback is not None:
            callback(StepInfo(step=i, t=t, x=x, eps=eps, x0_pred=x0, x_next=x_next))
        x0_prev, x = x0, x_next
    return x
