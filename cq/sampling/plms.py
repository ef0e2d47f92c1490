"""PLMS sampling (pseudo linear multi-step; Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"), as
in CompVis LDM ``ldm.models.diffusion.plms.PLMSSampler`` -- the sampler of SD v1 and of CacheQuant's SD runs.

Each sampler step moves along the DDIM update with a combined noise estimate ``e'``: the current model output
``e_0`` and the outputs ``e_1, e_2, e_3`` of the previous steps (Adams-Bashforth weights)::

    step 0:   e' = (e_0 + e(x_pred, t_next)) / 2        (pseudo improved Euler: a second model call)
    step 1:   e' = (3 e_0 - e_1) / 2
    step 2:   e' = (23 e_0 - 16 e_1 + 5 e_2) / 12
    step >=3: e' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24

Model calls vs sampler steps (algorithms.md §8.3 trap 2): ``steps`` sampler steps make ``steps + 1`` model calls,
because step 0 calls the model twice. cq's convention: **``step=`` is the model-call index**, counted in call
order: sampler step 0 makes calls 0 and 1 (``x_T`` at ``t_0``, then the predictor ``x_pred`` at ``t_1``), sampler step
``i >= 1`` makes call ``i + 1``. Every call thus has its own index, the indices run 0, 1, 2, ... in execution order
(what a cache schedule and per-step tables assume), and calls 1 and 2 share a timestep but not an input. A
`CompressedUNet` sampled with PLMS must be fitted with ``num_steps = plms.num_calls(steps)``; `plms` refuses
others. ``callback`` is still called once per *sampler* step (``StepInfo.step`` = sampler step, ``eps`` = ``e'``).

Timesteps: ``spacing="ldm"`` (default, LDM's ``make_ddim_timesteps``: ``range(0, T, T//steps) + 1``); the last step
lands on ``alphas_cumprod[0]``. PLMS is deterministic: ``eta`` must be 0 (LDM raises too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapter import check_step_aware
from .ddim import StepInfo, resolve_noise_schedule
from .model import check_sampler, check_sampler_inputs
from .noise import NoiseSchedule, Spacing, check_steps, ddim_timesteps, eps_from_output
from .settings import planned_settings


__all__ = ["plms", "num_calls"]


def num_calls(steps: int) -> int:
    """Model calls PLMS makes for ``steps`` sampler steps: ``steps + 1`` (two at step 0)."""
    return check_steps(steps) + 1


def _call_index(sampler_step: int, second: bool = False) -> int:
    """Model-call index of sampler step ``sampler_step`` (``second``: the extra call of step 0)."""
    return 1 if second else (0 if sampler_step == 0 else sampler_step + 1)


@torch.no_grad()
def plms(
    model: Callable[..., Tensor],
    x: Tensor,
    *,
    steps: int,
    cond: Any = None,
    eta: float = 0.0,
    spacing: Spacing = "ldm",
    noise: NoiseSchedule | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Run PLMS from ``x`` (= x_T) and return x_0.

    Args:
        model: called as ``model(x, t, cond, step=c)`` with ``c`` the model-call index (module docstring).
        x: initial noise ``[B, ...]``.
        steps: sampler steps; the model is called ``num_calls(steps) = steps + 1`` times.
        cond: conditioning passed through to the model unchanged.
        eta: must be 0 (PLMS has no stochastic variant).
        spacing: timestep convention, see `ddim_timesteps` (``"ldm"`` is LDM's).
        noise: the model's noise schedule; default ``model.noise_schedule``.
        callback: called with a `StepInfo` after every sampler step.
        generator: unused (PLMS is deterministic); accepted for the common sampler signature.
        progress: show a tqdm bar.
    """
    del generator
    check_sampler_inputs(x, eta=eta, deterministic="PLMS")
    check_step_aware(model)
    num_calls(steps)
    noise = resolve_noise_schedule(model, noise)
    seq = ddim_timesteps(noise.num_timesteps, steps, spacing)
    check_sampler(model, planned_settings("plms", steps, noise.num_timesteps, spacing=spacing))
    abar = noise.alphas_cumprod()
    final = abar[0] if spacing == "ldm" else torch.tensor(1.0, dtype=torch.float64)
    alphas = [abar[t].item() for t in seq]
    alphas_prev = [final.item(), *alphas[:-1]]  # alpha of the step each one lands on

    n = x.shape[0]
    old_eps: list[Tensor] = []
    for i in tqdm(range(steps), desc="plms", disable=not progress, leave=False):
        k = steps - 1 - i  # walk the sequence from the end
        t, t_next = seq[k], seq[max(k - 1, 0)]
        at, ap = alphas[k], alphas_prev[k]

        def ddim_step(eps: Tensor, at: float = at, ap: float = ap, x: Tensor = x) -> tuple[Tensor, Tensor]:
            x0 = (x - (1 - at) ** 0.5 * eps) / at**0.5
            return ap**0.5 * x0 + (1 - ap) ** 0.5 * eps, x0

        out = model(x, torch.full((n,), t, dtype=torch.long, device=x.device), cond, step=_call_index(i))
        eps = eps_from_output(out, x, at, noise.prediction)
        if not old_eps:
            x_pred, _ = ddim_step(eps)
            t2 = torch.full((n,), t_next, dtype=torch.long, device=x.device)
            out2 = model(x_pred, t2, cond, step=_call_index(i, second=True))
            eps_prime = (eps + eps_from_output(out2, x_pred, abar[t_next].item(), noise.prediction)) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_next, x0 = ddim_step(eps_prime)
        old_eps = [*old_eps[-2:], eps]
        if callback is not None:
            callback(StepInfo(step=i, t=t, x=x, eps=eps_prime, x0_pred=x0, x_next=x_next))
        x = x_next
    return x


plms.num_calls = num_calls  # so `trace` and fitting code can ask any sampler how many calls it makes
