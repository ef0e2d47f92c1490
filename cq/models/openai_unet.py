"""The LDM / Stable Diffusion UNet: a reimplementation of CompVis
``ldm.modules.diffusionmodules.openaimodel.UNetModel`` (with ``ldm.modules.attention.SpatialTransformer``), the
network of latent-diffusion (LDM-4/LDM-8) and SD v1.

Attribute names reproduce the ``model.diffusion_model.*`` keys of the original checkpoints (``time_embed.0``,
``input_blocks.{i}.{j}``, ``middle_block.{j}``, ``output_blocks.{i}.{j}``, ``out.2``, ``label_emb``), so the
UNet part of an LDM/SD ``.ckpt`` loads with ``load_state_dict`` once the prefix is stripped. Numerics follow the
original (ecosystem.md §A3): ``GroupNorm32`` (eps 1e-5, computed in fp32) in ResBlocks, legacy attention and the
output head; GroupNorm eps 1e-6 in SpatialTransformer; cos-first timestep embedding with ``log(1e4)/half``;
symmetric padding 1 in the stride-2 downsample conv; legacy ``QKVAttentionLegacy`` layout ``[head][q|k|v][dh]`` with
``dh**-0.25`` applied to q and k each. Every attention matmul is a named `MatMul` module (``qk``, ``av``).

Cache points (DeepCache, Ma et al. 2024; CacheQuant): the feature *entering* output block ``j``, named
``"output_blocks.{j}"`` (before the concat with its skip). Output block ``j`` pops skip ``hs[N-1-j]`` (N input
blocks), so a shallow call at that point runs only ``input_blocks[:N-j]`` and ``output_blocks[j:]``. The shallowest
point, ``"output_blocks.{N-1}"`` (the output of ``output_blocks[-2]``), is CacheQuant's / DeepCache-LDM's cut: a
shallow call runs ``time_embed``, ``input_blocks[0]``, ``output_blocks[-1]`` and ``out``.

``cond``: the cross-attention context ``[B, L, context_dim]`` for SpatialTransformer models (SD: CLIP text
features; cin256-v2: the class embedding from `cq.models.conditioners.ClassEmbedder`, L = 1); the class labels
``[B]`` for ``num_classes`` models; None for unconditional ones.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.unet import CacheableUNet, PresetInfo
from ..errors import ConfigError, InputShapeError
from .convert_ldm import ldm_unet_from_diffusers, ldm_unet_state, looks_like_diffusers_ldm_unet
from .families import register_family
from .ldm_config import LDMUNetConfig
from .openai_blocks import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    Upsample,
)


if TYPE_CHECKING:
    from ..core.view import CacheView
    from ..sampling.noise import NoiseSchedule


__all__ = ["LDMUNetConfig", "LDMUNet", "ldm_timestep_embedding"]


def ldm_timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """LDM ``timestep_embedding``: ``exp(-log(max_period) * arange(half) / half)``, then ``cat([cos, sin])``.

    Equals diffusers' ``get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`` (same op order).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# ----------------------------------------------------------------------------------------------------------------
# The UNet


def _checkpoint_keys(state: dict[str, Tensor], config: LDMUNetConfig, *, format: str, ema: bool) -> dict[str, Tensor]:
    """The UNet part of a full LDM/SD checkpoint (``model.diffusion_model.*``, the EMA copy with ``ema``), and
    diffusers ``UNet2DConditionModel`` keys (``format="diffusers"``, or detected with ``"auto"``) under this UNet's
    keys; original keys as they are."""
    state = ldm_unet_state(state, ema=ema)
    if format == "diffusers" or (format == "auto" and looks_like_diffusers_ldm_unet(state)):
        return ldm_unet_from_diffusers(state, config)
    return state


