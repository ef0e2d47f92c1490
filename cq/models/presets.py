"""Model presets: architecture, noise schedule and default sampling of each supported checkpoint, as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..sampling.noise import NoiseSchedule
from .ddpm import DDPMConfig


__all__ = ["Preset", "PRESETS", "get_preset"]


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A named model: what to build, how it was trained to denoise, how it is usually sampled."""

    name: str
    family: str  # "ddpm"
    config: Any  # DDPMConfig
    noise: NoiseSchedule
    sampling: dict[str, Any] = field(default_factory=dict)  # default sampler kwargs (steps, spacing, eta)
    embedded: str | None = None  # file under cq/models/weights/ shipped with the package
    source: str = ""  # where the real weights come from


_DDPM_NOISE = NoiseSchedule(kind="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="cifar10",
            family="ddpm",
            config=DDPMConfig(
                resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
            ),
            noise=_DDPM_NOISE,
            sampling={"steps": 100, "spacing": "quad", "eta": 0.0},
            source="ddim/pytorch_diffusion ema_diffusion_cifar10_model/model-790000.ckpt or google/ddpm-cifar10-32",
        ),
        Preset(
            name="church",
            family="ddpm",
            config=DDPMConfig(
                resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,)
            ),
            noise=_DDPM_NOISE,
            sampling={"steps": 100, "spacing": "uniform", "eta": 0.0},
            source="ddim ema_diffusion_lsun_church_model/model-4432000.ckpt or google/ddpm-church-256",
        ),
        Preset(
            name="bedroom",
            family="ddpm",
            config=DDPMConfig(
                resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,)
            ),
            noise=_DDPM_NOISE,
            sampling={"steps": 100, "spacing": "uniform", "eta": 0.0},
            source="ddim ema_diffusion_lsun_bedroom_model/model-2388000.ckpt or google/ddpm-bedroom-256",
        ),
        Preset(
            name="demo",
            family="ddpm",
            config=DDPMConfig(
                resolution=16,
                in_channels=1,
                out_ch=1,
                ch=32,
                ch_mult=(1, 2, 2),
                num_res_blocks=2,
                attn_resolutions=(8,),
                dropout=0.1,
            ),
            noise=_DDPM_NOISE,
            sampling={"steps": 50, "spacing": "uniform", "eta": 0.0},
            embedded="demo.safetensors",
            source="trained by cq itself on scikit-learn's 8x8 digits upsampled to 16x16 (`cq train`)",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None
