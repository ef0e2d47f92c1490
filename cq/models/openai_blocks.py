"""The building blocks of `LDMUNet`, with the attribute names of the original ``openaimodel.py`` /
``attention.py`` modules (so their checkpoints load as they are): residual, attention and spatial-transformer
blocks, resampling, and the sequential container that passes each block what it takes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import MatMul


if TYPE_CHECKING:
    pass


# ----------------------------------------------------------------------------------------------------------------
# Blocks (openaimodel.py: GroupNorm32, ResBlock, Downsample, Upsample, AttentionBlock + QKVAttentionLegacy;
# attention.py: CrossAttention, GEGLU, FeedForward, BasicTransformerBlock, SpatialTransformer)


class GroupNorm32(nn.GroupNorm):
    """``GroupNorm(32, C)`` (eps 1e-5) evaluated in fp32 and cast back (openaimodel ``normalization``)."""

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class Downsample(nn.Module):
    """Stride-2 3x3 conv ``op`` with symmetric padding 1, or 2x2 average pooling without a conv."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.use_conv = use_conv

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x) if self.use_conv else F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Nearest x2, then an optional 3x3 ``conv``."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """openaimodel ``ResBlock``: ``in_layers`` (GN-SiLU-conv), ``emb_layers`` (SiLU-Linear), ``out_layers``
    (GN-SiLU-dropout-conv), ``skip_connection`` (1x1 conv when channels change, else identity).

    ``use_scale_shift_norm``: the embedding gives (scale, shift) applied as ``GN(h) * (1 + scale) + shift``.
    ``up`` / ``down``: the block also resamples (parameter-free nearest / average pooling) between the
    ``in_layers`` norm-activation and conv, on both the residual and the skip path (``resblock_updown``).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int,
        *,
        use_scale_shift_norm: bool,
        groups: int,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.resample = Upsample(channels, False) if up else Downsample(channels, False) if down else None
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample is not None:
            h = self.resample(self.in_layers[1](self.in_layers[0](x)))
            x = self.resample(x)
            h = self.in_layers[2](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Legacy spatial self-attention: ``qkv`` Conv1d ``[3C, C, 1]`` laid out ``[head][q|k|v][dh]``, q and k each
    scaled by ``dh**-0.25`` (``QKVAttentionLegacy``), ``proj_out`` Conv1d, residual."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.qk = MatMul()
        self.av = MatMul(probabilities="b")

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        length, dh = qkv.shape[-1], c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * dh, length).split(dh, dim=1)  # (BH, dh, T) each
        scale = 1 / math.sqrt(math.sqrt(dh))
        w = self.qk((q * scale).transpose(1, 2), k * scale)  # (BH, T_q, T_k)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        h = self.av(v, w.transpose(1, 2))  # (BH, dh, T_q)
        h = self.proj_out(h.reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (itself when None); ``to_q/k/v`` without bias, ``to_out.0``.

    ``upcast``: q and k enter the score matmul in fp32 and the softmax runs in fp32, the probabilities are cast
    back to v's dtype (CompVis SD 2 ``CrossAttention`` under ``ATTN_PRECISION="fp32"``; diffusers
    ``Attention(upcast_attention=True)``).
    """

    def __init__(
        self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, dropout: float, upcast: bool = False
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.scale, self.upcast = heads, dim_head**-0.5, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.qk = MatMul()
        self.av = MatMul(probabilities="a")

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, inner = q.shape
        heads = self.heads
        q = q.reshape(b, n, heads, -1).transpose(1, 2)  # (B, H, N, dh)
        k = k.reshape(b, k.shape[1], heads, -1).transpose(1, 2)  # (B, H, M, dh)
        v = v.reshape(b, v.shape[1], heads, -1).transpose(1, 2)  # (B, H, M, dh)
        if self.upcast:
            q, k = q.float(), k.float()
        sim = self.qk(q, k.transpose(-1, -2)) * self.scale  # (B, H, N, M)
        out = self.av(sim.softmax(dim=-1).to(v.dtype), v)  # (B, H, N, dh)
        return self.to_out(out.transpose(1, 2).reshape(b, n, inner))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """``net.0`` = GEGLU (``net.0.proj``), ``net.1`` dropout, ``net.2`` the output Linear (mult 4)."""

    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (``attn1``), cross-attention (``attn2``), GEGLU feed-forward (``ff``)."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, dropout: float, context_dim: int | None, upcast: bool = False
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout, upcast)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6), ``proj_in``, ``transformer_blocks`` over the H*W tokens, ``proj_out``, residual.

    ``linear`` (SD 2 / SDXL ``use_linear_in_transformer``): ``proj_in`` / ``proj_out`` are Linear layers applied
    to the ``[B, HW, C]`` tokens; otherwise 1x1 convs applied before / after the reshape (SD 1).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        *,
        depth: int,
        dropout: float,
        context_dim: int,
        groups: int,
        linear: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, dropout, context_dim, upcast) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        if self.linear:
            h = self.proj_in(h.reshape(b, c, hh * ww).transpose(1, 2))  # (B, HW, inner)
        else:
            h = self.proj_in(h)
            h = h.reshape(b, h.shape[1], hh * ww).transpose(1, 2)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            return self.proj_out(h).transpose(1, 2).reshape(b, c, hh, ww) + x
        h = h.transpose(1, 2).reshape(b, h.shape[2], hh, ww)
        return self.proj_out(h) + x


class TimestepEmbedSequential(nn.Sequential):
    """A block of layers: ResBlocks get the embedding, SpatialTransformers the context, the rest only ``x``."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x
