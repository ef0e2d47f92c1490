"""DDIM sampling (Song et al. 2021, Eq. 12), as in ermongroup/ddim ``generalized_steps``.

The loop index ``i`` (0 = noisiest) is passed to the model as ``step=i``; one model call per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError
from .adapter import check_step_aware
from .model import check_sampler, check_sampler_inputs, fields_of
from .noise import NoiseSchedule, Spacing, ddim_timesteps, eps_from_output
from .settings import planned_settings


__all__ = ["ddim", "StepInfo", "resolve_noise_schedule"]


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports to its ``callback`` after each step (k-diffusion style)."""

    step: int  # sampler step, 0 = noisiest
    t: int  # model timestep of this step
    x: Tensor  # x_t fed to the model
    eps: Tensor  # noise estimate (the model output, converted to eps for v-prediction models)
    x0_pred: Tensor  # predicted x_0
    x_next: Tensor  # x after the step


def resolve_noise_schedule(model: Any, noise: NoiseSchedule | None) -> NoiseSchedule:
    noise = noise if noise is not None else fields_of(model).noise_schedule
    if noise is None:
        raise ConfigError(
            "no noise schedule: pass noise=NoiseSchedule(...) or sample a cq SamplerModel that declares one "
            f"(FullPrecision(unet) of a cq UNet, a CompressedUNet); got {type(model).__name__}"
        )
    return noise


@torch.no_grad()
def ddim(
    model: Callable[..., Tensor],
    x: Tensor,
    *,
    steps: int,
    cond: Any = None,
    eta: float = 0.0,
    spacing: Spacing = "uniform",
    noise: NoiseSchedule | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    generator: torch.Generator | None = None,
    clip_x0: bool = False,
    progress: bool = False,
) -> Tensor:
    """Run DDIM from ``x`` (= x_T) and return x_0.

    Args:
        model: called as ``model(x, t, cond, step=i)``; wrap plain networks in `FullPrecision`.
        x: initial noise ``[B, ...]``.
        steps: number of sampler steps (= model calls).
        cond: conditioning passed through to the model unchanged.
        eta: 0 is deterministic DDIM, 1 is DDPM-like ancestral noise.
        spacing: timestep convention, see `ddim_timesteps`.
        noise: the model's noise schedule; default ``model.noise_schedule``.
        callback: called with a `StepInfo` after every step.
        generator: source of the ancestral noise when ``eta > 0``.
        clip_x0: clip the predicted x_0 to [-1, 1] and re-derive eps from it (the DDPM sampler's
            ``clip_denoised``; the ddim code does not clip, so the default is off).
        progress: show a tqdm bar.
    """
    check_sampler_inputs(x, eta=eta)
    check_step_aware(model)
    noise = resolve_noise_schedule(model, noise)
    seq = ddim_timesteps(noise.num_timesteps, steps, spacing)
    check_sampler(
        model, planned_settings("ddim", steps, noise.num_timesteps, spacing=spacing, eta=eta, clip_x0=clip_x0)
    )
    abar = noise.alphas_cumprod()
    final = abar[0] if spacing == "ldm" else torch.tensor(1.0, dtype=torch.float64)
    alphas = [abar[t] for t in seq]
    alphas_next = [final, *alphas[:-1]]  # alpha of the step each one lands on

    n = x.shape[0]
    for i in tqdm(range(steps), desc="ddim", disable=not progress, leave=False):
        k = steps - 1 - i  # walk the sequence from the end
        t = seq[k]
        at, an = alphas[k].item(), alphas_next[k].item()
        out = model(x, torch.full((n,), t, dtype=torch.long, device=x.device), cond, step=i)
        eps = eps_from_output(out, x, at, noise.prediction)
        x0 = (x - eps * (1 - at) ** 0.5) / at**0.5
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - at**0.5 * x0) / (1 - at) ** 0.5
        c1 = eta * ((1 - at / an) * (1 - an) / (1 - at)) ** 0.5
        c2 = max((1 - an) - c1**2, 0.0) ** 0.5
        x_next = an**0.5 * x0 + c2 * eps
        if c1 > 0:
            x_next = x_next + c1 * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        if callback is not None:
            callback(StepInfo(step=i, t=t, x=x, eps=eps, x0_pred=x0, x_next=x_next))
        x = x_next
    return x
