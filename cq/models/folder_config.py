"""The architecture of a diffusers pipeline folder, read from its own configs.

A ``StableDiffusionPipeline``-style folder describes every part it holds: ``unet/config.json``
(``UNet2DConditionModel`` / ``UNet2DModel``, see `cq.models.convert_ldm.ldm_unet_config_from_diffusers`),
``vae/config.json`` (``AutoencoderKL`` / ``VQModel``), ``text_encoder/config.json`` (transformers
``CLIPTextConfig``) and ``scheduler/scheduler_config.json`` (betas, ``prediction_type``). `preset_from_folder`
turns them into one cq `Preset`; `preset_differences` names the fields where a named preset disagrees with it.
An SDXL folder (``StableDiffusionXLPipeline``) adds ``text_encoder_2/config.json`` (``CLIPTextModelWithProjection``)
and states ``force_zeros_for_empty_prompt`` in ``model_index.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError, ConfigError, CqError
from ..sampling.noise import NoiseSchedule
from .autoencoders import AutoencoderConfig
from .checkpoint import read_config
from .clip_text import CLIPTextConfig
from .conditioners import ConditionerConfig
from .convert import block_out_channels
from .convert_ldm import ldm_unet_config_from_diffusers
from .loading import diffusers_noise_schedule
from .presets import LatentPipelineSpec, Preset


__all__ = ["autoencoder_config_from_diffusers", "preset_from_folder", "preset_differences", "read_config"]

# what diffusers' StableDiffusionPipeline defaults to when the VAE config states no scaling_factor
_SD_SCALE = 0.18215


def autoencoder_config_from_diffusers(config: dict[str, Any]) -> AutoencoderConfig:
    """`AutoencoderConfig` of a diffusers ``AutoencoderKL`` / ``VQModel`` config.json (mirrors
    ``diffusers.models.autoencoders.vae.{Encoder, Decoder}``: plain encoder/decoder blocks, mid-block attention,
    GroupNorm(32, eps 1e-6)); raises `ConfigError` naming an option the CompVis autoencoder does not have."""
    vq = config.get("_class_name") == "VQModel" or "num_vq_embeddings" in config
    expected: dict[str, Any] = {
        "act_fn": "silu",
        "norm_num_groups": 32,
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "norm_type": "group",
        "force_upcast": None,  # any value: only a dtype policy of diffusers' pipelines
    }
    for key, want in expected.items():
        if want is not None and key in config and config[key] != want:
            raise ConfigError(
                f"diffusers autoencoder config has {key}={config[key]!r}; cq's autoencoder needs {want!r}"
            )
    down, up = config.get("down_block_types", ()), config.get("up_block_types", ())
    bad = sorted({*down} - {"DownEncoderBlock2D"}) + sorted({*up} - {"UpDecoderBlock2D"})
    if bad:
        raise ConfigError(f"diffusers autoencoder block types {bad} have no CompVis counterpart")
    channels = block_out_channels(config, default=[64])
    ch = channels[0]
    if len(down) != len(channels) or len(up) != len(channels):
        raise ConfigError(
            f"diffusers autoencoder config: block_out_channels {channels} must be multiples of the first, one per "
            f"down/up block ({len(down)}/{len(up)} given)"
        )
    latent = config.get("latent_channels", 4)
    size = config.get("sample_size", 256)
    size = size[0] if isinstance(size, list | tuple) else size
    common = dict(
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=config.get("layers_per_block", 1),
        resolution=size,
        in_channels=config.get("in_channels", 3),
        out_ch=config.get("out_channels", 3),
    )
    if vq:
        return AutoencoderConfig(
            kind="vq",
            embed_dim=config.get("vq_embed_dim") or latent,
            z_channels=latent,
            n_embed=config.get("num_vq_embeddings", 256),
            **common,
        )
    return AutoencoderConfig(kind="kl", embed_dim=latent, z_channels=latent, **common)


def preset_from_folder(folder: str | Path) -> Preset:
    """The `Preset` a diffusers pipeline folder describes (UNet, VAE, text encoder, noise schedule, latent scale).

    Sampling defaults are SD's (PLMS, 50 steps, guidance 7.5) for text-conditioned folders, DDIM without
    guidance otherwise. Raises `CheckpointFormatError` for missing or malformed configs, `ConfigError` for
    architectures cq does not build.
    """
    folder = Path(folder)
    for part in ("unet", "vae"):
        if not (folder / part).is_dir():
            raise CheckpointFormatError(f"{folder} is not a diffusers pipeline folder: no {part}/ sub-folder")
    try:
        unet = ldm_unet_config_from_diffusers(read_config(folder / "unet" / "config.json"))
        vae_config = read_config(folder / "vae" / "config.json")
        autoencoder = autoencoder_config_from_diffusers(vae_config)
        conditioner = None
        if (folder / "text_encoder_2").is_dir():
            conditioner = _sdxl_conditioner(folder)
        elif (folder / "text_encoder").is_dir():
            text = CLIPTextConfig.from_transformers(read_config(folder / "text_encoder" / "config.json"))
            conditioner = ConditionerConfig(kind="clip_text", text=text)
    except CqError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointFormatError(
            f"{folder}: a config does not describe a supported model ({type(e).__name__}: {e})"
        ) from None
    scale = vae_config.get("scaling_factor", _SD_SCALE)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise CheckpointFormatError(f"{folder / 'vae' / 'config.json'}: scaling_factor must be a number > 0")
    text_conditioned = conditioner is not None
    sdxl = text_conditioned and conditioner.kind == "sdxl"
    if sdxl and (unet.context_dim, unet.adm_in_channels) != (
        conditioner.text.hidden_size + conditioner.text_2.hidden_size,
        conditioner.text_2.projection_dim + 6 * conditioner.time_dim,
    ):
        raise ConfigError(
            f"{folder}: the SDXL UNet takes context_dim={unet.context_dim} and adm_in_channels="
            f"{unet.adm_in_channels}, but the text encoders give {conditioner.text.hidden_size} + "
            f"{conditioner.text_2.hidden_size} features and projection_dim {conditioner.text_2.projection_dim} + "
            f"6 * addition_time_embed_dim {conditioner.time_dim}"
        )
    noise = diffusers_noise_schedule(folder / "unet")
    return Preset(
        name=folder.name,
        config=unet,
        noise=noise if noise is not None else NoiseSchedule(),
        sampling={"steps": 50, "spacing": "ldm", "eta": 0.0},
        source=str(folder),
        pipeline=LatentPipelineSpec(
            autoencoder=autoencoder,
            conditioner=conditioner,
            scale_factor=float(scale),
            sampler="plms" if text_conditioned and not sdxl else "ddim",
            guidance_scale=5.0 if sdxl else 7.5 if text_conditioned else 1.0,  # diffusers' SDXL / SD defaults
        ),
    )


def _sdxl_conditioner(folder: Path) -> ConditionerConfig:
    """text_encoder/ + text_encoder_2/ configs, ``addition_time_embed_dim`` of unet/config.json and
    ``force_zeros_for_empty_prompt`` of model_index.json (default True, as ``StableDiffusionXLPipeline``)."""
    if not (folder / "text_encoder").is_dir():
        raise ConfigError(
            f"{folder} has text_encoder_2/ but no text_encoder/: cq loads SDXL base folders with both encoders "
            "(the SDXL refiner, conditioned on encoder 2 and an aesthetic score, is not supported)"
        )
    unet_config = read_config(folder / "unet" / "config.json")
    if unet_config.get("addition_embed_type") != "text_time":
        raise ConfigError(
            f"{folder / 'unet' / 'config.json'}: a folder with text_encoder_2/ needs an SDXL UNet "
            f"(addition_embed_type='text_time'), got {unet_config.get('addition_embed_type')!r}"
        )
    force_zeros = True
    if (folder / "model_index.json").exists():
        force_zeros = read_config(folder / "model_index.json").get("force_zeros_for_empty_prompt", True)
        if not isinstance(force_zeros, bool):
            raise CheckpointFormatError(f"{folder / 'model_index.json'}: force_zeros_for_empty_prompt must be a bool")
    return ConditionerConfig(
        kind="sdxl",
        text=CLIPTextConfig.from_transformers(
            read_config(folder / "text_encoder" / "config.json"), with_projection=False
        ),
        text_2=CLIPTextConfig.from_transformers(
            read_config(folder / "text_encoder_2" / "config.json"), with_projection=True
        ),
        time_dim=unet_config.get("addition_time_embed_dim"),
        force_zeros_for_empty_prompt=force_zeros,
    )


def preset_differences(expected: Preset, found: Preset, *, noise: bool = True) -> list[str]:
    """Dotted names of the architecture fields where ``found`` (a folder's configs) differs from ``expected`` (a
    named preset), each with both values: ``"unet.context_dim: 768 != 32"``. ``noise=False`` skips the schedule
    (a folder without a scheduler config states none)."""
    pairs: list[tuple[str, Any, Any]] = [("unet", expected.config, found.config)]
    if noise:
        pairs.append(("noise", expected.noise, found.noise))
    spec_e, spec_f = expected.pipeline, found.pipeline
    if spec_e is not None and spec_f is not None:
        pairs.append(("vae", spec_e.autoencoder, spec_f.autoencoder))
        text_e = spec_e.conditioner.text if spec_e.conditioner is not None else None
        text_f = spec_f.conditioner.text if spec_f.conditioner is not None else None
        pairs.append(("text_encoder", text_e, text_f))
        text2_e = spec_e.conditioner.text_2 if spec_e.conditioner is not None else None
        text2_f = spec_f.conditioner.text_2 if spec_f.conditioner is not None else None
        if text2_e is not None or text2_f is not None:
            pairs.append(("text_encoder_2", text2_e, text2_f))
    out = []
    for part, a, b in pairs:
        if a is None or b is None or type(a) is not type(b):
            if a != b:
                out.append(f"{part}: {a!r} != {b!r}")
            continue
        for f in dataclasses.fields(a):
            if not f.compare:
                continue
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                out.append(f"{part}.{f.name}: {va!r} != {vb!r}")
    return out
