"""DDPM UNet of Ho et al. (2020), reimplemented after the PyTorch port in ermongroup/ddim ``models/diffusion.py``
(identical to pesser/pytorch_diffusion).

Attribute names reproduce the original checkpoint keys (``temb.dense.0``, ``down.{l}.block.{b}``,
``up.{l}.attn.{b}``, ``mid.attn_1``, ...), so an original ``model-*.ckpt`` loads with ``load_state_dict`` as it is.
Numerics follow the original: GroupNorm(32, eps=1e-6), sin-first timestep embedding, single-head attention with
1x1-conv q/k/v scaled by ``C**-0.5``, asymmetric ``(0,1,0,1)`` padding before the stride-2 downsample conv.

Cache points (DeepCache, Ma et al. 2024): the feature *entering* an up block, named after it (``"up.1.block.2"``).
Up block j in execution order pops skip ``hs[S-1-j]``; a shallow call at that point runs only the encoder prefix
that produces ``hs[0..S-1-j]`` and the decoder suffix from block j on. DeepCache's ``--branch`` numbering maps to
these names through `DDPMUNet.deepcache_branch_point` (``branch=2`` -> ``"up.1.block.2"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.unet import CacheableUNet, PresetInfo
from ..errors import ConfigError, InputShapeError
from .convert import ddpm_from_diffusers, looks_like_diffusers_ddpm
from .ddpm_config import DDPMConfig
from .families import register_family
from .layers import MatMul, ddpm_timestep_embedding


if TYPE_CHECKING:
    from ..core.view import CacheView
    from ..sampling.noise import NoiseSchedule


__all__ = ["DDPMConfig", "DDPMUNet"]


# ----------------------------------------------------------------------------------------------------------------
# Blocks (ddim models/diffusion.py: ResnetBlock, AttnBlock, Upsample, Downsample)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv, + temb projection, GN-SiLU-dropout-conv, residual with 1x1 ``nin_shortcut`` if channels change."""

    def __init__(
        self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, eps: float, groups: int
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections; ``qk`` and ``av`` are named matmuls."""

    def __init__(self, channels: int, eps: float, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.qk = MatMul()
        self.av = MatMul(probabilities="b")

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).transpose(1, 2)  # (B, HW, C)
        k = k.reshape(b, c, hh * ww)  # (B, C, HW)
        w = self.qk(q, k) * (c**-0.5)  # (B, HW_q, HW_k)
        w = torch.softmax(w, dim=2)
        v = v.reshape(b, c, hh * ww)  # (B, C, HW_k)
        h = self.av(v, w.transpose(1, 2))  # (B, C, HW_q)
        return x + self.proj_out(h.reshape(b, c, hh, ww))


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.with_conv = with_conv

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        self.with_conv = with_conv

    def forward(self, x: Tensor) -> Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric, as in the original
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class _Level(nn.Module):
    """Container reproducing the original ``down[l]`` / ``up[l]`` key layout (``block``, ``attn``, re-sampler)."""

    def __init__(self, block: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(block)
        self.attn = nn.ModuleList(attn)


class _TimeEmbedding(nn.Module):
    def __init__(self, ch: int, temb_ch: int):
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])


class _Mid(nn.Module):
    def __init__(self, channels: int, temb_channels: int, dropout: float, eps: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, temb_channels, dropout, eps, groups)
        self.attn_1 = AttnBlock(channels, eps, groups)
        self.block_2 = ResnetBlock(channels, channels, temb_channels, dropout, eps, groups)


# ----------------------------------------------------------------------------------------------------------------
# The UNet


def _checkpoint_keys(state: dict[str, Tensor], config: DDPMConfig, *, format: str, ema: bool) -> dict[str, Tensor]:
    """A diffusers ``UNet2DModel`` state dict under this UNet's keys (``format="diffusers"``, or detected with
    ``"auto"``); original keys as they are."""
    if format == "diffusers" or (format == "auto" and looks_like_diffusers_ddpm(state)):
        return ddpm_from_diffusers(state, len(config.ch_mult), config.num_res_blocks)
    return state


@register_family("ddpm", config=DDPMConfig, convert_keys=_checkpoint_keys)
class DDPMUNet(CacheableUNet):
    """The DDPM UNet (ddim ``Model``) with named cache points. Unconditional: ``cond`` must be None.

    ``noise_schedule`` and ``preset``: see `CacheableUNet` (`cq.models.build` sets both).

    Example:
        >>> unet = DDPMUNet(DDPMConfig(resolution=16, ch=32, ch_mult=(1, 2), attn_resolutions=(8,)))
        >>> eps = unet(torch.randn(2, 3, 16, 16), torch.tensor([10, 500]))
    """

    def __init__(
        self, config: DDPMConfig, *, noise_schedule: NoiseSchedule | None = None, preset: PresetInfo | None = None
    ):
        super().__init__(noise_schedule=noise_schedule, preset=preset)
        self.config = c = config
        self.temb_ch = 4 * c.ch
        self.num_resolutions = len(c.ch_mult)
        block = dict(temb_channels=self.temb_ch, dropout=c.dropout, eps=c.norm_eps, groups=c.norm_groups)
        norm = dict(eps=c.norm_eps, groups=c.norm_groups)

        self.temb = _TimeEmbedding(c.ch, self.temb_ch)
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)

        in_ch_mult = (1, *c.ch_mult)
        res = c.resolution
        skip_channels = [c.ch]  # channels of hs[0], hs[1], ... in push order
        self.down = nn.ModuleList()
        for level, mult in enumerate(c.ch_mult):
            block_in, block_out = c.ch * in_ch_mult[level], c.ch * mult
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, **block))
                block_in = block_out
                if res in c.attn_resolutions:
                    attns.append(AttnBlock(block_in, **norm))
                skip_channels.append(block_in)
            down = _Level(blocks, attns)
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, c.resamp_with_conv)
                skip_channels.append(block_in)
                res //= 2
            self.down.append(down)

        self.mid = _Mid(block_in, **block)

        ups: list[_Level] = []
        self._up_order: list[tuple[int, int]] = []  # (level, block) in execution order
        self._cache_channels: dict[str, int] = {}
        for level in reversed(range(self.num_resolutions)):
            block_out, skip_in = c.ch * c.ch_mult[level], c.ch * c.ch_mult[level]
            blocks, attns = [], []
            for b in range(c.num_res_blocks + 1):
                if b == c.num_res_blocks:
                    skip_in = c.ch * in_ch_mult[level]
                self._cache_channels[f"up.{level}.block.{b}"] = block_in
                self._up_order.append((level, b))
                blocks.append(ResnetBlock(block_in + skip_in, block_out, **block))
                block_in = block_out
                if res in c.attn_resolutions:
                    attns.append(AttnBlock(block_in, **norm))
            up = _Level(blocks, attns)
            if level != 0:
                up.upsample = Upsample(block_in, c.resamp_with_conv)
                res *= 2
            ups.insert(0, up)  # up[0] is the highest resolution, as in the original
        self.up = nn.ModuleList(ups)
        self._up_index = {f"up.{level}.block.{b}": j for j, (level, b) in enumerate(self._up_order)}

        self.norm_out = nn.GroupNorm(c.norm_groups, block_in, eps=c.norm_eps)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)
        self._num_skips = len(skip_channels)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one input sample ``(C, H, W)``."""
        return (self.config.in_channels, self.config.resolution, self.config.resolution)

    # ------------------------------------------------------------------------------------------------------------
    # Cache points

    def cache_points(self) -> tuple[str, ...]:
        """Names of the cut points, deepest first: the feature entering each up block (``"up.{l}.block.{b}"``)."""
        return tuple(f"up.{level}.block.{b}" for level, b in self._up_order)

    def default_cache_point(self) -> str:
        """DeepCache's ``--branch 2`` cut (the one CacheQuant uses for DDPM CIFAR-10): the feature entering the
        first decoder block of the second-highest resolution. Falls back to the shallowest point."""
        if self.config.num_res_blocks == 2 and self.num_resolutions >= 2:
            return self.deepcache_branch_point(2)
        return self.cache_points()[-1]

    def cache_channels(self, point: str) -> int:
        """Channels of the cached tensor at ``point``: the split of the concat its consumer block sees."""
        self._check_point(point)
        return self._cache_channels[point]

    def cache_consumer(self, point: str) -> str:
        """Fully-qualified name of the block that consumes ``cat(cached, skip)`` at ``point``."""
        self._check_point(point)
        return point

    def concat_splits(self) -> dict[str, int]:
        """Modules whose input is ``cat(h, skip)`` along channels -> channel count of ``h`` (where to split it).

        These are ``conv1`` (after GroupNorm+SiLU, which keep channels aligned) and ``nin_shortcut`` of every
        decoder block; for the block at a cache point, ``h`` is the cached feature (split-aware quantization,
        Q-Diffusion Sec. 4.3; CacheQuant also splits ``conv1``).
        """
        splits = {}
        for point, channels in self._cache_channels.items():
            splits[f"{point}.conv1"] = channels
            splits[f"{point}.nin_shortcut"] = channels
        return splits

    def io_layers(self) -> tuple[str, ...]:
        """The layers that read the sampler's ``x_t`` and write the predicted noise: ``conv_in``, ``conv_out``.

        Quantizers keep them in float by default (`cq.quant.UniformQuantizer.float_io`): clamping the unbounded input
        noise, or a systematic output error that every sampler step integrates, wrecks single samples.
        """
        return ("conv_in", "conv_out")

    @staticmethod
    def deepcache_branch_point(branch: int, num_res_blocks: int = 2) -> str:
        """The cache point of DeepCache's DDPM ``branch`` argument (``branch//3`` level, ``branch%3`` block).

        ``branch=2`` (the paper setting) is ``"up.1.block.2"`` for CIFAR-10.
        """
        if num_res_blocks != 2:
            raise ConfigError("DeepCache's branch numbering assumes num_res_blocks=2")
        layer, blk = divmod(branch, 3)
        return f"up.{layer + 1}.block.2" if blk == 2 else f"up.{layer}.block.{1 - blk}"

    def _skips_needed(self, point: str) -> int:
        """How many skips (``hs[0..k]``) the tail from ``point`` pops: what a shallow call's head produces."""
        return self._num_skips - self._up_index[point]

    # ------------------------------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, *, cache: CacheView | None = None) -> Tensor:
        """Predict the noise ``eps(x_t, t)``.

        Args:
            x: ``[B, in_channels, resolution, resolution]``.
            t: timesteps ``[B]`` (int or float) in the original 0..T-1 range.
            cond: must be None (the DDPM UNet is unconditional).
            cache: None for the original model; a `CacheView` to record features or run a shallow call.
        """
        c = self.config
        if cond is not None:
            raise InputShapeError("DDPMUNet is unconditional: pass cond=None")
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] != c.resolution or x.shape[3] != c.resolution:
            raise InputShapeError(
                f"DDPMUNet expects x of shape [B, {c.in_channels}, {c.resolution}, {c.resolution}], "
                f"got {tuple(x.shape)}"
            )
        t = self._check_timesteps(t, x.shape[0], x)
        self._check_cache(cache)
        temb = ddpm_timestep_embedding(t, c.ch).to(x.dtype)  # float32 embedding; a float16 / float64 model's dtype
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))

        shallow = cache is not None and cache.is_shallow
        head_len = self._skips_needed(cache.read) if shallow else self._num_skips
        hs = self._encode(x, temb, head_len)
        if shallow:
            h = self._cached(cache, x.shape[0])
            start = self._up_index[cache.read]
        else:
            h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
            start = 0
        h = self._decode(h, hs, temb, start, cache)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _encode(self, x: Tensor, temb: Tensor, num_skips: int) -> list[Tensor]:
        """Encoder prefix producing the first ``num_skips`` skip tensors ``hs``."""
        hs = [self.conv_in(x)]
        for level, down in enumerate(self.down):
            for b, block in enumerate(down.block):
                if len(hs) >= num_skips:
                    return hs
                h = block(hs[-1], temb)
                if len(down.attn) > 0:
                    h = down.attn[b](h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                if len(hs) >= num_skips:
                    return hs
                hs.append(down.downsample(hs[-1]))
        return hs

    def _decode(self, h: Tensor, hs: list[Tensor], temb: Tensor, start: int, cache: CacheView | None) -> Tensor:
        """Decoder from up block ``start`` (execution order) on, popping the skips it needs."""
        for j in range(start, len(self._up_order)):
            level, b = self._up_order[j]
            if cache is not None:
                cache.store(f"up.{level}.block.{b}", h)
            up = self.up[level]
            h = up.block[b](torch.cat([h, hs.pop()], dim=1), temb)
            if len(up.attn) > 0:
                h = up.attn[b](h)
            if b == self.config.num_res_blocks and level != 0:
                h = up.upsample(h)
        return h
