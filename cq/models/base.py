"""The full-precision base model that compressed models are fitted on and compared with: a preset with embedded
weights, a preset and its checkpoint, or a diffusers folder; latent models load as a whole `LatentDiffusion`
pipeline. Misuse is a `ConfigError` naming the ``cq`` option (``--model`` / ``--weights``) and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.unet import CacheableUNet
from ..errors import ConfigError
from .loading import load
from .openai_unet import LDMUNet
from .pipelines import LatentDiffusion
from .presets import PRESETS, get_preset


__all__ = ["Base", "load_base", "base_of_artifact", "base_for", "default_batch"]


@dataclass
class Base:
    """The full-precision model a command works on: ``unet``, and for latent models with their first stage and
    conditioner, the ``pipe`` around it (None for pixel-space UNets and UNet-only loads)."""

    unet: CacheableUNet
    pipe: LatentDiffusion | None
    name: str  # what the command line named, for messages

    @property
    def kind(self) -> str:
        """``"text"`` (prompts), ``"label"`` (class labels) or ``"none"`` (unconditional)."""
        from .conditioners import ClassEmbedder, SDXLConditioner, TextConditioner

        conditioner = self.pipe.conditioner if self.pipe is not None else None
        if isinstance(conditioner, TextConditioner | SDXLConditioner):
            return "text"
        if isinstance(conditioner, ClassEmbedder):
            return "label"
        config = self.unet.config
        if isinstance(self.unet, LDMUNet) and config.num_classes is not None:
            return "label" if self.pipe is not None else "unet-only"
        if isinstance(self.unet, LDMUNet) and config.context_dim is not None:
            return "unet-only"  # conditional, but nothing here turns prompts or labels into its context
        return "none"

    @property
    def default_guidance(self) -> float:
        """The preset's guidance scale (SD 7.5, LDM-ImageNet 1.5); 1 for unconditional models."""
        spec = self.pipe.preset.pipeline if self.pipe is not None and self.pipe.preset is not None else None
        return spec.guidance_scale if spec is not None and self.kind != "none" else 1.0

    @property
    def default_sampler(self) -> str:
        """The preset's sampler (SD: ``"plms"``), else ``"ddim"``."""
        spec = self.pipe.preset.pipeline if self.pipe is not None and self.pipe.preset is not None else None
        return spec.sampler if spec is not None else "ddim"

    def to(self, device: torch.device) -> Base:
        (self.pipe if self.pipe is not None else self.unet).to(device)
        return self

    def label_range(self) -> tuple[int, int | None]:
        """``(number of classes, the unconditional class or None)`` of a label model."""
        conditioner = self.pipe.conditioner if self.pipe is not None else None
        if conditioner is not None:
            return conditioner.embedding.num_embeddings, conditioner.uncond_class
        return self.unet.config.num_classes, None


def _is_pipeline_folder(path: Path) -> bool:
    return path.is_dir() and (path / "unet").is_dir() and (path / "vae").is_dir()


def load_base(model: str, weights: str | None = None, *, tokenizer: str | None = None) -> Base:
    """The base model of ``--model`` (a preset or a diffusers folder) and ``--weights`` (its checkpoint file or
    diffusers folder). Latent presets with a pipeline and diffusers pipeline folders load whole (UNet, first stage,
    conditioner); ``tokenizer`` is the CLIP tokenizer a CompVis SD checkpoint lacks."""
    if weights is not None and not Path(weights).exists():
        raise ConfigError(f"--weights {weights}: no such file or folder")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ConfigError(f"--tokenizer {tokenizer}: no such file or folder")
    if model in PRESETS:
        return _load_preset(model, weights, tokenizer)
    path = Path(model)
    if path.is_dir():
        if weights is not None:
            raise ConfigError(
                f"--model {model} is a folder holding its own weights; drop --weights, or name the preset it "
                f"holds: --model <preset> --weights {model}"
            )
        if _is_pipeline_folder(path):
            pipe = LatentDiffusion.from_pretrained(path, tokenizer=tokenizer or "auto").eval()
            return Base(pipe.unet, pipe, model)
        return Base(load(path), None, model)
    if path.exists():
        raise ConfigError(f"--model {model} is a file; name the preset it holds: --model <preset> --weights {model}")
    raise ConfigError(
        f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a diffusers folder; for a "
        "checkpoint file pass --model <preset> --weights FILE"
    )


