"""What a fidelity measurement compares in: the feature extractor named by ``cq eval --extractor``
(`extractor_named`), and the reference statistics ``--ref`` names (`read_reference`): a statistics ``.npz``, a
set of real images, or the extractor's own statistics of its data."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError, ReferenceStatsError


__all__ = ["EXTRACTORS", "extractor_named", "read_reference"]

EXTRACTORS = ("inception", "digits")


def extractor_named(name: str, inception_weights: str | None = None, device="cpu"):
    """The `FeatureExtractor` ``name`` (``"inception"`` with ``inception_weights``, or ``"digits"``)."""
    from .extractors import DigitsExtractor, InceptionExtractor

    if name == "digits":
        if inception_weights is not None:
            raise ConfigError("--inception-weights applies to --extractor inception, not digits")
        return DigitsExtractor.embedded()
    return InceptionExtractor.load(inception_weights, device=device)


def read_reference(
    path: str | Path | None,
    extractor,
    *,
    batch_size: int,
    keep_features: int,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
):
    """The `ReferenceStats` at ``path``: a statistics ``.npz`` (``mu`` / ``sigma``), or a set of real images whose
    statistics are computed here in ``extractor``'s features (``log`` is told so); without a path, the
    extractor's own data statistics (the digits classifier has them), else None."""
    import numpy as np

    from .fidelity import make_reference
    from .image_set import read_image_set
    from .reference_stats import ReferenceStats

    if path is None:
        own = getattr(extractor, "data_reference", None)
        return own() if own is not None else None
    file = Path(path)
    if file.is_file() and file.suffix == ".npz":
        try:
            with np.load(file, allow_pickle=False) as z:
                is_stats = "mu" in z.files
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ReferenceStatsError(f"--ref {path}: not a readable .npz ({e})") from None
        if is_stats:
            return ReferenceStats.load(file)
    images = read_image_set(file)
    if log is not None:
        log(f"reference: {images.count} real images from {path} (statistics computed now)")
    return make_reference(images, extractor, keep_features=keep_features, batch_size=batch_size, progress=progress)
