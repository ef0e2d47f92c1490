"""First-stage autoencoders of latent diffusion: KL (``kl-f8``, the SD VAE) and VQ (``vq-f4``), reimplemented after
CompVis ``ldm.models.autoencoder.{AutoencoderKL, VQModelInterface}`` and ``ldm.modules.diffusionmodules.model``.

Attribute names reproduce the ``first_stage_model.*`` keys (``encoder.down.{l}.block.{b}``, ``decoder.up.{l}``,
``quant_conv``, ``post_quant_conv``, ``quantize.embedding.weight``), so the first stage of an LDM/SD ``.ckpt``
loads as it is (``loss.*`` keys of standalone autoencoder checkpoints are ignored). Numerics follow the original:
the DDPM block vocabulary without time embedding, GroupNorm(32, eps=1e-6), asymmetric ``(0,1,0,1)`` padding before
the stride-2 downsample conv, single-head 1x1-conv attention in the middle blocks.

The pipeline only needs ``decode`` (latents -> images) and, for round trips, ``encode``; LDM scales latents by
``scale_factor`` outside the autoencoder (`cq.models.LatentDiffusion`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputShapeError
from .ddpm import AttnBlock, Downsample, Upsample


__all__ = ["AutoencoderConfig", "AutoencoderKL", "VQModel", "Encoder", "Decoder", "build_autoencoder"]

_EPS, _GROUPS = 1e-6, 32


@dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    """``first_stage_config.params`` of an LDM yaml: ``embed_dim`` (+ ``n_embed`` for VQ) and the ``ddconfig``.

    KL autoencoders use ``double_z`` (the encoder outputs mean and log-variance); VQ ones do not.
    """

    kind: Literal["kl", "vq"]
    embed_dim: int  # latent channels seen by the diffusion model
    z_channels: int
    n_embed: int | None = None  # VQ codebook size
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("kl", "vq"):
            raise ConfigError(f"AutoencoderConfig.kind must be 'kl' or 'vq', got {self.kind!r}")
        if (self.kind == "vq") != (self.n_embed is not None):
            raise ConfigError(f"AutoencoderConfig: n_embed (the codebook size) is needed for VQ only; got {self}")
        for name in ("embed_dim", "z_channels", "ch", "num_res_blocks", "resolution", "in_channels", "out_ch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"AutoencoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embed is not None and self.n_embed < 1:
            raise ConfigError(f"AutoencoderConfig.n_embed must be >= 1, got {self.n_embed}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"AutoencoderConfig.ch_mult must be a non-empty tuple of ints >= 1, got {self.ch_mult}")
        if any((self.ch * m) % _GROUPS for m in (1, *self.ch_mult)):
            raise ConfigError(f"AutoencoderConfig: ch * ch_mult must be multiples of {_GROUPS}, got {self.ch}")

    @property
    def double_z(self) -> bool:
        return self.kind == "kl"

    @property
    def factor(self) -> int:
        """Downsampling factor between images and latents (f4, f8...)."""
        return 2 ** (len(self.ch_mult) - 1)


# ----------------------------------------------------------------------------------------------------------------
# Encoder / Decoder (ldm.modules.diffusionmodules.model)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice (dropout before the second conv), 1x1 ``nin_shortcut`` when channels change; no time
    embedding (``temb_channels=0`` in the autoencoders)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = nn.GroupNorm(_GROUPS, in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_GROUPS, out_channels, eps=_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class _Level(nn.Module):
    def __init__(self, block: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(block)
        self.attn = nn.ModuleList(attn)


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels, _EPS, _GROUPS)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images ``[B, in_channels, H, W]`` -> ``[B, (2 if double_z else 1) * z_channels, H/f, W/f]``."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.num_resolutions = len(c.ch_mult)
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        in_ch_mult = (1, *c.ch_mult)
        res = c.resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(c.ch_mult):
            block_in, block_out = c.ch * in_ch_mult[level], c.ch * mult
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, c.dropout))
                block_in = block_out
                if res in c.attn_resolutions:
                    attns.append(AttnBlock(block_in, _EPS, _GROUPS))
            down = _Level(blocks, attns)
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, True)
                res //= 2
            self.down.append(down)
        self.mid = _Mid(block_in, c.dropout)
        self.norm_out = nn.GroupNorm(_GROUPS, block_in, eps=_EPS)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels if c.double_z else c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for b, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[b](h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` -> images ``[B, out_ch, h*f, w*f]``."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.num_resolutions = len(c.ch_mult)
        block_in = c.ch * c.ch_mult[-1]
        res = c.resolution // c.factor
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, c.dropout)
        ups: list[_Level] = []
        for level in reversed(range(self.num_resolutions)):
            block_out = c.ch * c.ch_mult[level]
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, c.dropout))
                block_in = block_out
                if res in c.attn_resolutions:
                    attns.append(AttnBlock(block_in, _EPS, _GROUPS))
            up = _Level(blocks, attns)
            if level != 0:
                up.upsample = Upsample(block_in, True)
                res *= 2
            ups.insert(0, up)  # up[0] is the highest resolution, as in the original
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(_GROUPS, block_in, eps=_EPS)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for b, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[b](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# The two first stages


class _FirstStage(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def _check(self, x: Tensor, channels: int, what: str) -> None:
        factor = self.config.factor
        if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % factor or x.shape[3] % factor:
            raise InputShapeError(
                f"{type(self).__name__}.{what} expects [B, {channels}, H, W] with H, W multiples of {factor}, "
                f"got {tuple(x.shape)}"
            )

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        f = self.config.factor
        return (self.config.embed_dim, image_size // f, image_size // f)


class AutoencoderKL(_FirstStage):
    """KL-regularised autoencoder (LDM ``AutoencoderKL``): ``quant_conv`` maps the encoder's ``2 z`` channels to
    mean and log-variance of ``embed_dim`` channels; ``post_quant_conv`` maps latents back to ``z`` channels."""

    def __init__(self, config: AutoencoderConfig):
        if config.kind != "kl":
            raise ConfigError(f"AutoencoderKL needs kind='kl', got {config.kind!r}")
        super().__init__(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance (clamped to [-30, 20], as ``DiagonalGaussianDistribution``) of the posterior."""
        self._check(x, self.config.in_channels, "encode")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Latents of images ``x`` in [-1, 1]: the posterior mean (its mode), or a sample with ``sample=True``."""
        mean, logvar = self.encode_moments(x)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: Tensor) -> Tensor:
        """Images (about [-1, 1]) of latents ``z``."""
        self._check(z, self.config.embed_dim, "decode")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantization (LDM ``VectorQuantizer2``, legacy): ``embedding`` ``[n_embed, dim]``."""

    def __init__(self, n_embed: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)

    def indices(self, z: Tensor) -> Tensor:
        """``[B, H, W]`` index of the nearest codebook entry of every latent vector."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (BHW, C)
        codebook = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None] - 2 * flat @ codebook.t()
        return d.argmin(dim=1).reshape(z.shape[0], z.shape[2], z.shape[3])

    def forward(self, z: Tensor) -> Tensor:
        z_q = self.embedding(self.indices(z)).permute(0, 3, 1, 2)
        return z + (z_q - z)  # the straight-through form of the original (same values, same rounding)


class VQModel(_FirstStage):
    """Vector-quantised autoencoder (LDM ``VQModelInterface``): ``encode`` returns the pre-quantization latent,
    ``decode`` quantizes it first unless ``force_not_quantize`` (as LDM and diffusers do)."""

    def __init__(self, config: AutoencoderConfig):
        if config.kind != "vq":
            raise ConfigError(f"VQModel needs kind='vq', got {config.kind!r}")
        super().__init__(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: Tensor) -> Tensor:
        self._check(x, self.config.in_channels, "encode")
        return self.quant_conv(self.encoder(x))

    def decode(self, z: Tensor, *, force_not_quantize: bool = False) -> Tensor:
        self._check(z, self.config.embed_dim, "decode")
        if not force_not_quantize:
            z = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def build_autoencoder(config: AutoencoderConfig) -> AutoencoderKL | VQModel:
    return AutoencoderKL(config) if config.kind == "kl" else VQModel(config)
