"""diffusers' objects in cq's terms: a pipeline checked for what cq supports, a scheduler's noise schedule and
sampler settings, and its UNet converted to cq's own (`convert_unet`)."""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

from ..core.unet import CacheableUNet
from ..errors import ConfigError
from ..models.loading import build, load_weights, unet_config_from_diffusers
from ..models.presets import Preset
from ..sampling.noise import NoiseSchedule
from ..sampling.settings import SamplerSettings


__all__ = ["convert_unet", "noise_schedule_of", "scheduler_settings"]

_PREFIX = "diffusers:"


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ConfigError(
            "cq.diffusers needs the diffusers package: pip install 'cq[diffusers]' (cq's own models do not)"
        ) from None
    return diffusers


# ----------------------------------------------------------------------------------------------------------------
# Conversion and scheduler settings


def noise_schedule_of(scheduler: Any) -> NoiseSchedule:
    """The `NoiseSchedule` of a diffusers scheduler's config (linear / scaled_linear betas only)."""
    cfg = dict(scheduler.config)
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None or kind not in ("linear", "scaled_linear"):
        raise ConfigError(
            f"{type(scheduler).__name__} uses beta_schedule={kind!r}"
            + (" with trained_betas" if cfg.get("trained_betas") is not None else "")
            + "; cq's NoiseSchedule has 'linear' and 'scaled_linear' betas only"
        )
    if cfg.get("rescale_betas_zero_snr"):
        raise ConfigError(f"{type(scheduler).__name__} has rescale_betas_zero_snr=True, which cq does not model")
    return NoiseSchedule(
        kind=kind,
        beta_start=float(cfg.get("beta_start", 1e-4)),
        beta_end=float(cfg.get("beta_end", 0.02)),
        num_timesteps=int(cfg.get("num_train_timesteps", 1000)),
    )


def convert_unet(unet: nn.Module, scheduler: Any) -> CacheableUNet:
    """cq's UNet with the weights of a diffusers ``UNet2DConditionModel`` or ``UNet2DModel`` (float32, on its device,
    eval mode) and the noise schedule of ``scheduler``: an `LDMUNet` (text- or class-conditional, or an LDM-family
    unconditional UNet) or a `DDPMUNet` (google/ddpm-* layout); numerically the same network
    (`tests/test_openai_unet.py`, `tests/test_convert.py`)."""
    diffusers = _diffusers()
    if not isinstance(unet, diffusers.UNet2DConditionModel | diffusers.UNet2DModel):
        raise ConfigError(f"expected a diffusers UNet2DConditionModel or UNet2DModel, got {type(unet).__name__}")
    config = dict(unet.config)
    config["_class_name"] = type(unet).__name__
    config, _ = unet_config_from_diffusers(config)
    preset = Preset(name="diffusers", config=config, noise=noise_schedule_of(scheduler))
    with torch.device("meta"):
        cq_unet = build(preset)
    cq_unet = cq_unet.to_empty(device=unet.device)
    load_weights(cq_unet, {k: v.float() for k, v in unet.state_dict().items()}, format="diffusers")
    return cq_unet.eval()


def _scheduler_name(scheduler: Any) -> str:
    """``"diffusers:<class> <config JSON>"``: what of the scheduler decides the trajectory (all its config)."""
    cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return f"{_PREFIX}{type(scheduler).__name__} {json.dumps(cfg, sort_keys=True, default=str)}"


def scheduler_settings(scheduler: Any, steps: int, *, eta: float = 0.0) -> SamplerSettings:
    """The `SamplerSettings` of a pipeline loop of ``steps`` inference steps with ``scheduler``: the timestep of
    every UNet call (``set_timesteps`` on a copy), the scheduler's class and config, ``clip_sample``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1 (num_inference_steps), got {steps!r}")
    planned = copy.deepcopy(scheduler)
    planned.set_timesteps(steps)
    timesteps = [float(t) for t in planned.timesteps]
    fractional = [t for t in timesteps if not t.is_integer()]
    if fractional:
        raise ConfigError(
            f"{type(scheduler).__name__} with {steps} steps calls the UNet at fractional timesteps "
            f"{fractional[:4]}: cq's per-step tables are keyed by integer timesteps; use timestep_spacing "
            "'leading' or 'trailing', or a step count that gives integer timesteps"
        )
    cfg = dict(scheduler.config)
    spacing = str(cfg.get("timestep_spacing", "leading"))
    return SamplerSettings(
        _scheduler_name(scheduler),
        steps,
        spacing,
        eta,
        bool(cfg.get("clip_sample", False)),
        timesteps=tuple(int(t) for t in timesteps),
    )


def _scheduler_position(scheduler: Any) -> int | None:
    """The scheduler's own count of ``step()`` calls so far (PNDM's ``counter``, the k-diffusion-style schedulers'
    ``step_index``), read only to tell apart two calls at one timestep."""
    counter = getattr(scheduler, "counter", None)
    if isinstance(counter, int):
        return counter
    index = getattr(scheduler, "step_index", None)
    return int(index) if index is not None else None
