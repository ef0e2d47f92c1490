"""Conditioning stages of latent diffusion (LDM ``cond_stage_model``): what turns labels or prompts into the
``cond`` an `LDMUNet` takes. Attribute names reproduce the ``cond_stage_model.*`` keys.

* `ClassEmbedder` (LDM ``ldm.modules.encoders.modules.ClassEmbedder``, cin256-v2): labels ``[B]`` -> context
  ``[B, 1, embed_dim]`` through ``embedding`` (1001 classes: the 1000 ImageNet classes plus the unconditional
  class 1000 used for classifier-free guidance).
* `TextConditioner` (LDM ``FrozenCLIPEmbedder``, SD v1): prompts -> CLIP token ids (`CLIPTokenizer`) ->
  ``last_hidden_state`` ``[B, 77, 768]`` of the text encoder held as ``transformer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputShapeError
from .clip_text import CLIPTextConfig, CLIPTextModel
from .openai_unet import ldm_timestep_embedding
from .tokenizer import CLIPTokenizer


__all__ = ["ConditionerConfig", "ClassEmbedder", "TextConditioner", "build_conditioner", "sdxl_vector"]


@dataclass(frozen=True, kw_only=True)
class ConditionerConfig:
    """Which conditioning stage a latent-diffusion preset uses.

    ``kind``: ``"class_embedder"`` (``n_classes``, ``embed_dim``; ``uncond_class`` is the label of the
    unconditional branch) or ``"clip_text"`` (``text``: the CLIP text-encoder config; the empty prompt is the
    unconditional branch).
    """

    kind: Literal["class_embedder", "clip_text"]
    n_classes: int | None = None
    embed_dim: int | None = None
    uncond_class: int | None = None
    text: CLIPTextConfig | None = None

    def __post_init__(self) -> None:
        if self.kind == "class_embedder":
            if self.n_classes is None or self.embed_dim is None or self.n_classes < 1 or self.embed_dim < 1:
                raise ConfigError(f"a class_embedder conditioner needs n_classes and embed_dim >= 1, got {self}")
            if self.uncond_class is not None and not 0 <= self.uncond_class < self.n_classes:
                raise ConfigError(f"uncond_class={self.uncond_class} is not a class in [0, {self.n_classes})")
        elif self.kind == "clip_text":
            if self.text is None:
                raise ConfigError("a clip_text conditioner needs its text-encoder config (text=CLIPTextConfig(...))")
        else:
            raise ConfigError(f"ConditionerConfig.kind must be 'class_embedder' or 'clip_text', got {self.kind!r}")


class ClassEmbedder(nn.Module):
    """Class labels ``[B]`` -> context ``[B, 1, embed_dim]`` (LDM ``ClassEmbedder``; key ``embedding.weight``)."""

    def __init__(self, n_classes: int, embed_dim: int, *, uncond_class: int | None = None):
        super().__init__()
        self.embedding = nn.Embedding(n_classes, embed_dim)
        self.uncond_class = uncond_class

    def forward(self, labels: Tensor | Sequence[int]) -> Tensor:
        labels = torch.as_tensor(labels, device=self.embedding.weight.device)
        n = self.embedding.num_embeddings
        if labels.ndim != 1 or torch.is_floating_point(labels):
            raise InputShapeError(
                f"class labels must be integers of shape [B], got {tuple(labels.shape)} {labels.dtype}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= n):
            raise InputShapeError(f"class labels must be in [0, {n}), got {labels.min()}..{labels.max()}")
        return self.embedding(labels)[:, None, :]

    def unconditional(self, batch: int) -> Tensor:
        """The context of the unconditional branch (class ``uncond_class``; 1000 for cin256-v2)."""
        if self.uncond_class is None:
            raise ConfigError("this ClassEmbedder has no unconditional class; guidance needs uncond_class")
        return self(torch.full((batch,), self.uncond_class, dtype=torch.long))


class TextConditioner(nn.Module):
    """Prompts -> CLIP ``last_hidden_state`` (LDM ``FrozenCLIPEmbedder``; the text model is ``transformer``).

    Args:
        transformer: the CLIP text encoder.
        tokenizer: needed to encode strings; token-id tensors ``[B, L]`` are accepted without one.
    """

    def __init__(self, transformer: CLIPTextModel, tokenizer: CLIPTokenizer | None = None):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer

    def tokenize(self, prompts: str | Sequence[str]) -> Tensor:
        if self.tokenizer is None:
            raise ConfigError(
                "no tokenizer: pass tokenizer=CLIPTokenizer.from_folder(...) (a vocab.json + merges.txt folder, "
                "e.g. the tokenizer/ folder of a diffusers SD pipeline) or CLIPTokenizer.from_bpe_gz(...), "
                "or pass token ids [B, 77] instead of strings"
            )
        return self.tokenizer(prompts)

    def forward(self, prompts: str | Sequence[str] | Tensor) -> Tensor:
        ids = prompts if isinstance(prompts, Tensor) else self.tokenize(prompts)
        return self.transformer(ids.to(self.transformer.embeddings.token_embedding.weight.device))

    def unconditional(self, batch: int) -> Tensor:
        """The context of the empty prompt, repeated ``batch`` times (SD's unconditional branch)."""
        if self.tokenizer is None:
            eos = self.transformer.config.vocab_size - 1  # CLIP: <|startoftext|> = vocab-2, <|endoftext|> = vocab-1
            length = self.transformer.config.max_position_embeddings
            ids = torch.full((1, length), eos, dtype=torch.long)
            ids[0, 0] = eos - 1
        else:
            ids = self.tokenizer([""])
        return self(ids).expand(batch, -1, -1)


def sdxl_vector(pooled: Tensor, time_ids: Tensor, time_dim: int = 256) -> Tensor:
    """SDXL's vector conditioning ``y``: the pooled text embedding followed by a ``time_dim``-wide cos-first
    sinusoidal embedding of each size/crop number in ``time_ids`` ``[B, n]`` (original size, crop top-left,
    target size: n = 6). sgm ``ConcatTimestepEmbedderND`` / diffusers ``add_time_proj`` (``addition_time_embed_dim``)
    + ``cat([text_embeds, time_embeds])``; pass the result to ``LDMUNet.pack_cond``."""
    if pooled.ndim != 2 or time_ids.ndim != 2 or pooled.shape[0] != time_ids.shape[0]:
        raise InputShapeError(
            f"sdxl_vector expects pooled [B, D] and time_ids [B, n], got {tuple(pooled.shape)}, "
            f"{tuple(time_ids.shape)}"
        )
    embedded = ldm_timestep_embedding(time_ids.flatten(), time_dim).reshape(time_ids.shape[0], -1)
    return torch.cat([pooled, embedded.to(pooled.dtype)], dim=-1)


def build_conditioner(config: ConditionerConfig, tokenizer: CLIPTokenizer | None = None) -> nn.Module:
    if config.kind == "class_embedder":
        return ClassEmbedder(config.n_classes, config.embed_dim, uncond_class=config.uncond_class)
    return TextConditioner(CLIPTextModel(config.text), tokenizer)
