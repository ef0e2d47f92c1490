"""Latent-diffusion pipelines: conditioning -> sampling latents with a cq sampler -> decoding with the first stage.

* `ClassifierFreeGuidance` (`cq.sampling.guidance`, re-exported here): a thin sampler-facing wrapper (Ho &
  Salimans 2022) that runs the wrapped model *once* per call on the doubled batch ``[uncond; cond]`` and returns
  ``eps_u + s * (eps_c - eps_u)``, passing ``step=`` through. Wrapping a `CompressedUNet` therefore gives its
  cache one call per step with the doubled batch, whose statistics must pool both halves, as CacheQuant's do
  (algorithms.md §8.3 trap 14): calibrate on ``cq.trace(..., guidance_scale=, uncond=)``. With ``scale == 1``
  it makes the conditional call only, as LDM's samplers do.
* `LatentDiffusion`: UNet + first stage (+ conditioner) of one LDM/SD checkpoint, built from a preset with random
  weights (`LatentDiffusion.build`, for the tiny presets) or loaded from a CompVis ``.ckpt``/``.safetensors``
  (Lightning pickles are read with ``weights_only=True``) or a diffusers pipeline folder
  (`LatentDiffusion.from_pretrained`). `LatentDiffusion.sample` draws latents with DDIM or PLMS and decodes
  ``z / scale_factor``; the denoiser can be swapped for a `CompressedUNet` built around ``pipe.unet``.

Example:
    >>> pipe = LatentDiffusion.from_pretrained("ldm-cin256-v2", "models/ldm/cin256-v2/model.ckpt")
    >>> images = pipe.sample(cond=torch.tensor([88, 207, 360, 387]), guidance_scale=1.5, steps=250, seed=0)
    >>> sd = LatentDiffusion.from_pretrained("sd-v1", "stable-diffusion-v1-5")  # a diffusers folder
    >>> images = sd.sample(cond=["a photo of a cat"], steps=50, seed=0)   # PLMS, scale 7.5 (preset defaults)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointFormatError, ConfigError, InputShapeError
from ..sampling.adapter import FullPrecision
from ..sampling.ddim import StepInfo
from ..sampling.guidance import ClassifierFreeGuidance
from ..sampling.samplers import SAMPLERS
from .autoencoders import build_autoencoder
from .checkpoint import read_diffusers_folder, read_state_dict
from .clip_text import CLIPTextConfig, CLIPTextModel
from .conditioners import ClassEmbedder, SDXLConditioner, TextConditioner, build_conditioner
from .convert_ldm import (
    autoencoder_from_diffusers,
    clip_text_state,
    is_open_clip_text,
    open_clip_num_layers,
    open_clip_text_state,
    split_ldm_checkpoint,
)
from .folder_config import preset_differences, preset_from_folder
from .loading import build, diffusers_noise_schedule, load_weights
from .openai_unet import LDMUNet
from .presets import Preset, get_preset
from .tokenizer import CLIPTokenizer


__all__ = ["ClassifierFreeGuidance", "LatentDiffusion", "SAMPLERS"]


class LatentDiffusion(nn.Module):
    """An LDM / SD model: ``unet`` (`LDMUNet`), ``first_stage`` (`AutoencoderKL` / `VQModel`) and ``conditioner``
    (`ClassEmbedder`, `TextConditioner` or None).

    Args:
        unet: the denoiser; its ``noise_schedule`` drives the samplers.
        first_stage: decodes latents into images.
        conditioner: turns labels/prompts into the UNet's ``cond``; None for unconditional and label UNets.
        scale_factor: latents are ``z * scale_factor`` (SD 0.18215; cin256/bedrooms 1; churches: stored in the ckpt).
        preset: where the defaults (sampler, steps, guidance scale) come from; default ``unet.preset``.
    """

    def __init__(
        self,
        unet: LDMUNet,
        first_stage: nn.Module,
        conditioner: nn.Module | None = None,
        *,
        scale_factor: float = 1.0,
        preset: Preset | None = None,
    ):
        super().__init__()
        if not isinstance(unet, LDMUNet):
            raise ConfigError(f"LatentDiffusion needs an LDMUNet, got {type(unet).__name__}")
        if scale_factor is None or not scale_factor > 0:
            raise ConfigError(f"scale_factor must be > 0, got {scale_factor}")
        if isinstance(conditioner, SDXLConditioner):
            c = unet.config
            if (c.context_dim, c.adm_in_channels) != (conditioner.context_dim, conditioner.adm_in_channels):
                raise ConfigError(
                    f"the SDXL conditioner gives context width {conditioner.context_dim} and y width "
                    f"{conditioner.adm_in_channels}, the UNet takes context_dim={c.context_dim} and "
                    f"adm_in_channels={c.adm_in_channels}"
                )
            if conditioner.time_ids is None:  # diffusers: original and target size = the output size, no crop
                ch_mult = getattr(getattr(first_stage, "config", None), "ch_mult", (1,))
                size = c.image_size * 2 ** (len(ch_mult) - 1)
                conditioner.time_ids = (size, size, 0.0, 0.0, size, size)
        self.unet = unet
        self.first_stage = first_stage
        self.conditioner = conditioner
        self.scale_factor = float(scale_factor)
        self.preset = preset if preset is not None else unet.preset

    @property
    def noise_schedule(self):  # noqa: ANN201
        return self.unet.noise_schedule

    # ------------------------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def build(
        cls, preset: str | Preset, *, seed: int | None = None, tokenizer: CLIPTokenizer | None = None
    ) -> LatentDiffusion:
        """Random weights for every part (tests, demos, benchmarks), in eval mode."""
        p = _ldm_preset(preset)
        spec = p.pipeline
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            unet = build(p)
            first_stage = build_autoencoder(spec.autoencoder)
            conditioner = build_conditioner(spec.conditioner, tokenizer) if spec.conditioner is not None else None
        scale = spec.scale_factor if spec.scale_factor is not None else 1.0
        return cls(unet, first_stage, conditioner, scale_factor=scale, preset=p).eval()

    @classmethod
    def from_pretrained(
        cls,
        preset_or_path: str | Preset | Path,
        path: str | Path | None = None,
        *,
        tokenizer: CLIPTokenizer | str | Path | None = "auto",
        ema: bool = True,
        trust_pickle: bool = False,
    ) -> LatentDiffusion:
        """Load every part from one CompVis checkpoint or one diffusers pipeline folder.

        Args:
            preset_or_path: a diffusers pipeline folder, whose architecture is read from its own
                ``unet/``, ``vae/``, ``text_encoder/`` ``config.json`` and ``scheduler/scheduler_config.json``
                (`cq.models.folder_config.preset_from_folder`); or the preset (``"sd-v1"``, ``"ldm-cin256-v2"``,
                ``"ldm-bedroom"``, ``"ldm-church"``...) of the checkpoint at ``path``.
            path: with a preset: a CompVis ``.ckpt`` / ``.safetensors`` holding ``model.diffusion_model.*``,
                ``first_stage_model.*`` and ``cond_stage_model.*`` (SD 1: CLIP ViT-L; SD 2: the OpenCLIP ViT-H
                tower), an sgm SDXL single file (``conditioner.embedders.{0,1}.*``: CLIP ViT-L and OpenCLIP
                ViT-bigG); or a diffusers folder with ``unet/``,
                ``vae/`` and (SD) ``text_encoder/``, ``tokenizer/``, which must describe the preset's
                architecture (a `ConfigError` names every differing field otherwise).
            tokenizer: SD's CLIP tokenizer: a `CLIPTokenizer`, a folder with ``vocab.json`` + ``merges.txt`` or
                ``tokenizer.json`` (transformers 5), or a ``bpe_simple_vocab_16e6.txt.gz``. ``"auto"`` (default):
                a diffusers folder's ``tokenizer/``; a text-conditioned model without one is refused here, at load
                time (CompVis checkpoints contain none: pass one). ``None``: no tokenizer, prompts must be given as
                token ids.
            ema: use the EMA weights when the checkpoint holds both.
            trust_pickle: allow arbitrary pickled objects (only for files you trust).
        """
        if path is None:
            if isinstance(preset_or_path, str | Path) and Path(preset_or_path).is_dir():
                path = Path(preset_or_path)
                p = preset_from_folder(path)
            else:
                raise ConfigError(
                    f"{str(preset_or_path)!r} is not a diffusers pipeline folder; a CompVis checkpoint holds no "
                    "architecture: pass its preset and the file, LatentDiffusion.from_pretrained(preset, path)"
                )
        else:
            p = _ldm_preset(preset_or_path if isinstance(preset_or_path, str | Preset) else str(preset_or_path))
            path = Path(path)
            if path.is_dir():
                _check_folder_matches(p, path)
        if not path.exists():
            raise CheckpointFormatError(f"checkpoint not found: {path}")
        auto = isinstance(tokenizer, str) and tokenizer == "auto"
        if isinstance(tokenizer, str | Path) and not auto:
            tokenizer = _read_tokenizer(Path(tokenizer))
        pipe = cls.build(p, tokenizer=None if auto else tokenizer)
        if path.is_dir():
            scale = _load_diffusers_pipeline(pipe, path)
        else:
            parts = split_ldm_checkpoint(read_state_dict(path, ema=ema, trust_pickle=trust_pickle), ema=ema)
            if not parts["unet"]:
                raise CheckpointFormatError(
                    f"{path} holds no model.diffusion_model.* keys: not a CompVis LDM/SD checkpoint "
                    "(a bare UNet loads with cq.models.load(preset, path=...))"
                )
            load_weights(pipe.unet, parts["unet"])
            _load_first_stage(pipe.first_stage, parts["first_stage"], source=path)
            _load_conditioner(pipe.conditioner, parts["cond_stage"], source=path)
            scale = parts["scale_factor"]
        scale = scale if scale is not None else p.pipeline.scale_factor
        if scale is None:
            raise CheckpointFormatError(
                f"preset {p.name!r} reads its latent scale_factor from the checkpoint, but {path} holds none"
            )
        pipe.scale_factor = float(scale)
        sdxl = isinstance(pipe.conditioner, SDXLConditioner)
        if sdxl and auto and None in (pipe.conditioner.tokenizer, pipe.conditioner.tokenizer_2):
            where = (
                f"{path} is an SDXL folder, but its tokenizer/ and tokenizer_2/ do not both hold a CLIP tokenizer "
                "(vocab.json + merges.txt or tokenizer.json)"
                if path.is_dir()
                else f"{path} is an sgm SDXL checkpoint, which contains no tokenizer"
            )
            raise ConfigError(
                f"{where}: pass tokenizer= (used for both encoders, each padded as the preset says), or "
                "tokenizer=None to give prompts as token ids"
            )
        if auto and isinstance(pipe.conditioner, TextConditioner) and pipe.conditioner.tokenizer is None:
            where = f"{path / 'tokenizer'} holds none" if path.is_dir() else "a CompVis checkpoint contains none"
            raise ConfigError(
                f"preset {p.name!r} is prompted through a CLIP tokenizer, but {where}: pass tokenizer= (a folder "
                "with vocab.json + merges.txt or tokenizer.json, a bpe_simple_vocab_16e6.txt.gz, or a "
                "CLIPTokenizer), or tokenizer=None to give prompts as token ids"
            )
        return pipe.eval()

    # ------------------------------------------------------------------------------------------------------------
    # Conditioning

    def condition(self, cond: Any) -> Tensor | None:
        """The UNet's ``cond`` for user conditioning: class labels, prompts (or token ids) or a ready context."""
        c = self.unet.config
        if c.context_dim is None and c.num_classes is None:
            if cond is not None:
                raise InputShapeError(f"preset {self._name} is unconditional: pass cond=None")
            return None
        if cond is None:
            raise InputShapeError(f"preset {self._name} is conditional: pass cond (labels or prompts)")
        if c.num_classes is not None:
            return torch.as_tensor(cond, dtype=torch.long)
        if isinstance(cond, Tensor) and torch.is_floating_point(cond):
            return cond  # a ready context [B, L, D]
        if self.conditioner is None:
            raise ConfigError(f"preset {self._name} needs a conditioner to turn {type(cond).__name__} into a context")
        if isinstance(self.conditioner, SDXLConditioner):
            return self.unet.pack_cond(*self.conditioner(cond))
        return self.conditioner(cond)

    def unconditional(self, batch: int) -> Tensor:
        """The ``cond`` of the unconditional branch of classifier-free guidance (batch 1 is broadcast)."""
        if isinstance(self.conditioner, SDXLConditioner):
            return self.unet.pack_cond(*self.conditioner.unconditional(batch))
        if not isinstance(self.conditioner, ClassEmbedder | TextConditioner):
            raise ConfigError(f"preset {self._name} has no unconditional branch for classifier-free guidance")
        return self.conditioner.unconditional(batch)

    def denoiser(
        self, cond: Tensor | None, *, guidance_scale: float = 1.0, model: nn.Module | None = None
    ) -> nn.Module:
        """The sampler-facing model: ``model`` (default `FullPrecision(self.unet)`), guided when the scale != 1."""
        model = FullPrecision(self.unet) if model is None else model
        if guidance_scale == 1.0 or cond is None:
            return model
        return ClassifierFreeGuidance(model, guidance_scale, self.unconditional(1))

    # ------------------------------------------------------------------------------------------------------------
    # Sampling

    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        *,
        cond: Any = None,
        noise: Tensor | None = None,
        seed: int = 0,
        guidance_scale: float | None = None,
        steps: int | None = None,
        sampler: str | Callable[..., Tensor] | None = None,
        eta: float | None = None,
        model: nn.Module | None = None,
        decode: bool = True,
        callback: Callable[[StepInfo], None] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Sample latents and (by default) decode them; images are about [-1, 1] (``(x.clamp(-1, 1) + 1) / 2``
        gives [0, 1]).

        Args:
            num_samples: batch size (default: the length of ``cond`` or of ``noise``).
            cond: class labels ``[B]``, prompts, token ids ``[B, 77]`` or a ready context; None if unconditional.
            noise: initial latents ``x_T``; default standard normal, row ``i`` seeded with ``seed + i``.
            guidance_scale, steps, sampler, eta: default to the preset's (``sampler`` "ddim" | "plms" | a
                callable with the cq sampler signature).
            model: the denoiser to sample with, e.g. a `CompressedUNet` around ``self.unet``; guidance wraps it.
            decode: return images (True) or latents ``z`` (False; divide by ``scale_factor`` to decode).
        """
        from ..sampling.seeded import seeded_noise

        p = self.preset
        spec = p.pipeline if p is not None else None
        defaults = p.sampling if p is not None else {}
        steps = steps or defaults.get("steps", 50)
        eta = defaults.get("eta", 0.0) if eta is None else eta
        spacing = defaults.get("spacing", "ldm")
        if guidance_scale is None:
            guidance_scale = spec.guidance_scale if spec is not None else 1.0
        sampler = sampler or (spec.sampler if spec is not None else "ddim")
        if isinstance(sampler, str):
            if sampler not in SAMPLERS:
                raise ConfigError(f"unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
            sampler = SAMPLERS[sampler]
        if isinstance(cond, str):
            cond = [cond]
        if num_samples is None:
            num_samples = noise.shape[0] if noise is not None else len(cond) if cond is not None else 1
        device = next(self.unet.parameters()).device
        if noise is None:
            noise = seeded_noise(self.unet.sample_shape, range(seed, seed + num_samples))
        x = noise.to(device)
        unet_cond = self.condition(cond)
        if unet_cond is not None:
            unet_cond = unet_cond.to(device)
            if unet_cond.shape[0] != x.shape[0]:
                raise InputShapeError(f"cond has batch {unet_cond.shape[0]} but {x.shape[0]} samples are drawn")
        denoiser = self.denoiser(unet_cond, guidance_scale=guidance_scale, model=model)
        z = sampler(
            denoiser,
            x,
            steps=steps,
            cond=unet_cond,
            eta=eta,
            spacing=spacing,
            noise=self.unet.noise_schedule,
            callback=callback,
            generator=generator,
            progress=progress,
        )
        return self.decode(z) if decode else z

    def decode(self, z: Tensor) -> Tensor:
        """Images of latents ``z`` (``first_stage.decode(z / scale_factor)``; VQ decoding quantizes)."""
        return self.first_stage.decode(z / self.scale_factor)

    def encode(self, images: Tensor) -> Tensor:
        """Latents ``z`` of images in [-1, 1] (the posterior mean for KL), scaled by ``scale_factor``."""
        return self.first_stage.encode(images) * self.scale_factor

    @property
    def _name(self) -> str:
        return repr(self.preset.name) if self.preset is not None else "(custom)"


# ----------------------------------------------------------------------------------------------------------------
# Loading helpers


def _ldm_preset(preset: str | Preset) -> Preset:
    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.pipeline is None:
        if p.family == "ldm":
            raise ConfigError(
                f"preset {p.name!r} describes a UNet only (cq has no autoencoder / conditioner for it): load the "
                f"UNet with cq.models.load({p.name!r}, path=...), or a diffusers folder by its own configs with "
                "LatentDiffusion.from_pretrained(folder)"
            )
        raise ConfigError(f"preset {p.name!r} is not a latent-diffusion preset (family {p.family!r})")
    return p


def _check_folder_matches(preset: Preset, folder: Path) -> None:
    """Refuse a diffusers folder whose own configs describe another architecture than ``preset``."""
    found = preset_from_folder(folder)
    stated_noise = diffusers_noise_schedule(folder / "unet") is not None
    differences = preset_differences(preset, found, noise=stated_noise)
    if differences:
        raise ConfigError(
            f"{folder} does not hold preset {preset.name!r}: its configs differ in " + "; ".join(differences) + ". "
            f"Load it by its own configs with LatentDiffusion.from_pretrained({str(folder)!r}), or name the "
            "preset it holds"
        )


def _read_tokenizer(path: Path) -> CLIPTokenizer:
    if path.suffix == ".gz":
        return CLIPTokenizer.from_bpe_gz(path)
    return CLIPTokenizer.from_folder(path)


def _load_first_stage(first_stage: nn.Module, state: dict[str, Tensor], *, source: Any) -> None:
    if not state:
        raise CheckpointFormatError(f"{source} holds no first_stage_model.* keys (the autoencoder)")
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # training-only discriminator/LPIPS
    if any(".down_blocks." in k or ".up_blocks." in k for k in state):
        c = first_stage.config
        state = autoencoder_from_diffusers(state, len(c.ch_mult), c.num_res_blocks)
    load_weights(first_stage, state)


def _load_conditioner(conditioner: nn.Module | None, state: dict[str, Tensor], *, source: Any) -> None:
    """The conditioner's weights from a CompVis / sgm checkpoint's cond stage (prefix removed): a CLIP text encoder
    (SD 1), an OpenCLIP text tower (SD 2: ``model.*``), a class embedding (LDM), or SDXL's two embedders
    (``embedders.0.transformer.*`` CLIP ViT-L, ``embedders.1.model.*`` OpenCLIP ViT-bigG)."""
    if conditioner is None:
        return
    if not state:
        raise CheckpointFormatError(
            f"{source} holds no cond_stage_model.* or conditioner.* keys (the conditioner / text encoder)"
        )
    if isinstance(conditioner, SDXLConditioner):
        _load_sdxl_embedders(conditioner, state, source=source)
    elif isinstance(conditioner, TextConditioner):
        _load_text_tower(conditioner.transformer, state, source=source, penultimate=True)
    elif isinstance(conditioner, ClassEmbedder):
        load_weights(conditioner, state)


def _load_text_tower(model: CLIPTextModel, state: dict[str, Tensor], *, source: Any, penultimate: bool) -> None:
    """A CLIP text encoder in transformers / SD 1 keys, or an OpenCLIP text tower. ``penultimate``: the model
    stands for the tower without its last block (SD 2 ``FrozenOpenCLIPEmbedder(layer="penultimate")``: the
    penultimate block's output through ``ln_final``), so the checkpoint must hold exactly one block more."""
    if not is_open_clip_text(state):
        load_weights(model, clip_text_state(state))
        return
    found, layers = open_clip_num_layers(state), model.config.num_hidden_layers
    expected = layers + 1 if penultimate else layers
    if found != expected:
        use = "its penultimate block's output (SD 2)" if penultimate else "every block"
        raise CheckpointFormatError(
            f"{source} holds an OpenCLIP text tower of {found} blocks; the preset's text encoder has {layers} "
            f"layers and reads {use}, so it needs {expected}: is this the right preset?"
        )
    load_weights(model, open_clip_text_state(state, num_layers=layers, with_projection=not penultimate))


def _load_sdxl_embedders(conditioner: SDXLConditioner, state: dict[str, Tensor], *, source: Any) -> None:
    """sgm ``GeneralConditioner`` keys: embedder 0 is CLIP ViT-L (transformers 4 keys under ``transformer.``),
    embedder 1 OpenCLIP ViT-bigG (``model.*``, every block plus ``text_projection``); the size/crop embedders
    have no weights."""
    parts: dict[str, dict[str, Tensor]] = {"0": {}, "1": {}}
    other = []
    for key, value in state.items():
        index, _, rest = key.removeprefix("embedders.").partition(".")
        if key.startswith("embedders.") and index in parts:
            parts[index][rest] = value
        else:
            other.append(key)
    if other or not all(parts.values()):
        raise CheckpointFormatError(
            f"{source} is not an sgm SDXL checkpoint: expected conditioner.embedders.0.* (CLIP ViT-L) and "
            f"conditioner.embedders.1.* (OpenCLIP ViT-bigG) keys"
            + (f", found also {other[:5]}" if other else f", found {sorted(state)[:5]}")
        )
    _load_text_tower(conditioner.transformer, parts["0"], source=source, penultimate=False)
    if not is_open_clip_text(parts["1"]):
        raise CheckpointFormatError(f"{source}: conditioner.embedders.1.* is not an OpenCLIP text tower (model.*)")
    _load_text_tower(conditioner.transformer_2, parts["1"], source=source, penultimate=False)


def _load_diffusers_pipeline(pipe: LatentDiffusion, folder: Path) -> float | None:
    """Fill ``pipe`` from a diffusers pipeline folder; returns the VAE's ``scaling_factor`` if it states one."""
    for part in ("unet", "vae"):
        if not (folder / part).is_dir():
            raise CheckpointFormatError(f"{folder} is not a diffusers pipeline folder: no {part}/ sub-folder")
    unet_state, _ = read_diffusers_folder(folder / "unet")
    load_weights(pipe.unet, unet_state, format="diffusers")
    vae_state, vae_config = read_diffusers_folder(folder / "vae")
    c = pipe.first_stage.config
    load_weights(pipe.first_stage, autoencoder_from_diffusers(vae_state, len(c.ch_mult), c.num_res_blocks))
    conditioner = pipe.conditioner
    if isinstance(conditioner, TextConditioner | SDXLConditioner):
        _load_text_encoder(conditioner.transformer, folder / "text_encoder")
        if conditioner.tokenizer is None and CLIPTokenizer.in_folder(folder / "tokenizer"):
            conditioner.tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer")
    if isinstance(conditioner, SDXLConditioner):
        _load_text_encoder(conditioner.transformer_2, folder / "text_encoder_2")
        if conditioner.tokenizer_2 is None and CLIPTokenizer.in_folder(folder / "tokenizer_2"):
            conditioner.tokenizer_2 = CLIPTokenizer.from_folder(folder / "tokenizer_2")
    elif conditioner is not None and not isinstance(conditioner, TextConditioner):
        raise ConfigError(f"a diffusers folder carries no {type(conditioner).__name__}; use a CompVis checkpoint")
    return vae_config.get("scaling_factor")


def _load_text_encoder(model: nn.Module, encoder: Path) -> None:
    """Weights of a transformers CLIP text encoder folder (``config.json`` must describe ``model``'s config)."""
    weights = next((encoder / n for n in ("model.safetensors", "pytorch_model.bin") if (encoder / n).exists()), None)
    if weights is None:
        raise CheckpointFormatError(f"{encoder} holds no model.safetensors or pytorch_model.bin")
    config_file = encoder / "config.json"
    if config_file.exists():
        with_projection = model.config.projection_dim is not None
        found = CLIPTextConfig.from_transformers(json.loads(config_file.read_text()), with_projection=with_projection)
        if found != model.config:
            raise ConfigError(f"{config_file} describes {found}, the preset expects {model.config}")
        model.config = found  # equal up to eos_token_id, which the pooled output follows
    load_weights(model, clip_text_state(read_state_dict(weights)))
