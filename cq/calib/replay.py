"""Replaying recorded trace inputs through a (compressed) UNet, the way the cached model would run them.

A `CalibrationBatch` names a trace step, trace rows and -- for cached steps -- the refresh step whose
full-precision cached feature feeds a shallow call (CacheQuant §4.3: calibration on the cached model).
`replay` makes those calls inside ``step_scope(step)``; callers observe them with scoped hooks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.step import step_scope
from ..errors import ConfigError


if TYPE_CHECKING:
    from ..cache.cacher import FeatureCache
    from .trace import Trace

__all__ = ["CalibrationBatch", "replay", "every_step"]


@dataclass(frozen=True)
class CalibrationBatch:
    """One call: trace step ``step`` on trace rows ``rows``; ``source`` is the refresh step whose cached feature
    feeds a shallow call (None: a full call)."""

    step: int
    rows: Tensor
    source: int | None = None


def every_step(
    mask: tuple[bool, ...], source: list[int], samples: int, keep: int, cached_samples: int | None = None
) -> list[CalibrationBatch]:
    """One batch per step: ``samples`` rows at refresh steps, ``cached_samples`` (default the same) at the others."""
    cached_samples = samples if cached_samples is None else cached_samples
    return [
        CalibrationBatch(
            step=i, rows=torch.arange(min(samples if r else cached_samples, keep)), source=None if r else source[i]
        )
        for i, r in enumerate(mask)
    ]


@torch.no_grad()
def replay(
    unet: nn.Module,
    trace: Trace,
    batches: Iterable[CalibrationBatch],
    *,
    cache: FeatureCache | None = None,
    progress: bool = False,
    desc: str = "replay",
) -> None:
    """Run ``unet`` on each batch's trace inputs inside ``step_scope(batch.step)``: a full call, or a shallow call
    through ``cache.shallow`` (the cache's correction applied, as when sampling) on the recorded full-precision
    feature of the batch's source step.

    Args:
        unet: a cq UNet (possibly quantized); called as ``unet(x, t, cond, cache=view)``.
        trace: the recorded full-precision trace.
        batches: what to run.
        cache: the model's `FeatureCache` (its point must be in ``trace.features``); needed if any batch has a
            source.
    """
    batches = list(batches)
    shallow = any(b.source is not None for b in batches)
    if shallow and cache is None:
        raise ConfigError("shallow calibration calls need the model's FeatureCache (replay(..., cache=...))")
    if shallow and cache.point not in trace.features:
        raise ConfigError(
            f"calibrating a cached model needs trace features at {cache.point!r}; record the trace with "
            f"points=[{cache.point!r}]"
        )
    device = next(unet.parameters(), torch.empty(0)).device
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="call"):
        x = trace.x[batch.step, batch.rows].to(device=device, dtype=torch.float32)
        t = trace.timesteps[batch.step].expand(x.shape[0]).to(device)
        cond = trace.cond[batch.step, batch.rows].to(device) if trace.cond is not None else None
        with step_scope(batch.step):
            if batch.source is None:
                unet(x, t, cond)
            else:
                feature = trace.features[cache.point][batch.source, batch.rows].to(device=device, dtype=torch.float32)
                cache.shallow(unet, x, t, cond, batch.step, feature)
