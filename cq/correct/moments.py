"""Streamed per-channel moments and the closed-form least-squares affine fit of DEC.

CacheQuant's ``calculate_abCov`` fits ``y ≈ a*x + b`` per channel with ``a = Cov(x, y) / Var(x)`` and
``b = E[y] - a E[x]``, statistics over (batch, H, W). Here the five sums ``n, Σx, Σy, Σx², Σxy`` are accumulated
batch by batch (no feature dump; CacheQuant keeps every step's features, ~50 GB for ImageNet) and covariance
and variance use the *same* normalisation, so the fit equals ordinary least squares exactly (the reference
divides a biased covariance by an unbiased variance). `add_cached_steps` streams a cache's stale and fresh
features into such sums (`PairedSums`: these and `cq.correct.cross_moments.CrossMoments`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor


if TYPE_CHECKING:
    from ..cache.cacher import FeatureCache

__all__ = ["PairedSums", "ChannelMoments", "affine_fit", "add_cached_steps"]


class PairedSums:
    """Running sums per step of paired tensors ``x, y`` shaped ``[B, C, ...]`` (over batch and pixels, in float64
    on the CPU): the count ``n`` and the first moments ``sx``, ``sy`` here, the products in `_add_products`."""

    n: Tensor
    sx: Tensor
    sy: Tensor

    def update(self, step: int, x: Tensor, y: Tensor) -> None:
        x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1).cpu()  # [C, B*H*W]
        y = y.detach().double().transpose(0, 1).reshape(y.shape[1], -1).cpu()
        self.n[step] += x.shape[1]
        self.sx[step] += x.sum(1)
        self.sy[step] += y.sum(1)
        self._add_products(step, x, y)

    def _add_products(self, step: int, x: Tensor, y: Tensor) -> None:
        """Accumulate the second moments of ``x, y`` (``[C, N]`` each) at ``step``."""
        raise NotImplementedError


class ChannelMoments(PairedSums):
    """Running sums per (step, channel) of paired tensors ``x, y`` shaped ``[B, C, ...]``."""

    def __init__(self, num_steps: int, channels: int):
        shape = (num_steps, channels)
        self.n = torch.zeros(shape, dtype=torch.float64)
        self.sx = torch.zeros(shape, dtype=torch.float64)
        self.sy = torch.zeros(shape, dtype=torch.float64)
        self.sxx = torch.zeros(shape, dtype=torch.float64)
        self.sxy = torch.zeros(shape, dtype=torch.float64)

    def _add_products(self, step: int, x: Tensor, y: Tensor) -> None:
        self.sxx[step] += (x * x).sum(1)
        self.sxy[step] += (x * y).sum(1)

    def observed(self) -> Tensor:
        """``[T]`` True where a step received data."""
        return self.n[:, 0] > 0


def affine_fit(m: ChannelMoments, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Per (step, channel) least-squares ``a, b`` (float32 ``[T, C]``); ``a=1, b=0`` where a step has no data,
    ``a=1, b=E[y]-E[x]`` where x is constant (any slope fits; 1 keeps the feature's shape)."""
    n = m.n.clamp_min(1)
    mx, my = m.sx / n, m.sy / n
    var = m.sxx / n - mx * mx
    cov = m.sxy / n - mx * my
    flat = var <= eps * (1 + mx.abs()) ** 2
    a = torch.where(flat, torch.ones_like(var), cov / torch.where(flat, torch.ones_like(var), var))
    b = my - a * mx
    empty = m.n == 0
    a = torch.where(empty, torch.ones_like(a), a)
    b = torch.where(empty, torch.zeros_like(b), b)
    return a.float(), b.float()


def add_cached_steps(moments: PairedSums, cache: FeatureCache, features: Tensor, chunk: int = 16) -> None:
    """Stream what a cache correction is fitted on into ``moments``: at every cached step of ``cache``, the stale
    feature the step reads (``features[cache.source[step]]``, its refresh step's) paired with the fresh one
    (``features[step]``), ``chunk`` trajectories per update. ``features``: a trace's ``[T, k, C, ...]`` features
    at the cache point."""
    for step, refresh in enumerate(cache.mask):
        if refresh:
            continue
        for start in range(0, features.shape[1], chunk):
            rows = slice(start, start + chunk)
            moments.update(step, features[cache.source[step], rows], features[step, rows])