def _load_preset(name: str, weights: str | None, tokenizer: str | None) -> Base:
    preset = get_preset(name)
    if weights is None and preset.embedded is None:
        raise ConfigError(
            f"--model {name} ships no weights: pass --weights with its checkpoint file or diffusers folder "
            f"({preset.source})"
        )
    if preset.pipeline is None:
        return Base(load(name, path=weights), None, name)
    conditioner = preset.pipeline.conditioner
    is_text = conditioner is not None and conditioner.kind == "clip_text"
    if is_text and tokenizer is None and not Path(weights).is_dir():
        raise ConfigError(
            f"--model {name} --weights {weights}: a CompVis checkpoint holds no CLIP tokenizer; pass --tokenizer "
            "(the tokenizer/ folder of a diffusers SD pipeline, with vocab.json + merges.txt, or "
            "bpe_simple_vocab_16e6.txt.gz), or give a diffusers pipeline folder as --weights"
        )
    pipe = LatentDiffusion.from_pretrained(name, weights, tokenizer=tokenizer or "auto").eval()
    return Base(pipe.unet, pipe, name)


def base_of_artifact(
    unet: CacheableUNet, path: str, model: str | None, weights: str | None, tokenizer: str | None
) -> Base | None:
    """The base model a saved file at ``path`` (whose UNet is ``unet``) was fitted on: ``--model`` /
    ``--weights`` as given; else the preset the file names (with ``--weights``, or its embedded weights); else a
    diffusers folder given as ``--weights``. None when nothing names one and the preset ships no weights."""
    if model is not None:
        return load_base(model, weights, tokenizer=tokenizer)
    preset = unet.preset
    named = preset.name if preset is not None and PRESETS.get(preset.name) == preset else None
    if weights is not None and named is None:
        if Path(weights).is_dir():
            return load_base(weights, None, tokenizer=tokenizer)
        raise ConfigError(
            f"{path} was fitted on a model that is not a preset (a diffusers folder?): pass that folder as "
            f"--weights, or --model <preset> --weights {weights}"
        )
    if named is None:
        return None
    if weights is None and get_preset(named).embedded is None:
        return None
    return load_base(named, weights, tokenizer=tokenizer)


def base_for(
    compressed,
    path: str,
    *,
    model: str | None = None,
    weights: str | None = None,
    tokenizer: str | None = None,
    required: bool = False,
) -> Base | None:
    """The base of the `CompressedUNet` saved at ``path`` from ``model`` / ``weights`` (`base_of_artifact`),
    checked against the weights fingerprint it was fitted on; None when neither is given and not ``required``."""
    from ..io import fingerprint

    base = None
    if required or model or weights:
        base = base_of_artifact(compressed.unet, path, model, weights, tokenizer)
    if base is None:
        if required:
            raise ConfigError(
                f"{path} needs its base model here (to condition and decode): pass --weights, the checkpoint "
                "file or diffusers folder it was fitted from (and --model PRESET for a checkpoint file)"
            )
        return None
    if compressed.base_fingerprint and fingerprint(base.unet) != compressed.base_fingerprint:
        raise ConfigError(
            f"{path} was fitted on other weights than {weights or model} (weights fingerprint "
            "differs); pass the checkpoint it was fitted from"
        )
    return base


def default_batch(unet) -> int:
    """Trajectories sampled together by default: 8 for latent UNets (SD's attention at 64x64 is large), else 64."""
    return 8 if isinstance(unet, LDMUNet) else 64
