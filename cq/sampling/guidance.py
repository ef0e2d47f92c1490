"""Classifier-free guidance (Ho & Salimans 2022) as a sampler-facing wrapper.

The wrapped model runs *once* per step on the pooled batch ``[uncond; cond]`` (CacheQuant's and the LDM code's
layout), so a `CompressedUNet` inside it caches, quantizes and corrects the pooled batch -- the batch it must
be calibrated on (`cq.trace(..., guidance_scale=, uncond=)`).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputShapeError
from .adapter import check_step_aware
from .model import SamplerModel, fields_of


__all__ = ["ClassifierFreeGuidance", "expand_uncond", "check_guidance", "guided"]


def expand_uncond(uncond: Tensor, cond: Tensor) -> Tensor:
    """``uncond`` (``[1, ...]`` or ``[B, ...]``) for the batch of ``cond``; raises `InputShapeError` if it cannot."""
    uncond = uncond.to(cond.device)
    if uncond.shape[0] == 1 and cond.shape[0] != 1:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    if uncond.shape != cond.shape:
        raise InputShapeError(
            f"uncond has shape {tuple(uncond.shape)}, cond {tuple(cond.shape)}; they must match "
            "(uncond may have batch 1)"
        )
    return uncond


class ClassifierFreeGuidance(SamplerModel):
    """``eps_u + scale * (eps_c - eps_u)`` from one call of ``model`` on ``[uncond; cond]``.

    Args:
        model: a sampler-facing model ``model(x, t, cond, step=i)`` (`FullPrecision(unet)`, a `CompressedUNet`).
        scale: guidance scale ``s`` (1: conditional model only; LDM-4-G uses 1.5, SD 7.5).
        uncond: the unconditional ``cond``, ``[1, ...]`` (broadcast over the batch) or ``[B, ...]``: the empty
            prompt's context for SD, the context of class 1000 for cin256-v2, the label 1000 for label UNets.
    """

    def __init__(self, model: nn.Module, scale: float, uncond: Tensor):
        check_step_aware(model)
        inner = fields_of(model)  # the samplers check the wrapped model's declarations
        super().__init__(
            noise_schedule=inner.noise_schedule, num_steps=inner.num_steps, sampler_settings=inner.sampler_settings
        )
        if not isinstance(uncond, Tensor):
            raise ConfigError(f"uncond must be a tensor (the unconditional cond), got {type(uncond).__name__}")
        self.model = model
        self.scale = check_guidance_scale(scale)
        self.uncond = uncond

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, *, step: int) -> Tensor:
        if cond is None:
            raise InputShapeError("classifier-free guidance needs the conditional cond")
        if self.scale == 1.0:
            return self.model(x, t, cond, step=step)
        batch = x.shape[0]
        uncond = expand_uncond(self.uncond, cond)
        t = t.expand(batch) if t.ndim == 0 else t
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]), step=step)
        eps_u, eps_c = out.chunk(2)
        return eps_u + self.scale * (eps_c - eps_u)


def check_guidance_scale(scale: object) -> float:
    """``scale`` as a float if it is a finite number; a NaN or infinite scale would make every sample NaN."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ConfigError(f"guidance_scale must be a number (finite; 1: no guidance, SD uses 7.5), got {scale!r}")
    return float(scale)


def check_guidance(scale: float, uncond: Tensor | None, cond: Tensor | None) -> bool:
    """Whether a run with ``guidance_scale=scale`` is guided (`cq.trace`, `cq.evaluate`); refuses guidance it
    cannot run: a non-number scale, a missing ``cond`` / ``uncond``, an ``uncond`` of another shape or with a
    batch other than 1 or ``cond``'s, an ``uncond`` without guidance."""
    check_guidance_scale(scale)
    if scale == 1.0:
        if uncond is not None:
            raise ConfigError("uncond is only used with guidance_scale != 1 (scale 1 runs the conditional model only)")
        return False
    if not isinstance(cond, Tensor) or not isinstance(uncond, Tensor):
        raise ConfigError(
            f"guidance_scale={scale:g} needs cond and uncond: the conditional rows and the unconditional cond "
            "(e.g. pipe.unconditional(1))"
        )
    if uncond.shape[0] not in (1, cond.shape[0]):
        raise InputShapeError(f"uncond must have batch 1 or {cond.shape[0]} (one per row), got {tuple(uncond.shape)}")
    expand_uncond(uncond[:1], cond[:1])  # same trailing shape as cond
    return True


def guided(model: nn.Module, scale: float, uncond: Tensor | None, rows: slice | Tensor) -> nn.Module:
    """``model`` guided for the batch ``rows`` of a run checked by `check_guidance` (``uncond`` of batch 1 is
    shared, a per-row one is sliced); ``model`` itself when the scale is 1."""
    if scale == 1.0:
        return model
    return ClassifierFreeGuidance(model, scale, uncond if uncond.shape[0] == 1 else uncond[rows])
