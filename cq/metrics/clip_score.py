"""CLIP score of images against their prompts (Hessel et al. 2021), through open_clip.

Per sample ``max(100 * cos(E_image(x), E_text(prompt)), 0)`` -- the definition of torchmetrics' ``CLIPScore``;
CacheQuant reports it with Taited/clip-score (ViT-L/14), which takes the same cosine. `ClipScorer.scores` gives
the per-sample values, so a table can show the worst sample next to the mean. Preprocessing follows CLIP's:
bicubic resize of the short side, center crop, the model's mean / std.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, MetricUnavailableError
from .extractors import check_images


__all__ = ["ClipScorer", "OPENAI_MEAN", "OPENAI_STD"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipScorer:
    """A CLIP model (``encode_image`` / ``encode_text``, e.g. an ``open_clip.CLIP``), its tokenizer and its input
    size and normalisation."""

    model: nn.Module
    tokenizer: Callable[[list[str]], Tensor]
    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @classmethod
    def from_open_clip(cls, arch: str, weights: str, device: str | torch.device = "cpu") -> ClipScorer:
        """open_clip model ``arch`` (e.g. ``ViT-L-14``) with ``weights``: a local checkpoint file, or an
        open_clip pretrained tag (e.g. ``openai``), which open_clip fetches into its own cache when absent.

        Raises:
            MetricUnavailableError: open_clip is not installed, the weights do not exist or could not be fetched.
        """
        try:
            import open_clip
        except ImportError:
            raise MetricUnavailableError("CLIP score needs open_clip: pip install 'cq[eval]'") from None
        looks_like_path = Path(weights).suffix != "" or "/" in weights
        if looks_like_path and not Path(weights).is_file():
            raise MetricUnavailableError(
                f"no CLIP weights at {weights}; pass --clip-weights PATH (an open_clip checkpoint of {arch}) or an "
                "open_clip pretrained tag such as 'openai'"
            )
        try:
            model = open_clip.create_model(arch, pretrained=weights, device=device)
            tokenizer = open_clip.get_tokenizer(arch)
        except (OSError, RuntimeError, ValueError) as e:
            raise MetricUnavailableError(f"could not load CLIP {arch} with weights {weights} ({e})") from None
        size = model.visual.image_size
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        return cls(
            model=model.eval(),
            tokenizer=tokenizer,
            image_size=int(size[0] if isinstance(size, tuple | list) else size),
            mean=tuple(cfg.get("mean", OPENAI_MEAN)),
            std=tuple(cfg.get("std", OPENAI_STD)),
        )

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 ``[B, C, H, W]`` -> normalised float ``[B, 3, S, S]`` (short side resized to S, center crop)."""
        check_images(images)
        x = images.float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def scores(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``[B]`` per-sample CLIP scores in [0, 100] of ``images`` against ``prompts`` (one each)."""
        prompts = list(prompts)
        if len(prompts) != images.shape[0] or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(
                f"CLIP score needs one prompt (a str) per image: {images.shape[0]} images, got {prompts!r}"
            )
        device = next(self.model.parameters()).device
        image = self.model.encode_image(self.preprocess(images).to(device)).float()
        text = self.model.encode_text(self.tokenizer(prompts).to(device)).float()
        cos = F.cosine_similarity(image, text, dim=-1)
        return (100 * cos).clamp_min(0).cpu()
