"""`LDMUNetConfig`: the hyper-parameters of the LDM / SD UNet (`cq.models.openai_unet`), apart from the network so
that the checkpoint-key converters (`cq.models.convert_ldm`) read them without importing the model."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


__all__ = ["LDMUNetConfig"]


@dataclass(frozen=True, kw_only=True)
class LDMUNetConfig:
    """Hyper-parameters of ``openaimodel.UNetModel`` (the ``unet_config.params`` of an LDM/SD yaml), same names.

    ``attention_resolutions`` are downsampling factors (1 = full resolution), as in the yaml. Heads: a fixed
    ``num_heads`` per attention layer (or one per level, as diffusers' per-block ``attention_head_dim`` lists
    give them), or ``num_head_channels`` channels per head (then ``num_heads = ch // num_head_channels``; SD 2 /
    SDXL use 64); ``num_heads_upsample`` overrides the heads of the decoder's legacy attention blocks.
    ``transformer_depth``: blocks per SpatialTransformer, one value or one per level (SDXL ``[0, 2, 10]``; the
    middle block takes the last level's). ``use_linear_in_transformer`` (SD 2 / SDXL): ``proj_in`` / ``proj_out``
    are Linear layers on the ``[B, HW, C]`` tokens instead of 1x1 convs. ``upcast_attention``: attention scores and
    softmax in fp32 whatever the model's dtype (CompVis SD 2's ``ATTN_PRECISION="fp32"``, diffusers
    ``upcast_attention``; a no-op in fp32).
    """

    image_size: int  # default latent side (``sample_shape``); any multiple of 2**(levels-1) runs
    in_channels: int
    out_channels: int
    model_channels: int
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = ()
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    dropout: float = 0.0
    conv_resample: bool = True
    num_classes: int | None = None  # label-conditional models (label_emb); cond is then the labels [B]
    num_heads: int | tuple[int, ...] = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int | None = None
    norm_groups: int = 32
    use_linear_in_transformer: bool = False
    upcast_attention: bool = False
    adm_in_channels: int | None = None  # SDXL: width of the vector conditioning y (sgm num_classes="sequential")

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "out_channels", "model_channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"LDMUNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.norm_groups < 1:
            raise ConfigError("LDMUNetConfig.norm_groups must be >= 1")
        levels = len(self.channel_mult)
        for name in ("num_heads", "transformer_depth"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != levels:
                raise ConfigError(
                    f"LDMUNetConfig.{name}={value}: one value per level ({levels}, as channel_mult) or a single int"
                )
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(
                f"LDMUNetConfig.channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}"
            )
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ConfigError(
                f"LDMUNetConfig.image_size={self.image_size} must be divisible by 2**(len(channel_mult)-1)="
                f"{2 ** (len(self.channel_mult) - 1)}"
            )
        if self.use_spatial_transformer != (self.context_dim is not None):
            raise ConfigError(
                "LDMUNetConfig: use_spatial_transformer=True needs context_dim (the cross-attention width) and "
                f"context_dim needs use_spatial_transformer; got {self.use_spatial_transformer}, {self.context_dim}"
            )
        if self.num_classes is not None and self.context_dim is not None:
            raise ConfigError(
                "LDMUNetConfig: a model conditioned on both class labels and a context is not supported "
                "(cond carries one tensor); LDM class-conditional models condition through a context"
            )
        if self.adm_in_channels is not None and (self.context_dim is None or self.num_classes is not None):
            raise ConfigError(
                "LDMUNetConfig.adm_in_channels (SDXL's vector conditioning) needs a cross-attention model "
                f"(context_dim) without class labels; got context_dim={self.context_dim}, "
                f"num_classes={self.num_classes}"
            )
        if self.adm_in_channels is not None and self.adm_in_channels < 1:
            raise ConfigError(f"LDMUNetConfig.adm_in_channels must be >= 1 or None, got {self.adm_in_channels}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"LDMUNetConfig.num_classes must be >= 1 or None, got {self.num_classes}")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ConfigError("LDMUNetConfig: set num_heads or num_head_channels (both are -1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LDMUNetConfig.dropout must be in [0, 1), got {self.dropout}")
        for m in (1, *self.channel_mult):
            ch = self.model_channels * m
            if ch % self.norm_groups:
                raise ConfigError(
                    f"LDMUNetConfig: channel count model_channels*mult={ch} is not divisible by "
                    f"norm_groups={self.norm_groups}"
                )
        if self.num_head_channels == -1 and min(_as_tuple(self.num_heads, levels)) < 1:
            raise ConfigError(f"LDMUNetConfig.num_heads must be >= 1, got {self.num_heads}")
        attended = {levels - 1} | {i for i in range(levels) if 2**i in self.attention_resolutions}  # + middle
        for level in sorted(attended):
            ch = self.model_channels * self.channel_mult[level]
            if self.depth(level) < 1:
                raise ConfigError(f"LDMUNetConfig.transformer_depth must be >= 1 at attended level {level}")
            if self.num_head_channels != -1 and ch % self.num_head_channels:
                raise ConfigError(
                    f"LDMUNetConfig: {ch} attention channels are not a multiple of num_head_channels="
                    f"{self.num_head_channels}"
                )
            for upsample in (False, True):
                heads = self.heads(ch, level=level, upsample=upsample)
                if heads < 1 or ch % heads:
                    raise ConfigError(f"LDMUNetConfig: {ch} channels cannot be split into {heads} attention heads")

    def heads(self, channels: int, *, level: int, upsample: bool = False) -> int:
        """Attention heads of a layer with ``channels`` channels at ``level`` (the middle block: the last level),
        by openaimodel's head arithmetic, legacy or not."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels
        if upsample and not self.use_spatial_transformer and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return _as_tuple(self.num_heads, len(self.channel_mult))[level]

    @property
    def vector_tokens(self) -> int:
        """Context tokens that carry the vector conditioning y in ``cond`` (``ceil(adm_in_channels / context_dim)``;
        0 without one)."""
        if self.adm_in_channels is None:
            return 0
        return -(-self.adm_in_channels // self.context_dim)

    def depth(self, level: int) -> int:
        """Transformer blocks of the SpatialTransformers at ``level`` (the middle block: the last level)."""
        return _as_tuple(self.transformer_depth, len(self.channel_mult))[level]


def _as_tuple(value: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value,) * n
