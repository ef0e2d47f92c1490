"""Model presets: architecture, noise schedule and default sampling of each supported checkpoint, as data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..sampling.noise import NoiseSchedule
from .autoencoders import AutoencoderConfig
from .clip_text import CLIPTextConfig
from .conditioners import ConditionerConfig
from .ddpm import DDPMConfig
from .families import family_of
from .openai_unet import LDMUNetConfig


if TYPE_CHECKING:
    from ..core.unet import CacheableUNet


__all__ = ["Preset", "LatentPipelineSpec", "PRESETS", "get_preset", "sampling_defaults"]


@dataclass(frozen=True, kw_only=True)
class LatentPipelineSpec:
    """What a latent-diffusion model adds around its UNet (`cq.models.LatentDiffusion`)."""

    autoencoder: AutoencoderConfig  # the first stage decoding latents into images
    conditioner: ConditionerConfig | None = None  # labels/prompts -> cond (None: unconditional or label UNet)
    scale_factor: float | None = 1.0  # latents are z * scale_factor; None: read it from the checkpoint
    sampler: str = "ddim"  # default sampler ("ddim" | "plms")
    guidance_scale: float = 1.0  # default classifier-free guidance scale (1: no guidance)


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A named UNet: what to build, how it was trained to denoise, how it is usually sampled; ``pipeline`` for
    the latent-diffusion parts around it."""

    name: str
    config: Any  # the config of a registered model family (`DDPMConfig`, `LDMUNetConfig`, ...)
    noise: NoiseSchedule
    sampling: dict[str, Any] = field(default_factory=dict)  # default sampler kwargs (steps, spacing, eta)
    embedded: str | None = None  # file under cq/models/weights/ shipped with the package
    source: str = ""  # where the real weights come from
    pipeline: LatentPipelineSpec | None = None  # latent diffusion only

    def __post_init__(self) -> None:
        family = family_of(self.config)
        if self.pipeline is not None and family != "ldm":
            raise ConfigError(f"preset {self.name!r}: a latent pipeline needs an LDMUNetConfig, got a {family} UNet")

    @property
    def family(self) -> str:
        """The model family's name (``"ddpm"``, ``"ldm"``, ...), from the config's type (`register_family`)."""
        return family_of(self.config)


_DDPM_NOISE = NoiseSchedule(kind="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="cifar10",
            config=DDPMConfig(
                resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
            ),
            noise=_DDPM_NOISE,
            sampling={"steps": 100, "spacing": "quad", "eta": 0.0},
            source="ddim/pytorch_diffusion ema_diffusion_cifar10_model/model-790000.ckpt or google/ddpm-cifar10-32",
        ),
        # the two LSUN 256x256 DDPMs: one architecture and sampling, their own weights
        *(
            Preset(
                name=name,
                config=DDPMConfig(
                    resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,)
                ),
                noise=_DDPM_NOISE,
                sampling={"steps": 100, "spacing": "uniform", "eta": 0.0},
                source=source,
            )
            for name, source in (
                ("church", "ddim ema_diffusion_lsun_church_model/model-4432000.ckpt or google/ddpm-church-256"),
                ("bedroom", "ddim ema_diffusion_lsun_bedroom_model/model-2388000.ckpt or google/ddpm-bedroom-256"),
            )
        ),
        Preset(
            name="demo",
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
            # no x0 clipping (the samplers' default): quality is measured on what the model itself produces
            sampling={"steps": 50, "spacing": "uniform", "eta": 0.0, "clip_x0": False},
            embedded="demo.safetensors",
            source="trained by cq itself on scikit-learn's 8x8 digits upsampled to 16x16 (`cq train`)",
        ),
    ]
}


# ----------------------------------------------------------------------------------------------------------------
# Latent diffusion (CompVis latent-diffusion configs, ecosystem.md §A3-A4). LDM's "linear" betas are
# linspace(sqrt(b0), sqrt(b1), T)**2, i.e. kind "scaled_linear" here.

