"""Multiply-accumulate counts of full and shallow (cached) UNet calls, and the speedup a schedule predicts.

Counted: every layer in `cq.quant.layer_table` by its row's MAC rule -- convolutions (out elements x in_ch/groups x
kernel size), linears (out elements x in_features) and the attention `MatMul` modules (out elements x inner dim),
float, fake-quant or integer alike -- the same ops ``torch.utils.flop_counter`` counts (it reports 2 FLOPs per
MAC), which the tests cross-check. Norms, activations, softmax and resampling are not counted (a few % of the
work; DeepCache's and CacheQuant's counts leave them out too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.step import step_scope
from ..core.view import CacheView
from ..quant.layer_table import LayerKind, kind_of


__all__ = ["MacCount", "count_macs", "unet_macs", "predicted_speedup"]


@dataclass
class MacCount:
    """MACs of one call, by op type and by module name."""

    conv: int = 0
    linear: int = 0
    matmul: int = 0
    by_module: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.conv + self.linear + self.matmul


@contextlib.contextmanager
def _counting(model: nn.Module, count: MacCount) -> Iterator[None]:
    def hook(name: str, row: LayerKind, module: nn.Module, inputs: tuple[Any, ...], out: Tensor) -> None:
        macs = row.macs(module, inputs[0].shape, out.shape)
        setattr(count, row.op, getattr(count, row.op) + macs)
        count.by_module[name] = count.by_module.get(name, 0) + macs

    handles = []
    try:
        for name, module in model.named_modules():
            row = kind_of(module)
            if row is not None:
                handles.append(module.register_forward_hook(lambda m, i, o, n=name, r=row: hook(n, r, m, i, o)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def count_macs(unet: nn.Module, x: Tensor, t: Tensor, cond: Any = None, *, cache: CacheView | None = None) -> MacCount:
    """MACs of one ``unet(x, t, cond, cache=cache)`` call (forward hooks, removed afterwards)."""
    count = MacCount()
    with _counting(unet, count):
        unet(x, t, cond, cache=cache)
    return count


@torch.no_grad()
def unet_macs(
    unet: nn.Module, *, batch: int = 1, cond: Any = None, points: Sequence[str] | None = None
) -> dict[str, int]:
    """``{"full": F, point: S_point, ...}``: MACs of a full call and of a shallow call at each cache point."""
    points = tuple(unet.cache_points()) if points is None else tuple(points)
    device = next(unet.parameters()).device
    x = torch.randn((batch, *unet.sample_shape), device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    view = CacheView.full(record=points)
    with step_scope(0):  # per-step quantized modules need a step; MACs do not depend on it
        result = {"full": count_macs(unet, x, t, cond, cache=view).total}
        for p in points:
            result[p] = count_macs(unet, x, t, cond, cache=CacheView.shallow(p, view.features[p])).total
    return result


def predicted_speedup(full: float, shallow: float, mask: Sequence[bool]) -> float:
    """``T*F / (K*F + (T-K)*S)`` for a refresh mask with K refreshes out of T steps."""
    T, K = len(mask), sum(bool(m) for m in mask)
    return T * full / (K * full + (T - K) * shallow)
