"""Adapters between plain networks and the sampler protocol ``model(x, t, cond, step=i)``."""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError
from .model import SamplerModel


__all__ = ["FullPrecision", "check_step_aware"]


class FullPrecision(SamplerModel):
    """Thin adapter: lets the samplers drive a plain network; ``step`` is accepted and ignored.

    Example:
        >>> x0 = ddim(FullPrecision(unet), noise, steps=50)
    """

    def __init__(self, unet: nn.Module):
        # a cq UNet declares its schedule (cq.models.CacheableUNet); a plain network may carry one
        super().__init__(noise_schedule=getattr(unet, "noise_schedule", None))
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, cond: Any = None, *, step: int) -> Tensor:
        return self.unet(x, t) if cond is None else self.unet(x, t, cond)


def check_step_aware(model: Any) -> None:
    """Raise a clear error when ``model`` cannot take the ``step=`` keyword the samplers pass."""
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call itself decide
        return
    if "step" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    raise ConfigError(
        f"{type(model).__name__}.forward does not accept `step=`; samplers call model(x, t, cond, step=i). "
        "Wrap a plain network as cq.sampling.FullPrecision(unet), or pass a cq CompressedUNet"
    )
