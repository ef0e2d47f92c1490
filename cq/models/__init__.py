"""Self-contained UNets whose attribute names reproduce the original checkpoints (all `CacheableUNet`s), plus
loaders, presets and the latent-diffusion pipeline."""

from .._moved import package_getattr
from ..core.unet import CacheableUNet, check_cacheable
from .autoencoders import AutoencoderConfig, AutoencoderKL, VQModel
from .clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from .conditioners import ClassEmbedder, ConditionerConfig, TextConditioner
from .ddpm import DDPMConfig, DDPMUNet
from .families import MODEL_FAMILIES, ModelFamily, register_family
from .loading import build, load, load_weights
from .openai_unet import LDMUNet, LDMUNetConfig
from .pipelines import ClassifierFreeGuidance, LatentDiffusion
from .presets import PRESETS, LatentPipelineSpec, Preset, get_preset
from .tokenizer import CLIPTokenizer


__all__ = [
    "CacheableUNet",
    "check_cacheable",
    "register_family",
    "MODEL_FAMILIES",
    "ModelFamily",
    "DDPMConfig",
    "DDPMUNet",
    "LDMUNetConfig",
    "LDMUNet",
    "AutoencoderConfig",
    "AutoencoderKL",
    "VQModel",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTokenizer",
    "ConditionerConfig",
    "ClassEmbedder",
    "TextConditioner",
    "build",
    "load",
    "load_weights",
    "PRESETS",
    "Preset",
    "LatentPipelineSpec",
    "get_preset",
    "LatentDiffusion",
    "ClassifierFreeGuidance",
]

__getattr__ = package_getattr(__name__)  # `cq.models.unet`: the path of the previous release
