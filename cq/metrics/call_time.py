"""`call_seconds`: measured wall-clock of a full UNet call and of the shallow call at each cache point.

What a wall-clock budget is planned on (`cq.fit.BudgetCache(measure="wall")`): MACs overstate the speedup of
small shallow calls, whose time is dominated by per-layer overhead rather than arithmetic (README, tiny-config
table). Calls are timed interleaved -- full, then every point's shallow call, ``repeats`` times -- after one
warm-up round, and the medians are returned, on the inputs given (the device, batch and dtype they will run on).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.step import step_scope
from ..core.view import CacheView
from ..errors import ConfigError


__all__ = ["call_seconds"]


@torch.no_grad()
def call_seconds(
    unet: nn.Module, x: Tensor, t: Tensor, cond: Any = None, *, points: Sequence[str], repeats: int = 5
) -> dict[str, float]:
    """``{"full": seconds, point: seconds, ...}``: median wall-clock of a full call and of the shallow call at each
    of ``points`` on ``(x, t, cond)``."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an int >= 1, got {repeats!r}")
    points = tuple(points)
    synchronize = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in ("full", *points)}
    with step_scope(0):  # per-step quantized modules need a step; the time does not depend on it
        view = CacheView.full(record=points)
        unet(x, t, cond, cache=view)
        features = dict(view.features)
        for round_ in range(repeats + 1):  # round 0 warms every path up
            for name in times:
                cache = CacheView.full(record=()) if name == "full" else CacheView.shallow(name, features[name])
                synchronize()
                start = time.perf_counter()
                unet(x, t, cond, cache=cache)
                synchronize()
                if round_:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