_VQ_F4 = AutoencoderConfig(kind="vq", embed_dim=3, z_channels=3, n_embed=8192, ch=128, ch_mult=(1, 2, 4))
_KL_F8 = AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=128, ch_mult=(1, 2, 4, 4))
_LDM4_NOISE = NoiseSchedule(kind="scaled_linear", beta_start=0.0015, beta_end=0.0195, num_timesteps=1000)
_CHURCH_NOISE = NoiseSchedule(kind="scaled_linear", beta_start=0.0015, beta_end=0.0155, num_timesteps=1000)
_SD_NOISE = NoiseSchedule(kind="scaled_linear", beta_start=0.00085, beta_end=0.012, num_timesteps=1000)
_CLIP_L14 = CLIPTextConfig()
# OpenCLIP ViT-H/14's text tower as SD 2 reads it: 24 blocks, of which the first 23 feed ln_final ("penultimate")
_OPEN_CLIP_H14_SD2 = CLIPTextConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
)
# OpenCLIP ViT-bigG/14 (SDXL's second encoder: every block, pooled output projected to 1280)
_OPEN_CLIP_BIGG14 = CLIPTextConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)

# tiny versions: same structure (levels, attention kind, conditioning, autoencoder kind), 32 channels
_TINY_KL = AutoencoderConfig(
    kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16
)
_TINY_VQ = AutoencoderConfig(
    kind="vq", embed_dim=3, z_channels=3, n_embed=64, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16
)
_TINY_CLIP = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