@register_family("ldm", config=LDMUNetConfig, convert_keys=_checkpoint_keys)
class LDMUNet(CacheableUNet):
    """LDM ``openaimodel.UNetModel`` with named cache points.

    ``noise_schedule`` and ``preset``: see `CacheableUNet` (`cq.models.build` sets both).

    Example:
        >>> config = LDMUNetConfig(image_size=8, in_channels=4, out_channels=4, model_channels=32,
        ...     channel_mult=(1, 2), attention_resolutions=(1,), num_heads=4, use_spatial_transformer=True,
        ...     context_dim=32)
        >>> unet = LDMUNet(config)
        >>> eps = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32))
    """

    def __init__(
        self, config: LDMUNetConfig, *, noise_schedule: NoiseSchedule | None = None, preset: PresetInfo | None = None
    ):
        super().__init__(noise_schedule=noise_schedule, preset=preset)
        self.config = c = config
        mc = c.model_channels
        emb_ch = 4 * mc
        res = dict(dropout=c.dropout, use_scale_shift_norm=c.use_scale_shift_norm, groups=c.norm_groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes, emb_ch)
        if c.adm_in_channels is not None:  # sgm: label_emb.0.{0,2}; diffusers: add_embedding.linear_{1,2}
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
            )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, out_channels=mult * mc, **res)]
                ch = mult * mc
                if ds in c.attention_resolutions:
                    layers.append(self._attention(ch, level=level, upsample=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                down = (
                    ResBlock(ch, emb_ch, out_channels=ch, down=True, **res)
                    if c.resblock_updown
                    else Downsample(ch, c.conv_resample)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_ch, out_channels=ch, **res),
            self._attention(ch, level=len(c.channel_mult) - 1, upsample=False),
            ResBlock(ch, emb_ch, out_channels=ch, **res),
        )

        self.output_blocks = nn.ModuleList()
        self._cache_channels: dict[str, int] = {}
        for level, mult in list(enumerate(c.channel_mult))[::-1]:
            for i in range(c.num_res_blocks + 1):
                self._cache_channels[f"output_blocks.{len(self.output_blocks)}"] = ch
                skip = skip_channels.pop()
                layers = [ResBlock(ch + skip, emb_ch, out_channels=mc * mult, **res)]
                ch = mc * mult
                if ds in c.attention_resolutions:
                    layers.append(self._attention(ch, level=level, upsample=True))
                if level and i == c.num_res_blocks:
                    layers.append(
                        ResBlock(ch, emb_ch, out_channels=ch, up=True, **res)
                        if c.resblock_updown
                        else Upsample(ch, c.conv_resample)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(c.norm_groups, ch), nn.SiLU(), nn.Conv2d(mc, c.out_channels, 3, padding=1)
        )
        self._num_blocks = len(self.input_blocks)

    def _attention(self, ch: int, *, level: int, upsample: bool) -> nn.Module:
        c = self.config
        heads = c.heads(ch, level=level, upsample=upsample)
        if c.use_spatial_transformer:
            return SpatialTransformer(
                ch,
                heads,
                ch // heads,
                depth=c.depth(level),
                dropout=c.dropout,
                context_dim=c.context_dim,
                groups=c.norm_groups,
                linear=c.use_linear_in_transformer,
                upcast=c.upcast_attention,
            )
        return AttentionBlock(ch, heads, c.norm_groups)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one input sample ``(C, H, W)`` at the configured ``image_size``."""
        return (self.config.in_channels, self.config.image_size, self.config.image_size)

    # ------------------------------------------------------------------------------------------------------------
    # Cache points

    def cache_points(self) -> tuple[str, ...]:
        """The feature entering each output block, deepest first: ``"output_blocks.0"`` ...
        ``"output_blocks.{N-1}"``."""
        return tuple(self._cache_channels)

    def default_cache_point(self) -> str:
        """The shallowest point, ``"output_blocks.{N-1}"``: CacheQuant's and DeepCache-LDM's cut."""
        return self.cache_points()[-1]

    def cache_channels(self, point: str) -> int:
        """Channels of the cached tensor at ``point`` (the ``h`` half of its consumer's ``cat(h, skip)``)."""
        self._check_point(point)
        return self._cache_channels[point]

    def cache_consumer(self, point: str) -> str:
        """Name of the ResBlock that consumes ``cat(cached, skip)`` at ``point`` (``"output_blocks.{j}.0"``)."""
        self._check_point(point)
        return f"{point}.0"

    def concat_splits(self) -> dict[str, int]:
        """Modules whose input is ``cat(h, skip)`` along channels -> channel count of ``h``.

        These are ``in_layers.2`` (after GroupNorm+SiLU, which keep channel positions) and ``skip_connection`` of
        the first ResBlock of every output block (CacheQuant splits both; Q-Diffusion Sec. 4.3).
        """
        splits = {}
        for point, channels in self._cache_channels.items():
            splits[f"{point}.0.in_layers.2"] = channels
            splits[f"{point}.0.skip_connection"] = channels
        return splits

    def example_cond(self, batch: int = 1, context_length: int = 77) -> Tensor | None:
        """A conditioning input of the right kind for counting MACs: ``context_length`` zero tokens of the
        cross-attention width (77: CLIP's context, SD), ``batch`` class labels 0, or None (unconditional)."""
        device = next(self.parameters()).device
        if self.config.context_dim is not None:
            tokens = context_length + self.config.vector_tokens
            return torch.zeros((batch, tokens, self.config.context_dim), device=device)
        if self.config.num_classes is not None:
            return torch.zeros((batch,), dtype=torch.long, device=device)
        return None

    def io_layers(self) -> tuple[str, ...]:
        """The layers that read the sampler's ``x_t`` and write the model output: ``input_blocks.0.0``, ``out.2``
        (kept in float by default, see `cq.quant.UniformQuantizer.float_io`)."""
        return ("input_blocks.0.0", "out.2")

    # ------------------------------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, *, cache: CacheView | None = None) -> Tensor:
        """Predict the noise ``eps(x_t, t, cond)``.

        Args:
            x: ``[B, in_channels, H, W]``, H and W multiples of ``2**(len(channel_mult)-1)``.
            t: timesteps ``[B]`` (or a scalar) in 0..T-1.
            cond: context ``[B, L, context_dim]`` (SpatialTransformer models), labels ``[B]`` (``num_classes``
                models) or None (unconditional models).
            cache: None for the original model; a `CacheView` to record features or run a shallow call.
        """
        c = self.config
        factor = 2 ** (len(c.channel_mult) - 1)
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise InputShapeError(
                f"LDMUNet expects x of shape [B, {c.in_channels}, H, W] with H, W multiples of {factor}, "
                f"got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        t = self._check_timesteps(t, batch, x)
        context = self._check_cond(cond, batch)
        self._check_cache(cache)

        emb = self.time_embed(ldm_timestep_embedding(t, c.model_channels).to(x.dtype))  # diffusers' cast (bf16/fp16)
        if c.num_classes is not None:
            emb = emb + self.label_emb(cond)
        if c.adm_in_channels is not None:
            context, y = self.unpack_cond(context)
            emb = emb + self.label_emb(y)

        shallow = cache is not None and cache.is_shallow
        start = 0
        if shallow:
            start = int(cache.read.rpartition(".")[2])
        hs = []
        h = x
        for block in self.input_blocks[: self._num_blocks - start]:
            h = block(h, emb, context)
            hs.append(h)
        h = self._cached(cache, batch) if shallow else self.middle_block(h, emb, context)
        for j in range(start, len(self.output_blocks)):
            if cache is not None:
                cache.store(f"output_blocks.{j}", h)
            h = self.output_blocks[j](torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)

    def pack_cond(self, context: Tensor, y: Tensor) -> Tensor:
        """The ``cond`` of an SDXL-style model: ``context [B, L, D]`` followed by the vector conditioning ``y [B,
        adm_in_channels]`` (pooled text embedding + size/crop embeddings, `cq.models.conditioners.sdxl_vector`)
        laid out as ``vector_tokens`` extra tokens, zero-padded. One tensor, so guidance, `cq.trace` and the
        compressed models pass it as any context; the UNet splits it again (`unpack_cond`)."""
        c = self.config
        if c.adm_in_channels is None:
            raise ConfigError("this LDMUNet takes no vector conditioning (adm_in_channels is None): pass the context")
        if context.ndim != 3 or context.shape[2] != c.context_dim or y.shape != (context.shape[0], c.adm_in_channels):
            raise InputShapeError(
                f"pack_cond expects context [B, L, {c.context_dim}] and y [B, {c.adm_in_channels}], got "
                f"{tuple(context.shape)} and {tuple(y.shape)}"
            )
        k = c.vector_tokens
        rows = F.pad(y, (0, k * c.context_dim - c.adm_in_channels)).reshape(y.shape[0], k, c.context_dim)
        return torch.cat([context, rows.to(context.dtype)], dim=1)

    def unpack_cond(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``(context, y)`` of a `pack_cond` tensor."""
        c = self.config
        k = c.vector_tokens
        y = cond[:, -k:].reshape(cond.shape[0], k * c.context_dim)[:, : c.adm_in_channels]
        return cond[:, :-k], y

    def _check_cond(self, cond: Tensor | None, batch: int) -> Tensor | None:
        """The context tensor for the transformer blocks (None for label and unconditional models)."""
        c = self.config
        if c.context_dim is not None:
            if (
                not isinstance(cond, Tensor)
                or cond.ndim != 3
                or cond.shape[0] != batch
                or cond.shape[2] != c.context_dim
            ):
                got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
                raise InputShapeError(
                    f"this LDMUNet is conditioned by cross-attention: cond must be a context of shape "
                    f"[{batch}, L, {c.context_dim}], got {got}"
                )
            if cond.shape[1] <= c.vector_tokens:
                raise InputShapeError(
                    f"this LDMUNet also takes a vector conditioning (SDXL, adm_in_channels={c.adm_in_channels}): "
                    f"cond must be unet.pack_cond(context, y), with {c.vector_tokens} trailing tokens after at "
                    f"least one context token; got {cond.shape[1]} tokens"
                )
            return cond
        if c.num_classes is not None:
            if not isinstance(cond, Tensor) or cond.shape != (batch,) or torch.is_floating_point(cond):
                got = (tuple(cond.shape), cond.dtype) if isinstance(cond, Tensor) else type(cond).__name__
                raise InputShapeError(
                    f"this LDMUNet is class-conditional: cond must be integer labels of shape [{batch}], got {got}"
                )
            return None
        if cond is not None:
            raise InputShapeError("this LDMUNet is unconditional: pass cond=None")
        return None
