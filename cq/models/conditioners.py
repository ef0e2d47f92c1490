"""Conditioning stages of latent diffusion (LDM ``cond_stage_model``): what turns labels or prompts into the
``cond`` an `LDMUNet` takes. Attribute names reproduce the ``cond_stage_model.*`` keys.

* `ClassEmbedder` (LDM ``ldm.modules.encoders.modules.ClassEmbedder``, cin256-v2): labels ``[B]`` -> context
  ``[B, 1, embed_dim]`` through ``embedding`` (1001 classes: the 1000 ImageNet classes plus the unconditional
  class 1000 used for classifier-free guidance).
* `TextConditioner` (LDM ``FrozenCLIPEmbedder``, SD v1): prompts -> CLIP token ids (`CLIPTokenizer`) ->
  ``last_hidden_state`` ``[B, 77, 768]`` of the text encoder held as ``transformer``.
* `SDXLConditioner` (diffusers ``StableDiffusionXLPipeline.encode_prompt``; sgm ``GeneralConditioner`` with
  ``FrozenCLIPEmbedder`` + ``FrozenOpenCLIPEmbedder2`` + ``ConcatTimestepEmbedderND``): prompts -> the context
  (penultimate hidden states of both encoders, concatenated on the feature axis) and the vector conditioning y
  (`sdxl_vector` of encoder 2's ``text_embeds`` and the size/crop ids); `LatentDiffusion` packs them with
  ``LDMUNet.pack_cond``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputShapeError
from .clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from .openai_unet import ldm_timestep_embedding
from .tokenizer import CLIPTokenizer


__all__ = [
    "ConditionerConfig",
    "ClassEmbedder",
    "SDXLConditioner",
    "TextConditioner",
    "build_conditioner",
    "sdxl_vector",
]


@dataclass(frozen=True, kw_only=True)
class ConditionerConfig:
    """Which conditioning stage a latent-diffusion preset uses.

    ``kind``: ``"class_embedder"`` (``n_classes``, ``embed_dim``; ``uncond_class`` is the label of the
    unconditional branch), ``"clip_text"`` (``text``: the CLIP text-encoder config; the empty prompt is the
    unconditional branch) or ``"sdxl"`` (``text``, ``text_2``: the two encoders, the second with
    ``projection_dim``; ``time_dim``: diffusers' ``addition_time_embed_dim``; ``force_zeros_for_empty_prompt``:
    the unconditional branch is zeros, as in diffusers' SDXL pipeline by default, else the empty prompt).
    ``pad_id`` / ``pad_id_2``: the id the (first / second) encoder was trained to see after the end token, applied
    to whatever tokenizer the pipeline is given (OpenCLIP towers -- SD 2, SDXL's second encoder -- pad with 0;
    None: the tokenizer's own, ``<|endoftext|>`` for CLIP ViT-L).
    """

    kind: Literal["class_embedder", "clip_text", "sdxl"]
    n_classes: int | None = None
    embed_dim: int | None = None
    uncond_class: int | None = None
    text: CLIPTextConfig | None = None
    text_2: CLIPTextConfig | None = None
    time_dim: int | None = None
    force_zeros_for_empty_prompt: bool = True
    pad_id: int | None = None
    pad_id_2: int | None = None

    def __post_init__(self) -> None:
        for name in ("pad_id", "pad_id_2"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"ConditionerConfig.{name} must be None or an int >= 0, got {value!r}")
        if self.kind == "class_embedder":
            if self.n_classes is None or self.embed_dim is None or self.n_classes < 1 or self.embed_dim < 1:
                raise ConfigError(f"a class_embedder conditioner needs n_classes and embed_dim >= 1, got {self}")
            if self.uncond_class is not None and not 0 <= self.uncond_class < self.n_classes:
                raise ConfigError(f"uncond_class={self.uncond_class} is not a class in [0, {self.n_classes})")
        elif self.kind == "clip_text":
            if self.text is None:
                raise ConfigError("a clip_text conditioner needs its text-encoder config (text=CLIPTextConfig(...))")
        elif self.kind == "sdxl":
            if self.text is None or self.text_2 is None or self.text_2.projection_dim is None:
                raise ConfigError(
                    "an sdxl conditioner needs text= and text_2= CLIPTextConfigs, text_2 with projection_dim "
                    "(diffusers' text_encoder/ and text_encoder_2/ configs)"
                )
            if not isinstance(self.time_dim, int) or isinstance(self.time_dim, bool) or self.time_dim < 1:
                raise ConfigError(
                    f"an sdxl conditioner needs time_dim >= 1 (unet/config.json addition_time_embed_dim), "
                    f"got {self.time_dim!r}"
                )
        else:
            raise ConfigError(
                f"ConditionerConfig.kind must be 'class_embedder', 'clip_text' or 'sdxl', got {self.kind!r}"
            )


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


class SDXLConditioner(nn.Module):
    """Prompts -> ``(context, y)`` of SDXL (diffusers SDXL ``encode_prompt``, ``_get_add_time_ids``).

    ``context`` = ``cat([transformer.hidden_states[-2], transformer_2.hidden_states[-2]], -1)`` (no final layer
    norm), ``y`` = `sdxl_vector` ``(transformer_2.text_embeds, time_ids, time_dim)``.

    Args:
        transformer, transformer_2: the two text encoders (``text_encoder``, ``text_encoder_2``; the second a
            `CLIPTextModelWithProjection`).
        tokenizer, tokenizer_2: their tokenizers (SDXL's second pads with ``"!"``); needed for strings.
        time_dim: ``addition_time_embed_dim`` (256 for SDXL).
        time_ids: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``; `LatentDiffusion` sets the
            output size with no crop (diffusers' defaults) when None.
        force_zeros_for_empty_prompt: the unconditional branch is all-zero context and pooled embedding (with the
            same time ids), diffusers' SDXL default; False: the empty prompt through both encoders.
    """

    def __init__(
        self,
        transformer: CLIPTextModel,
        transformer_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        *,
        time_dim: int,
        time_ids: Sequence[float] | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        if not isinstance(transformer_2, CLIPTextModelWithProjection):
            raise ConfigError(
                "SDXLConditioner's transformer_2 must be a CLIPTextModelWithProjection (its pooled text_embeds "
                f"enter y), got {type(transformer_2).__name__}"
            )
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.time_dim = int(time_dim)
        self.time_ids = None if time_ids is None else self._checked_time_ids(time_ids)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @staticmethod
    def _checked_time_ids(time_ids: Sequence[float]) -> tuple[float, ...]:
        values = tuple(float(v) for v in time_ids)
        if len(values) != 6:
            raise InputShapeError(
                "SDXL time_ids are 6 numbers (orig_h, orig_w, crop_top, crop_left, target_h, target_w), "
                f"got {len(values)}"
            )
        return values

    @property
    def context_dim(self) -> int:
        return self.transformer.config.hidden_size + self.transformer_2.config.hidden_size

    @property
    def adm_in_channels(self) -> int:
        return self.transformer_2.config.projection_dim + 6 * self.time_dim

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        if self.tokenizer is None or self.tokenizer_2 is None:
            raise ConfigError(
                "SDXL prompts need both tokenizers: pass tokenizer= and tokenizer_2= (CLIPTokenizer.from_folder of "
                "the tokenizer/ and tokenizer_2/ folders of a diffusers SDXL pipeline), or token ids"
            )
        return self.tokenizer(prompts), self.tokenizer_2(prompts)

    def embed(self, prompts: str | Sequence[str] | Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(context [B, L, D1 + D2], pooled [B, projection_dim])``; ``prompts``: strings, one id tensor
        ``[B, L]`` for both encoders, or a pair of them."""
        if isinstance(prompts, Tensor):
            ids, ids_2 = prompts, prompts
        elif isinstance(prompts, tuple) and len(prompts) == 2 and all(isinstance(p, Tensor) for p in prompts):
            ids, ids_2 = prompts
        else:
            ids, ids_2 = self.tokenize(prompts)
        device = self.transformer.embeddings.token_embedding.weight.device
        first, second = self.transformer.encode(ids.to(device)), self.transformer_2.encode(ids_2.to(device))
        if first.last_hidden_state.shape[:2] != second.last_hidden_state.shape[:2]:
            raise InputShapeError(
                f"the two encoders' token ids must have one shape [B, L], got {tuple(ids.shape)} and "
                f"{tuple(ids_2.shape)}"
            )
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return context, second.text_embeds

    def vector(self, pooled: Tensor) -> Tensor:
        """y of ``pooled`` with this conditioner's ``time_ids`` (one row per pooled row)."""
        if self.time_ids is None:
            raise ConfigError(
                "SDXLConditioner.time_ids is unset: give (orig_h, orig_w, crop_top, crop_left, target_h, "
                "target_w), e.g. (1024, 1024, 0, 0, 1024, 1024); LatentDiffusion sets its output size"
            )
        ids = torch.tensor([self.time_ids], dtype=pooled.dtype, device=pooled.device).expand(pooled.shape[0], -1)
        return sdxl_vector(pooled, ids, self.time_dim)

    def forward(self, prompts: str | Sequence[str] | Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        context, pooled = self.embed(prompts)
        return context, self.vector(pooled)

    def unconditional(self, batch: int) -> tuple[Tensor, Tensor]:
        """``(context, y)`` of the unconditional branch, repeated ``batch`` times: zeros (context and pooled; the
        time ids stay) under ``force_zeros_for_empty_prompt``, else the empty prompt."""
        if self.force_zeros_for_empty_prompt:
            weight = self.transformer.embeddings.token_embedding.weight
            length = self.transformer.config.max_position_embeddings
            if self.tokenizer is not None:
                length = self.tokenizer.max_length
            context = weight.new_zeros(1, length, self.context_dim)
            pooled = weight.new_zeros(1, self.transformer_2.config.projection_dim)
        else:
            context, pooled = self.embed([""])
        return context.expand(batch, -1, -1), self.vector(pooled).expand(batch, -1)


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
    """The conditioner of ``config`` with random weights (an SDXL one uses ``tokenizer`` for both encoders, each
    padding as its config says)."""
    if config.kind == "class_embedder":
        return ClassEmbedder(config.n_classes, config.embed_dim, uncond_class=config.uncond_class)

    def padded(pad_id: int | None) -> CLIPTokenizer | None:
        return tokenizer.with_pad_id(pad_id) if tokenizer is not None and pad_id is not None else tokenizer

    if config.kind == "sdxl":
        return SDXLConditioner(
            CLIPTextModel(config.text),
            CLIPTextModelWithProjection(config.text_2),
            padded(config.pad_id),
            padded(config.pad_id_2),
            time_dim=config.time_dim,
            force_zeros_for_empty_prompt=config.force_zeros_for_empty_prompt,
        )
    return TextConditioner(CLIPTextModel(config.text), padded(config.pad_id))
