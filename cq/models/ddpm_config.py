"""`DDPMConfig`: the hyper-parameters of the DDPM UNet (`cq.models.ddpm`), apart from the network so that the
checkpoint-key converters (`cq.models.convert`) read them without importing the model."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


__all__ = ["DDPMConfig"]


@dataclass(frozen=True, kw_only=True)
class DDPMConfig:
    """Hyper-parameters of the ddim-code ``Model`` (``config.model.*`` plus the image size)."""

    resolution: int  # image side; the original asserts H == W == resolution
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128  # base channel count; temb has 4*ch channels
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # resolutions (in pixels) with self-attention
    dropout: float = 0.0
    resamp_with_conv: bool = True
    norm_eps: float = 1e-6
    norm_groups: int = 32

    def __post_init__(self) -> None:
        for name in ("resolution", "in_channels", "out_ch", "ch", "num_res_blocks", "norm_groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DDPMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"DDPMConfig.ch_mult must be a non-empty tuple of ints >= 1, got {self.ch_mult}")
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ConfigError(
                f"DDPMConfig.resolution={self.resolution} must be divisible by 2**(len(ch_mult)-1)="
                f"{2 ** (len(self.ch_mult) - 1)}"
            )
        for m in (1, *self.ch_mult):
            if (self.ch * m) % self.norm_groups:
                raise ConfigError(
                    f"DDPMConfig: channel count ch*mult={self.ch * m} is not divisible by "
                    f"norm_groups={self.norm_groups}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"DDPMConfig.dropout must be in [0, 1), got {self.dropout}")
