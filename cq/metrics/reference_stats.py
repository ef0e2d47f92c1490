"""Reference statistics for FID: ``mu`` / ``sigma`` of real images' features, in one ``.npz`` file.

The layout is the ADM (guided-diffusion evaluator) and clean-fid convention: ``mu`` ``[D]``, ``sigma`` ``[D, D]``,
and ADM's ``mu_s`` / ``sigma_s`` of the spatial features behind sFID (Inception only). cq adds ``count`` (images
behind the statistics), ``extractor`` (the feature space, checked against the one in use) and, optionally,
``features`` (a subset of the real features, rows ``[M, D]``), which precision / recall need. ADM's reference
batches (``VIRTUAL_imagenet256_labeled.npz``) load as they are.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ReferenceStatsError
from ..io import atomic_path
from .frechet import GaussianStats, gaussian_stats


__all__ = ["ReferenceStats"]


@dataclass(frozen=True)
class ReferenceStats:
    """Gaussian statistics of real features (``stats``), the feature space they live in (``extractor``; None for
    files that do not say, e.g. ADM's) and, for precision / recall, real feature rows (``features``)."""

    stats: GaussianStats
    extractor: str | None
    features: Tensor | None = None
    spatial: GaussianStats | None = None  # sFID's (ADM: mu_s / sigma_s); None for extractors without them

    @classmethod
    def of(
        cls, features: Tensor, extractor: str, keep_features: int = 0, spatial: Tensor | None = None
    ) -> ReferenceStats:
        """Statistics of ``[N, D]`` features (and of ``spatial`` features, for sFID); the first ``keep_features``
        rows are kept for precision / recall."""
        kept = features[:keep_features].float().cpu().clone() if keep_features > 0 else None
        spatial_stats = gaussian_stats(spatial) if spatial is not None else None
        return cls(stats=gaussian_stats(features), extractor=extractor, features=kept, spatial=spatial_stats)

    @property
    def dim(self) -> int:
        return int(self.stats.mean.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` atomically (complete or absent)."""
        arrays = {
            "mu": self.stats.mean.double().numpy(),
            "sigma": self.stats.cov.double().numpy(),
            "count": np.asarray(self.stats.count, dtype=np.int64),
        }
        if self.extractor is not None:
            arrays["extractor"] = np.asarray(self.extractor)
        if self.features is not None:
            arrays["features"] = self.features.float().numpy()
        if self.spatial is not None:
            arrays["mu_s"], arrays["sigma_s"] = self.spatial.mean.double().numpy(), self.spatial.cov.double().numpy()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        """Read and validate a file written by `save` (or an ADM / clean-fid ``mu`` / ``sigma`` npz).

        Raises:
            ReferenceStatsError: missing file, not an npz, no ``mu`` / ``sigma``, inconsistent shapes, or
                values that are not finite.
        """
        path = Path(path)
        if not path.is_file():
            raise ReferenceStatsError(f"no reference statistics at {path}; write them with cq eval --make-ref")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("mu", "sigma") if k not in z.files]
                if missing:
                    raise ReferenceStatsError(
                        f"{path} has no {' / '.join(missing)} (keys: {sorted(z.files)}); expected the mu / sigma "
                        "of real features: cq eval --make-ref IMAGES -o ref.npz"
                    )
                mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
                count = int(z["count"]) if "count" in z.files else 0
                extractor = str(z["extractor"]) if "extractor" in z.files else None
                features = np.asarray(z["features"], np.float32) if "features" in z.files else None
                spatial = (
                    (np.asarray(z["mu_s"], np.float64), np.asarray(z["sigma_s"], np.float64))
                    if "mu_s" in z.files and "sigma_s" in z.files
                    else None
                )
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ReferenceStatsError(f"{path} is not a readable .npz of reference statistics ({e})") from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ReferenceStatsError(
                f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit; expected mu [D] and sigma [D, D]"
            )
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ReferenceStatsError(f"{path}: mu / sigma hold NaN or inf; rebuild the statistics")
        if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
            raise ReferenceStatsError(f"{path}: features {features.shape} are not rows of dimension {mu.shape[0]}")
        spatial_stats = None
        if spatial is not None:
            mu_s, sigma_s = spatial
            if mu_s.ndim != 1 or sigma_s.shape != (mu_s.shape[0], mu_s.shape[0]):
                raise ReferenceStatsError(f"{path}: mu_s {mu_s.shape} and sigma_s {sigma_s.shape} do not fit")
            if not (np.isfinite(mu_s).all() and np.isfinite(sigma_s).all()):
                raise ReferenceStatsError(f"{path}: mu_s / sigma_s hold NaN or inf; rebuild the statistics")
            spatial_stats = GaussianStats(mean=torch.from_numpy(mu_s), cov=torch.from_numpy(sigma_s), count=count)
        stats = GaussianStats(mean=torch.from_numpy(mu), cov=torch.from_numpy(sigma), count=count)
        rows = None if features is None else torch.from_numpy(features)
        return cls(stats=stats, extractor=extractor, features=rows, spatial=spatial_stats)

    def check_compatible(self, extractor: str, dim: int, source: str = "the reference") -> None:
        """Refuse statistics of another feature space than ``extractor``'s ``dim``-dimensional one."""
        if self.dim != dim:
            raise ReferenceStatsError(
                f"{source} holds {self.dim}-d statistics, but {extractor} gives {dim}-d features; "
                "build the reference with the same extractor (cq eval --make-ref ... --extractor)"
            )
        if self.extractor is not None and self.extractor != extractor:
            raise ReferenceStatsError(
                f"{source} was built with {self.extractor}, not {extractor}; statistics of one feature space "
                "cannot be compared with another"
            )
