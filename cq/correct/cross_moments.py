"""Streamed cross-channel second moments and the closed-form low-rank affine fit of the richer cache correction.

For each step, ``y ≈ a ∘ x + M x + b`` over (trajectories, pixels): ``a`` is DEC's per-channel least-squares gain
(`cq.correct.moments.affine_fit`), ``M`` (``C x C``, rank <= r) the least-squares map of the residual
``y - a ∘ x`` on all channels of ``x``, ridge-regularised towards 0 -- that is, shrunk towards the per-channel
affine, so on the fitting statistics the map is never worse than DEC's (``M = 0`` is one of its candidates).
With rank r < C it is reduced-rank ridge regression: the rank-r truncation of ``M A^(1/2)``, ``A = Cov(x) + λI``,
which is the exact minimiser of the penalised error over rank-r maps. Sums ``n, Σx, Σy, Σxxᵀ, Σxyᵀ`` are
accumulated batch by batch in float64 (no feature is kept).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .moments import PairedSums


__all__ = ["CrossMoments", "low_rank_affine_fit"]


class CrossMoments(PairedSums):
    """Running sums per step of paired tensors ``x, y`` shaped ``[B, C, ...]``, across channels."""

    def __init__(self, num_steps: int, channels: int):
        self.n = torch.zeros(num_steps, dtype=torch.float64)
        self.sx = torch.zeros(num_steps, channels, dtype=torch.float64)
        self.sy = torch.zeros(num_steps, channels, dtype=torch.float64)
        self.sxx = torch.zeros(num_steps, channels, channels, dtype=torch.float64)
        self.sxy = torch.zeros(num_steps, channels, channels, dtype=torch.float64)

    @property
    def channels(self) -> int:
        return self.sx.shape[1]

    def _add_products(self, step: int, x: Tensor, y: Tensor) -> None:
        self.sxx[step] += x @ x.T
        self.sxy[step] += x @ y.T


def low_rank_affine_fit(
    m: CrossMoments, rank: int, ridge: float, eps: float = 1e-12
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(gain [T, C], offset [T, C], up [T, C, r], down [T, r, C])`` (float32) with ``y ≈ gain ∘ x + up (down x)
    + offset``; identity (gain 1, the rest 0) at steps without data.

    ``ridge``: λ relative to the mean variance of x's channels (scale-free); ``rank``: r, 1..C."""
    T, C = m.sx.shape
    gain, offset = torch.ones(T, C, dtype=torch.float64), torch.zeros(T, C, dtype=torch.float64)
    up, down = torch.zeros(T, C, rank, dtype=torch.float64), torch.zeros(T, rank, C, dtype=torch.float64)
    for i in range(T):
        n = float(m.n[i])
        if n == 0:
            continue
        mx, my = m.sx[i] / n, m.sy[i] / n
        cxx = m.sxx[i] / n - torch.outer(mx, mx)
        cyx = m.sxy[i].T / n - torch.outer(my, mx)  # Cov(y, x)
        var, cov = cxx.diagonal(), cyx.diagonal()
        flat = var <= eps * (1 + mx.abs()) ** 2
        a = torch.where(flat, torch.ones_like(var), cov / torch.where(flat, torch.ones_like(var), var))
        residual = cyx - a[:, None] * cxx  # Cov(y - a ∘ x, x)
        lam = ridge * float(var.clamp_min(0).mean())
        system = cxx + lam * torch.eye(C, dtype=torch.float64)
        mix = residual @ torch.linalg.pinv(system, hermitian=True)  # ridge least squares of the residual
        energy = mix @ system @ mix.T  # the error M removes, per output direction (M A Mᵀ)
        vectors = torch.linalg.eigh((energy + energy.T) / 2).eigenvectors[:, -rank:]  # the top-r directions
        up[i], down[i] = vectors, vectors.T @ mix
        gain[i] = a
        offset[i] = my - a * mx - up[i] @ (down[i] @ mx)
    return gain.float(), offset.float(), up.float(), down.float()
