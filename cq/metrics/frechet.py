"""The Fréchet distance between Gaussians fitted to two feature sets -- the formula FID uses (Heusel et al. 2017).

``d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``. The trace of the matrix square root is computed
from the eigenvalues of the symmetric ``S_1^{1/2} S_2 S_1^{1/2}`` (same trace, real and non-negative), in
float64, so no complex-valued ``sqrtm`` and no scipy are needed. Used by the digits FID of the demo model and by
any FID on real features (Inception, through the ``eval`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError


__all__ = ["GaussianStats", "gaussian_stats", "frechet_distance", "frechet_distance_of"]


@dataclass(frozen=True)
class GaussianStats:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64) of a feature set of ``count`` rows."""

    mean: Tensor
    cov: Tensor
    count: int


def gaussian_stats(features: Tensor) -> GaussianStats:
    """Mean and unbiased covariance of ``[N, D]`` features (N >= 2)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ConfigError(f"features must be [N, D] with N >= 2, got {tuple(features.shape)}")
    f = features.detach().double().cpu()
    if not bool(torch.isfinite(f).all()):
        raise ConfigError("features contain NaN or inf; the samples they come from are not finite")
    return GaussianStats(mean=f.mean(0), cov=torch.cov(f.T).reshape(f.shape[1], f.shape[1]), count=f.shape[0])


def _sqrt_psd(m: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Squared Fréchet distance between the Gaussians ``a`` and ``b`` (>= 0; 0 iff they are equal)."""
    if a.mean.shape != b.mean.shape:
        raise ConfigError(f"feature dimensions differ: {tuple(a.mean.shape)} vs {tuple(b.mean.shape)}")
    root_a = _sqrt_psd(a.cov)
    inner = root_a @ b.cov @ root_a
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    d2 = (a.mean - b.mean).pow(2).sum() + torch.trace(a.cov) + torch.trace(b.cov) - 2 * trace_sqrt
    return float(d2.clamp_min(0))


def frechet_distance_of(features_a: Tensor, features_b: Tensor) -> float:
    """`frechet_distance` of the Gaussians fitted to two ``[N, D]`` feature sets."""
    return frechet_distance(gaussian_stats(features_a), gaussian_stats(features_b))
