"""Feature extractors behind FID / IS / precision-recall: the `FeatureExtractor` protocol and two of them.

- `InceptionExtractor`: torch-fidelity's Inception-v3 port of the TensorFlow FID network (Heusel et al. 2017;
  the network the guided-diffusion evaluator and CacheQuant's tables use): 2048-d pool3 features and the
  1008-way ``logits_unbiased`` for the Inception score, and (`InceptionExtractor.with_spatial`) the spatial
  features of sFID. Needs the ``eval`` extra (``pip install cq[eval]``).
- `DigitsExtractor`: the digits classifier shipped with cq (`cq.metrics.digits`), for the 16x16 demo model, where
  Inception means nothing; no extra dependency, no download.

Tests pass any small module that follows the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..errors import CheckpointFormatError, InputShapeError, MetricUnavailableError


if TYPE_CHECKING:
    from .reference_stats import ReferenceStats

__all__ = ["FeatureExtractor", "InceptionExtractor", "DigitsExtractor", "check_images", "has_spatial"]

INCEPTION_NAME = "torch-fidelity-inception-v3-compat"
# sFID (Nash et al. 2021) as the guided-diffusion evaluator defines it: the tensor "mixed_6/conv:0" of the TF graph,
# its first 7 channels, flattened in TF's NHWC order (17 x 17 x 7 = 2023 values per image). The graph's blocks
# mixed, mixed_1 .. mixed_10 are torch-fidelity's Mixed_5b .. Mixed_7c (the same TF graph, ported), so mixed_6 is
# Mixed_6d, and its scope "conv" is the block's 1x1 branch: conv, batch norm, ReLU (torch-fidelity's branch1x1).
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps uint8 images ``[B, C, H, W]`` to ``(features [B, D], class logits [B, K] or None)``.

    ``name`` identifies the feature space: reference statistics record it, and statistics of one space are
    refused for another.
    """

    name: str

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]: ...


def has_spatial(extractor: object) -> bool:
    """Whether ``extractor`` gives sFID's spatial features (``with_spatial``, as `InceptionExtractor`)."""
    return callable(getattr(extractor, "with_spatial", None))


def check_images(images: Tensor) -> None:
    """Refuse anything but uint8 ``[B, 1 or 3, H, W]``."""
    is_tensor = isinstance(images, Tensor)
    if not is_tensor or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise InputShapeError(f"feature extractors take uint8 images [B, 1 or 3, H, W], got {got}")


@dataclass
class InceptionExtractor:
    """torch-fidelity's ``FeatureExtractorInceptionV3``: pool3 (2048-d) features and ``logits_unbiased``.

    Build it with `InceptionExtractor.load`. Grayscale images are repeated to RGB; torch-fidelity resizes to
    299x299 the way TensorFlow 1.x did.
    """

    net: nn.Module
    name: str = INCEPTION_NAME

    @classmethod
    def load(cls, weights: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionExtractor:
        """The extractor with weights from ``weights`` (torch-fidelity's ``weights-inception-2015-12-05-*.pth``).

        With ``weights=None`` torch-fidelity takes them from torch's hub cache and, when they are not there,
        downloads them into it (its own behaviour); pass a path to stay offline.

        Raises:
            MetricUnavailableError: torch-fidelity is not installed, the file does not exist, or the download failed.
            UnsafeCheckpointError / CheckpointFormatError: the file is not a plain state dict of Inception-v3's
                tensors.
        """
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise MetricUnavailableError(
                "FID / IS / precision-recall on Inception features need torch-fidelity: pip install 'cq[eval]'"
            ) from None
        if weights is not None:
            _check_state_dict(Path(weights))
        try:
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                feature_extractor_weights_path=None if weights is None else str(weights),
            )
        except RuntimeError as e:
            if weights is None:
                raise MetricUnavailableError(_NO_DOWNLOAD.format(e=f"{type(e).__name__}: {e}")) from None
            raise CheckpointFormatError(
                f"{weights} is not the state dict of torch-fidelity's Inception-v3 ({str(e).splitlines()[0]})"
            ) from None
        except OSError as e:  # URLError is an OSError
            raise MetricUnavailableError(_NO_DOWNLOAD.format(e=f"{type(e).__name__}: {e}")) from None
        return cls(net=net.to(device).eval())

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        check_images(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        device = next(self.net.parameters()).device
        pool, logits = self.net(images.to(device))
        return pool.float(), logits.float()

    @torch.no_grad()
    def with_spatial(self, images: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(pool3 [B, 2048], logits [B, 1008], spatial [B, 2023])`` from one forward: the spatial features are
        read from `SPATIAL_LAYER` by a hook that lives for this call only."""
        layer = self.net.get_submodule(SPATIAL_LAYER)
        seen: list[Tensor] = []
        handle = layer.register_forward_hook(lambda module, args, out: seen.append(out))
        try:
            pool, logits = self(images)
        finally:
            handle.remove()
        spatial = seen[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # NHWC, the TF graph's layout
        return pool, logits, spatial.reshape(spatial.shape[0], -1).float()


_NO_DOWNLOAD = (
    "could not get the Inception-v3 weights ({e}); download weights-inception-2015-12-05-6726825d.pth from "
    "torch-fidelity's releases once and pass --inception-weights PATH"
)


def _check_state_dict(path: Path) -> None:
    """torch-fidelity loads the file with ``weights_only=False``; read it safely first (plain tensors only)."""
    from ..models.checkpoint import read_state_dict

    if not path.is_file():
        raise MetricUnavailableError(
            f"no Inception-v3 weights at {path}; pass --inception-weights PATH to torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth (or omit it to let torch-fidelity fetch them into its cache)"
        )
    if path.suffix == ".safetensors":
        raise CheckpointFormatError(f"{path}: torch-fidelity reads its Inception weights as a torch .pth file")
    read_state_dict(path, ema=False)  # CheckpointFormatError / UnsafeCheckpointError


@dataclass
class DigitsExtractor:
    """The demo's digits classifier (`cq.metrics.digits.DigitsClassifier`): 64-d features, 10 logits.

    Takes 16x16 images (RGB is averaged to gray); `data_reference` gives the statistics of the 1797 real digits
    that ship with the classifier, so ``cq eval`` of demo samples needs no ``--ref``.
    """

    classifier: nn.Module
    data: ReferenceStats
    name: str = "cq-digits-classifier"

    @classmethod
    def embedded(cls) -> DigitsExtractor:
        from .digits import load_digits_classifier
        from .reference_stats import ReferenceStats

        classifier, stats = load_digits_classifier()
        return cls(classifier=classifier, data=ReferenceStats(stats=stats, extractor=cls.name))

    def data_reference(self) -> ReferenceStats:
        """Statistics of the real digits in this feature space."""
        return self.data

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        check_images(images)
        if tuple(images.shape[2:]) != (16, 16):
            raise InputShapeError(
                f"the digits classifier scores 16x16 images (the demo model's), got {tuple(images.shape[2:])}; "
                "use --extractor inception for other models"
            )
        x = images.float().mean(1, keepdim=True) / 127.5 - 1
        features = self.classifier.features(x)
        return features, self.classifier.head(features)
