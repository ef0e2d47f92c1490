"""Replaying recorded trace inputs through a (compressed) UNet, the way the cached model would run them.

A `CalibrationBatch` names a trace step, trace rows and -- for cached steps -- the refresh step whose
full-precision cached feature feeds a shallow call (CacheQuant §4.3: calibration on the cached model).
`replay` makes those calls inside ``step_scope(step)``; callers observe them with scoped hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .cache.view import CacheView
from .errors import ConfigError
from .step import step_scope


if TYPE_CHECKING:
    from .trace import Trace

__all__ = ["CalibrationBatch", "replay", "every_step"]

FeatureTransform = Callable[[Tensor, int], Tensor]


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
    point: str | None,
    transform: FeatureTransform | None = None,
    progress: bool = False,
    desc: str = "replay",
) -> None:
    """Run ``unet`` on each batch's trace inputs (full or shallow call) inside ``step_scope(batch.step)``.

    Args:
        unet: a cq UNet (possibly quantized); called as ``unet(x, t, cond, cache=view)``.
        trace: the recorded full-precision trace.
        batches: what to run.
        point: cache point of the shallow calls (must be in ``trace.features`` if any batch has a source).
        transform: ``fn(feature, step)`` applied to the cached feature before a shallow call (DEC correction).
    """
    batches = list(batches)
    if point is None and any(b.source is not None for b in batches):
        raise ConfigError("shallow calibration calls need a cache point")
    if point is not None and any(b.source is not None for b in batches) and point not in trace.features:
        raise ConfigError(
            f"calibrating a cached model needs trace features at {point!r}; record the trace with points=[{point!r}]"
        )
    device = next(unet.parameters(), torch.empty(0)).device
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="call"):
        x = trace.x[batch.step, batch.rows].to(device=device, dtype=torch.float32)
        t = trace.timesteps[batch.step].expand(x.shape[0]).to(device)
        cond = trace.cond[batch.step, batch.rows].to(device) if trace.cond is not None else None
        view = None
        if batch.source is not None:
            feature = trace.features[point][batch.source, batch.rows].to(device=device, dtype=torch.float32)
            if transform is not None:
                feature = transform(feature, batch.step)
            view = CacheView.shallow(point, feature)
        with step_scope(batch.step):
            unet(x, t, cond, cache=view)
