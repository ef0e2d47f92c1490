"""FID, Inception score, precision / recall and CLIP score of an image set: what ``cq eval`` prints.

- FID (Heusel et al. 2017): `cq.metrics.frechet.frechet_distance` between the Gaussian of the set's features and
  the reference statistics (`ReferenceStats`). The features come from a `FeatureExtractor` -- torch-fidelity's
  Inception-v3 for real models, the digits classifier for the demo.
- Inception score (Salimans et al. 2016): ``exp E KL(p(y|x) || p(y))`` over ``splits`` equal parts (10, as
  torch-fidelity and the guided-diffusion evaluator), mean and standard deviation.
- Precision / recall (Kynkaenniemi et al. 2019): a sample is "precise" when it lies inside the k-NN ball
  (k = 3) of some real feature; a real feature is "recalled" when it lies inside a sample's ball. Needs real
  feature rows in the reference (``cq eval --make-ref ... --keep-features``).
- CLIP score (`cq.metrics.clip_score`): mean and worst sample, for sets that carry prompts.
- sFID (Nash et al. 2021), as the guided-diffusion evaluator computes it: the Frechet distance of Inception's
  spatial features (the first 7 channels of ``mixed_6/conv``, 2023 values per image: `cq.metrics.extractors
  .SPATIAL_LAYER`) against the reference's ``mu_s`` / ``sigma_s`` (ADM's reference batches carry them; ``cq eval
  --make-ref`` writes them with the Inception extractor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError, MetricUnavailableError, ReferenceStatsError
from .clip_score import ClipScorer
from .digits import inception_score
from .extractors import FeatureExtractor, has_spatial
from .frechet import frechet_distance, gaussian_stats
from .image_set import ImageSet
from .reference_stats import ReferenceStats


__all__ = [
    "Fidelity",
    "measure",
    "extract_features",
    "make_reference",
    "check_metrics",
    "inception_score_splits",
    "precision_recall",
    "METRICS",
]

METRICS = ("fid", "is", "pr", "clip", "sfid")


@dataclass(frozen=True)
class Fidelity:
    """Metrics of ``count`` images in the ``extractor`` feature space (None: not measured)."""

    count: int
    extractor: str
    reference_count: int | None = None
    fid: float | None = None
    sfid: float | None = None
    inception_score: float | None = None
    inception_score_std: float | None = None
    inception_splits: int | None = None
    precision: float | None = None
    recall: float | None = None
    clip_score: float | None = None
    clip_score_min: float | None = None

    def as_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)

    def rows(self) -> list[list[str]]:
        """``[metric, value]`` rows of what was measured."""
        out = []
        if self.fid is not None:
            out.append(["FID", f"{self.fid:.3f}"])
        if self.sfid is not None:
            out.append(["sFID", f"{self.sfid:.3f}"])
        if self.inception_score is not None:
            spread = f"+- {self.inception_score_std:.3f} ({self.inception_splits} splits)"
            out.append(["IS", f"{self.inception_score:.3f} {spread}"])
        if self.precision is not None:
            out.append(["precision", f"{self.precision:.4f}"])
            out.append(["recall", f"{self.recall:.4f}"])
        if self.clip_score is not None:
            out.append(["CLIP score (mean)", f"{self.clip_score:.3f}"])
            out.append(["CLIP score (worst sample)", f"{self.clip_score_min:.3f}"])
        return out


def extract_features(
    extractor: FeatureExtractor | None,
    images: ImageSet,
    *,
    batch_size: int = 64,
    progress: bool = True,
    clip: ClipScorer | None = None,
    spatial: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(features [N, D], logits [N, K] or None, CLIP scores [N] or None, spatial [N, Ds] or None)`` of every image
    of the set, batch by batch (a progress bar over batches); CLIP scores need the set's prompts; ``spatial``: also
    the extractor's spatial features (sFID; `InceptionExtractor.with_spatial`). ``extractor=None``: CLIP scores
    only (features and logits None)."""
    if clip is not None and images.prompts is None:
        raise ConfigError(f"CLIP score needs prompts; {images.path} carries none (npz key 'prompts')")
    if spatial and not has_spatial(extractor):
        name = getattr(extractor, "name", "no extractor")
        raise MetricUnavailableError(
            f"sFID is defined on Inception-v3's spatial mixed_6/conv features; {name} has none (--extractor inception)"
        )
    feats, logits, clips, spatials, seen = [], [], [], [], 0
    total = -(-images.count // batch_size)
    for batch in tqdm(images.batches(batch_size), total=total, desc="features", unit="batch", disable=not progress):
        if extractor is not None:
            if spatial:
                f, z, sp = extractor.with_spatial(batch)
                spatials.append(sp.float().cpu())
            else:
                f, z = extractor(batch)
            if f.ndim != 2 or f.shape[0] != batch.shape[0]:
                raise ConfigError(f"{extractor.name} returned features {tuple(f.shape)} for {batch.shape[0]} images")
            feats.append(f.float().cpu())
            if z is not None:
                logits.append(z.float().cpu())
        if clip is not None:
            clips.append(clip.scores(batch, images.prompts[seen : seen + batch.shape[0]]))
        seen += batch.shape[0]
    return (
        torch.cat(feats) if feats else None,
        torch.cat(logits) if logits and len(logits) == len(feats) else None,
        torch.cat(clips) if clips else None,
        torch.cat(spatials) if spatials else None,
    )


def inception_score_splits(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation of the Inception score over ``splits`` equal parts of ``[N, K]`` logits."""
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1 or logits.shape[0] < splits:
        raise ConfigError(f"splits must be an int in [1, N={logits.shape[0]}], got {splits!r}")
    probs = logits.double().softmax(1)
    scores = torch.tensor([inception_score(part) for part in probs.tensor_split(splits)], dtype=torch.float64)
    return float(scores.mean()), float(scores.std(unbiased=False)) if splits > 1 else 0.0


def _kth_neighbour_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance of every row of ``x`` to its k-th nearest other row."""
    radii = []
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start : start + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the row itself is at distance 0
    return torch.cat(radii)


def _inside_any_ball(points: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> Tensor:
    inside = []
    for start in range(0, points.shape[0], chunk):
        d = torch.cdist(points[start : start + chunk], centres)
        inside.append((d <= radii[None]).any(1))
    return torch.cat(inside)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of ``fake`` against ``real`` ``[N, D]`` features."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ConfigError(f"features must be [N, D] of one D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ConfigError(f"precision / recall with k={k} need more than {k} rows in each set")
    real, fake = real.double(), fake.double()
    precision = _inside_any_ball(fake, real, _kth_neighbour_radii(real, k, chunk), chunk).double().mean()
    recall = _inside_any_ball(real, fake, _kth_neighbour_radii(fake, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metric names, deduplicated; unknown names are refused."""
    metrics = tuple(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ConfigError(f"metrics must be a non-empty subset of {', '.join(METRICS)}, got {list(metrics)}")
    return metrics


def measure(
    images: ImageSet,
    extractor: FeatureExtractor | None,
    reference: ReferenceStats | None,
    *,
    metrics: Sequence[str] = ("fid", "is"),
    clip: ClipScorer | None = None,
    splits: int = 10,
    batch_size: int = 64,
    progress: bool = True,
) -> Fidelity:
    """The requested ``metrics`` (a subset of `METRICS`) of ``images``; ``extractor`` may be None when only
    ``clip`` is requested.

    Raises:
        ConfigError: an unknown metric, FID / sFID / precision-recall without a reference (sFID: without its
            ``mu_s`` / ``sigma_s``), CLIP without a scorer.
        MetricUnavailableError: sFID from an extractor without spatial features; IS from one without logits.
        ReferenceStatsError: a reference of another feature space.
    """
    metrics = check_metrics(metrics)
    if ("fid" in metrics or "pr" in metrics or "sfid" in metrics) and reference is None:
        raise ConfigError(
            "FID, sFID and precision / recall need reference statistics: pass --ref (cq eval --make-ref)"
        )
    if "sfid" in metrics and reference.spatial is None:
        raise ConfigError(
            "sFID needs the reference's spatial statistics (mu_s / sigma_s): build it with cq eval --make-ref "
            "--extractor inception, or use an ADM reference batch (VIRTUAL_*.npz)"
        )
    if "pr" in metrics and reference.features is None:
        raise ConfigError(
            "precision / recall need real feature rows in the reference; rebuild it with "
            "cq eval --make-ref IMAGES -o ref.npz --keep-features 10000"
        )
    if extractor is None and metrics != ("clip",):
        raise ConfigError(f"metrics {list(metrics)} need a feature extractor; only clip goes without one")
    if "clip" in metrics and clip is None:
        raise ConfigError("CLIP score needs a CLIP model: pass --clip-weights PATH (and --clip-arch)")
    features, logits, clip_scores, spatial = extract_features(
        extractor,
        images,
        batch_size=batch_size,
        progress=progress,
        clip=clip if "clip" in metrics else None,
        spatial="sfid" in metrics,
    )
    if reference is not None and features is not None:
        reference.check_compatible(extractor.name, features.shape[1])
    if spatial is not None and reference.spatial.mean.shape[0] != spatial.shape[1]:
        raise ReferenceStatsError(
            f"the reference's spatial statistics are {reference.spatial.mean.shape[0]}-d, but {extractor.name} "
            f"gives {spatial.shape[1]}-d spatial features"
        )
    out: dict = {"count": images.count, "extractor": "none" if extractor is None else extractor.name}
    if reference is not None:
        out["reference_count"] = reference.stats.count or None
    if "fid" in metrics:
        out["fid"] = frechet_distance(gaussian_stats(features), reference.stats)
    if spatial is not None:
        out["sfid"] = frechet_distance(gaussian_stats(spatial), reference.spatial)
    if "is" in metrics:
        if logits is None:
            raise MetricUnavailableError(f"{extractor.name} gives no class logits, so no Inception score")
        used = splits if images.count >= 2 * splits else 1
        out["inception_score"], out["inception_score_std"] = inception_score_splits(logits, used)
        out["inception_splits"] = used
    if "pr" in metrics:
        out["precision"], out["recall"] = precision_recall(reference.features, features)
    if clip_scores is not None:
        out["clip_score"], out["clip_score_min"] = float(clip_scores.mean()), float(clip_scores.min())
    return Fidelity(**out)


def make_reference(
    images: ImageSet,
    extractor: FeatureExtractor,
    *,
    keep_features: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> ReferenceStats:
    """`ReferenceStats` of a set of real images (``cq eval --make-ref``); the first ``keep_features`` feature
    rows are kept for precision / recall; an extractor with spatial features (Inception) adds sFID's statistics."""
    if isinstance(keep_features, bool) or not isinstance(keep_features, int) or keep_features < 0:
        raise ConfigError(f"keep_features must be an int >= 0, got {keep_features!r}")
    spatial = has_spatial(extractor)
    features, _, _, rows = extract_features(
        extractor, images, batch_size=batch_size, progress=progress, spatial=spatial
    )
    return ReferenceStats.of(features, extractor.name, keep_features=keep_features, spatial=rows)