LDM_PRESETS: list[Preset] = [
    Preset(
        name="ldm-cin256-v2",
        config=LDMUNetConfig(
            image_size=64,
            in_channels=3,
            out_channels=3,
            model_channels=192,
            num_res_blocks=2,
            attention_resolutions=(8, 4, 2),
            channel_mult=(1, 2, 3, 5),
            num_heads=1,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=512,
        ),
        noise=_LDM4_NOISE,
        sampling={"steps": 250, "spacing": "ldm", "eta": 0.0},
        pipeline=LatentPipelineSpec(
            autoencoder=_VQ_F4,
            conditioner=ConditionerConfig(kind="class_embedder", n_classes=1001, embed_dim=512, uncond_class=1000),
            scale_factor=1.0,
            guidance_scale=1.5,
        ),
        source="CompVis latent-diffusion models/ldm/cin256-v2/model.ckpt (configs/latent-diffusion/cin256-v2.yaml)",
    ),
    Preset(
        name="ldm-bedroom",
        config=LDMUNetConfig(
            image_size=64,
            in_channels=3,
            out_channels=3,
            model_channels=224,
            num_res_blocks=2,
            attention_resolutions=(8, 4, 2),
            channel_mult=(1, 2, 3, 4),
            num_head_channels=32,
        ),
        noise=_LDM4_NOISE,
        sampling={"steps": 100, "spacing": "ldm", "eta": 0.0},
        pipeline=LatentPipelineSpec(autoencoder=_VQ_F4, scale_factor=1.0),
        source="CompVis latent-diffusion models/ldm/lsun_beds256/model.ckpt (lsun_bedrooms-ldm-vq-4.yaml)",
    ),
    Preset(
        name="ldm-church",
        config=LDMUNetConfig(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=192,
            num_res_blocks=2,
            attention_resolutions=(1, 2, 4, 8),
            channel_mult=(1, 2, 2, 4, 4),
            num_heads=8,
            use_scale_shift_norm=True,
            resblock_updown=True,
        ),
        noise=_CHURCH_NOISE,
        sampling={"steps": 100, "spacing": "ldm", "eta": 0.0},
        pipeline=LatentPipelineSpec(
            autoencoder=_KL_F8,
            scale_factor=None,  # scale_by_std: the checkpoint stores its `scale_factor` buffer
        ),
        source="CompVis latent-diffusion models/ldm/lsun_churches256/model.ckpt (lsun_churches-ldm-kl-8.yaml)",
    ),
    Preset(
        name="sd-v1",
        config=LDMUNetConfig(
            image_size=64,
            in_channels=4,
            out_channels=4,
            model_channels=320,
            num_res_blocks=2,
            attention_resolutions=(4, 2, 1),
            channel_mult=(1, 2, 4, 4),
            num_heads=8,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=768,
        ),
        noise=_SD_NOISE,
        sampling={"steps": 50, "spacing": "ldm", "eta": 0.0},
        pipeline=LatentPipelineSpec(
            autoencoder=_KL_F8,
            conditioner=ConditionerConfig(kind="clip_text", text=_CLIP_L14),
            scale_factor=0.18215,
            sampler="plms",
            guidance_scale=7.5,
        ),
        source="CompVis sd-v1-4.ckpt / v1-5-pruned-emaonly.{ckpt,safetensors} (v1-inference.yaml) "
        "or a diffusers StableDiffusionPipeline folder",
    ),
    # SD 2.x (Stability-AI/stablediffusion v2-inference{,-v}.yaml: 64-channel heads, linear proj_in/out, attention
    # in fp32, FrozenOpenCLIPEmbedder ViT-H-14 layer="penultimate", padding with 0; scripts/txt2img.py's defaults:
    # DDIM, 50 steps, scale 9). diffusers SD 2 folders also load by their own configs.
    *(
        Preset(
            name=name,
            config=LDMUNetConfig(
                image_size=size,
                in_channels=4,
                out_channels=4,
                model_channels=320,
                num_res_blocks=2,
                attention_resolutions=(4, 2, 1),
                channel_mult=(1, 2, 4, 4),
                num_head_channels=64,
                use_spatial_transformer=True,
                transformer_depth=1,
                context_dim=1024,
                use_linear_in_transformer=True,
                upcast_attention=True,
            ),
            noise=dataclasses.replace(_SD_NOISE, prediction=prediction),
            sampling={"steps": 50, "spacing": "ldm", "eta": 0.0},
            pipeline=LatentPipelineSpec(
                autoencoder=_KL_F8,
                conditioner=ConditionerConfig(kind="clip_text", text=_OPEN_CLIP_H14_SD2, pad_id=0),
                scale_factor=0.18215,
                sampler="ddim",
                guidance_scale=9.0,
            ),
            source=source,
        )
        for name, size, prediction, source in (
            ("sd-v2", 96, "v", "v2-1_768-ema-pruned.{ckpt,safetensors} (v2-inference-v.yaml, parameterization v)"),
            ("sd-v2-base", 64, "eps", "v2-1_512-ema-pruned.{ckpt,safetensors} (v2-inference.yaml)"),
        )
    ),
    # SDXL base (Stability-AI/generative-models configs/inference/sd_xl_base.yaml): no attention at the first level,
    # transformer depth (-, 2, 10), context = CLIP ViT-L penultimate states (768) + OpenCLIP bigG penultimate
    # (1280), y = bigG's pooled text_embeds (1280) + 6 size/crop numbers x 256; VAE scale 0.13025. Defaults:
    # diffusers' StableDiffusionXLPipeline guidance 5.0, with DDIM 50 (cq's samplers; diffusers uses Euler).
    Preset(
        name="sdxl",
        config=LDMUNetConfig(
            image_size=128,
            in_channels=4,
            out_channels=4,
            model_channels=320,
            num_res_blocks=2,
            attention_resolutions=(4, 2),
            channel_mult=(1, 2, 4),
            num_head_channels=64,
            use_spatial_transformer=True,
            transformer_depth=(1, 2, 10),
            context_dim=2048,
            use_linear_in_transformer=True,
            adm_in_channels=2816,
        ),
        noise=_SD_NOISE,
        sampling={"steps": 50, "spacing": "ldm", "eta": 0.0},
        pipeline=LatentPipelineSpec(
            autoencoder=_KL_F8,
            conditioner=ConditionerConfig(
                kind="sdxl", text=_CLIP_L14, text_2=_OPEN_CLIP_BIGG14, time_dim=256, pad_id_2=0
            ),
            scale_factor=0.13025,
            sampler="ddim",
            guidance_scale=5.0,
        ),
        source="sgm sd_xl_base_1.0.safetensors (sd_xl_base.yaml) or a diffusers StableDiffusionXLPipeline folder",
    ),
    # tiny configs for tests and CPU demos (random weights; cq.models.LatentDiffusion.build)
    Preset(
        name="tiny-sd-v2",
        config=LDMUNetConfig(
            image_size=8,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            num_res_blocks=2,
            attention_resolutions=(1, 2),
            channel_mult=(1, 2),
            num_head_channels=16,
            use_spatial_transformer=True,
            context_dim=32,
            use_linear_in_transformer=True,
            upcast_attention=True,
        ),
        noise=dataclasses.replace(_SD_NOISE, prediction="v"),
        sampling={"steps": 10, "spacing": "ldm", "eta": 0.0},
        pipeline=LatentPipelineSpec(
            autoencoder=_TINY_KL,
            conditioner=ConditionerConfig(kind="clip_text", text=dataclasses.replace(_TINY_CLIP, hidden_act="gelu")),
            scale_factor=0.18215,
            sampler="plms",
            guidance_scale=7.5,
        ),
        source="random weights (structure of sd-v2: v-prediction, linear projections, fp32 attention)",
    ),
    Preset(
        name="tiny-sd",
        config=LDMUNetConfig(
            image_size=8,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            num_res_blocks=2,
            attention_resolutions=(1,),
            channel_mult=(1, 2),
            num_heads=4,
            use_spatial_transformer=True,
            context_dim=32,
        ),
        noise=_SD_NOISE,
        sampling={"steps": 10, "spacing": "ldm", "eta": 0.0},
        pipeline=LatentPipelineSpec(
            autoencoder=_TINY_KL,
            conditioner=ConditionerConfig(kind="clip_text", text=_TINY_CLIP),
            scale_factor=0.18215,
            sampler="plms",
            guidance_scale=7.5,
        ),
        source="random weights (structure of sd-v1)",
    ),
    Preset(
        name="tiny-sdxl",  # diffusers' SDXL pipeline-test UNet; UNet only (cond: unet.pack_cond(context, y))
        config=LDMUNetConfig(
            image_size=16,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            num_res_blocks=2,
            attention_resolutions=(2,),
            channel_mult=(1, 2),
            num_heads=4,
            use_spatial_transformer=True,
            transformer_depth=(1, 2),
            context_dim=64,
            use_linear_in_transformer=True,
            adm_in_channels=80,  # pooled text 32 + 6 time ids x 8
        ),
        noise=_SD_NOISE,
        sampling={"steps": 10, "spacing": "ldm", "eta": 0.0},
        source="random weights (structure of SDXL: no attention at the first level, depth per level, vector y)",
    ),
    Preset(
        name="tiny-ldm-cin",
        config=LDMUNetConfig(
            image_size=8,
            in_channels=3,
            out_channels=3,
            model_channels=32,
            num_res_blocks=2,
            attention_resolutions=(2,),
            channel_mult=(1, 2),
            num_heads=1,
            use_spatial_transformer=True,
            context_dim=32,
        ),
        noise=_LDM4_NOISE,
        sampling={"steps": 10, "spacing": "ldm", "eta": 0.0},
        pipeline=LatentPipelineSpec(
            autoencoder=_TINY_VQ,
            conditioner=ConditionerConfig(kind="class_embedder", n_classes=1001, embed_dim=32, uncond_class=1000),
            scale_factor=1.0,
            guidance_scale=1.5,
        ),
        source="random weights (structure of ldm-cin256-v2)",
    ),
    Preset(
        name="tiny-ldm-bedroom",
        config=LDMUNetConfig(
            image_size=8,
            in_channels=3,
            out_channels=3,
            model_channels=32,
            num_res_blocks=2,
            attention_resolutions=(2,),
            channel_mult=(1, 2),
            num_head_channels=16,
        ),
        noise=_LDM4_NOISE,
        sampling={"steps": 10, "spacing": "ldm", "eta": 0.0},
        pipeline=LatentPipelineSpec(autoencoder=_TINY_VQ, scale_factor=1.0),
        source="random weights (structure of ldm-bedroom)",
    ),
    Preset(
        name="tiny-ldm-church",
        config=LDMUNetConfig(
            image_size=8,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            num_res_blocks=2,
            attention_resolutions=(1, 2),
            channel_mult=(1, 2),
            num_heads=2,
            use_scale_shift_norm=True,
            resblock_updown=True,
        ),
        noise=_CHURCH_NOISE,
        sampling={"steps": 10, "spacing": "ldm", "eta": 0.0},
        pipeline=LatentPipelineSpec(autoencoder=_TINY_KL, scale_factor=0.5),
        source="random weights (structure of ldm-church)",
    ),
]
PRESETS.update({p.name: p for p in LDM_PRESETS})


def sampling_defaults(
    unet: CacheableUNet, steps: int | None = None, spacing: str | None = None
) -> tuple[int, dict[str, Any]]:
    """``(steps, sampler kwargs)`` from a model's preset (``spacing``, ``eta``, ``clip_x0``), ``spacing`` overriding
    the preset's. The same defaults as calling the sampler with these kwargs: nothing is switched silently, so a
    step count that the spacing cannot produce (``uniform`` with ``steps`` not dividing T) raises here, before
    any work, with the fix (``spacing='linspace'``)."""
    from ..sampling.noise import ddim_timesteps

    preset = unet.preset
    defaults = dict(preset.sampling) if preset is not None else {}
    preset_steps = defaults.pop("steps", 50)
    steps = preset_steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    if spacing is not None:
        defaults["spacing"] = spacing
    noise = unet.noise_schedule
    if noise is not None:
        ddim_timesteps(noise.num_timesteps, steps, defaults.get("spacing", "uniform"))
    return steps, defaults


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None
