"""The CLIP text transformer (ViT-L/14 text tower of SD v1), reimplemented after transformers' ``CLIPTextModel``.

Attribute names follow transformers 5's flat layout (``embeddings.token_embedding``, ``encoder.layers.{i}.self_attn
.{q,k,v,out}_proj``, ``layer_norm1/2``, ``mlp.fc1/fc2``, ``final_layer_norm``); transformers 4 (``text_model.*``)
and SD checkpoints (``cond_stage_model.transformer.text_model.*``) map onto it through
`cq.models.convert_ldm.clip_text_state`. Pre-norm blocks, causal self-attention, ``quick_gelu`` MLP; the output is
``last_hidden_state`` (after ``final_layer_norm``), which is what SD v1 cross-attends to. No attention mask
for padding (SD's ``FrozenCLIPEmbedder`` passes none).

`CLIPTextModel.encode` also returns what SDXL uses (diffusers ``StableDiffusionXLPipeline.encode_prompt``): every
layer's hidden states (``hidden_states[-2]``, the penultimate layer, without the final layer norm) and the pooled
output; `CLIPTextModelWithProjection` (transformers ``CLIPTextModelWithProjection``, key ``text_projection.weight``)
projects the pooled output to ``text_embeds``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputShapeError
from .layers import MatMul


__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTextOutput"]


@dataclass(frozen=True, kw_only=True)
class CLIPTextConfig:
    """transformers ``CLIPTextConfig`` fields; the defaults are ViT-L/14 (``openai/clip-vit-large-patch14``)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # the pooled output's token; 2 (legacy OpenAI configs): argmax(input_ids). Not compared: last_hidden_state and
    # hidden_states (all SD / SDXL cross-attend to) do not depend on it
    eos_token_id: int = field(default=2, compare=False)
    projection_dim: int | None = None  # set for CLIPTextModelWithProjection only

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CLIPTextConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIPTextConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"CLIPTextConfig.hidden_act must be 'quick_gelu' or 'gelu', got {self.hidden_act!r}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigError(f"CLIPTextConfig.projection_dim must be None or >= 1, got {self.projection_dim}")

    @classmethod
    def from_transformers(cls, config: dict, *, with_projection: bool | None = None) -> CLIPTextConfig:
        """From a transformers ``config.json`` (a ``CLIPTextConfig`` or the ``text_config`` of a ``CLIPConfig``).

        ``projection_dim`` (which every transformers config states) is kept only for a model with projection:
        ``with_projection``, default: its ``architectures`` name ``CLIPTextModelWithProjection``."""
        if with_projection is None:
            with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
        config = config.get("text_config", config)
        fields = {f: config[f] for f in cls.__dataclass_fields__ if f in config and f != "projection_dim"}
        if with_projection:
            if not isinstance(config.get("projection_dim"), int):
                raise ConfigError(
                    f"a CLIPTextModelWithProjection config needs an integer projection_dim, got "
                    f"{config.get('projection_dim')!r}"
                )
            fields["projection_dim"] = config["projection_dim"]
        return cls(**fields)


class _Embeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)[None]


class _Attention(nn.Module):
    """Causal multi-head self-attention (scale ``dh**-0.5``); ``qk`` and ``av`` are named matmuls."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.scale = (d // self.heads) ** -0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.qk = MatMul()
        self.av = MatMul(probabilities="a")

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        w = self.qk(q, k.transpose(-1, -2)) * self.scale  # (B, H, N, N)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        w = w.masked_fill(causal, float("-inf")).softmax(dim=-1)
        out = self.av(w, v)  # (B, H, N, dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.act = c.hidden_act
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class _Layer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.self_attn = _Attention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = _MLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(c) for _ in range(c.num_hidden_layers)])


@dataclass(frozen=True)
class CLIPTextOutput:
    """What `CLIPTextModel.encode` returns (transformers ``BaseModelOutputWithPooling`` / ``CLIPTextModelOutput``).

    ``hidden_states``: the embeddings and each layer's output (``num_hidden_layers + 1`` tensors, no final layer
    norm); ``pooler_output``: ``last_hidden_state`` at the end token; ``text_embeds``: its projection (None
    without ``text_projection``)."""

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...]
    pooler_output: Tensor
    text_embeds: Tensor | None = None


class CLIPTextModel(nn.Module):
    """Token ids ``[B, L]`` (L <= ``max_position_embeddings``) -> ``last_hidden_state`` ``[B, L, hidden_size]``.

    Example:
        >>> model = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4))
        >>> context = model(torch.tensor([[49406, 320, 2368, 49407]]))
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.final_layer_norm(self._states(input_ids)[-1])

    def encode(self, input_ids: Tensor) -> CLIPTextOutput:
        """All outputs. The pooled token follows transformers 5 ``CLIPTextTransformer.forward``: with
        ``eos_token_id == 2`` (legacy configs) the position of the largest id, else the first ``eos_token_id``."""
        c = self.config
        states = self._states(input_ids)
        last = self.final_layer_norm(states[-1])
        if c.eos_token_id == 2:
            position = input_ids.argmax(dim=-1)
        else:
            is_eos = input_ids == c.eos_token_id
            if not is_eos.any(dim=-1).all():
                raise InputShapeError(
                    f"every row of token ids must hold the end token {c.eos_token_id} (eos_token_id): the pooled "
                    "output is read there; tokenize prompts with the model's tokenizer"
                )
            position = is_eos.int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), position]
        projection = getattr(self, "text_projection", None)
        return CLIPTextOutput(last, states, pooled, projection(pooled) if projection is not None else None)

    def _states(self, input_ids: Tensor) -> tuple[Tensor, ...]:
        c = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > c.max_position_embeddings or torch.is_floating_point(input_ids):
            raise InputShapeError(
                f"CLIPTextModel expects integer token ids [B, L] with L <= {c.max_position_embeddings}, "
                f"got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= c.vocab_size):
            raise InputShapeError(
                f"token ids must be in [0, {c.vocab_size}), got {input_ids.min()}..{input_ids.max()}"
            )
        states = [self.embeddings(input_ids)]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return tuple(states)


class CLIPTextModelWithProjection(CLIPTextModel):
    """`CLIPTextModel` + ``text_projection`` (Linear without bias, ``hidden_size -> projection_dim``) of the pooled
    output: transformers ``CLIPTextModelWithProjection``, SDXL's second text encoder (OpenCLIP ViT-bigG)."""

    def __init__(self, config: CLIPTextConfig):
        if config.projection_dim is None:
            raise ConfigError(
                "CLIPTextModelWithProjection needs CLIPTextConfig.projection_dim (the width of text_embeds)"
            )
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
