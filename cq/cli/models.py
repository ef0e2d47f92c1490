"""What the ``cq`` commands load and condition on: the base model (a preset with embedded weights, a preset and its
checkpoint, a diffusers folder; latent models as a whole `LatentDiffusion` pipeline), prompts or class labels,
the guidance scale and the device. Every misuse is a `ConfigError` naming the option and the fix, which the CLI
prints as one line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..core.unet import CacheableUNet
from ..errors import ConfigError
from ..models.loading import load
from ..models.openai_unet import LDMUNet
from ..models.pipelines import LatentDiffusion
from ..models.presets import PRESETS, get_preset, sampling_defaults


__all__ = ["Base", "Conditions", "Conditioning", "load_base", "base_of_artifact", "read_conditions", "device_of"]

_FIX_TEXT = "pass --prompt TEXT (repeatable) or --prompts FILE (one prompt per line)"
_FIX_LABELS = "pass --class-labels 1,2,3 (or a file of labels)"


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
        from ..models.conditioners import ClassEmbedder, SDXLConditioner, TextConditioner

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


# ----------------------------------------------------------------------------------------------------------------
# Conditioning


@dataclass(frozen=True)
class Conditions:
    """What the command line conditions on: prompts or class labels (at most one kind), cycled over samples."""

    prompts: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.prompts or self.labels)

    def options(self) -> str:
        return "--prompt/--prompts" if self.prompts else "--class-labels"


def read_conditions(
    prompts: Sequence[str] = (), prompt_file: str | None = None, labels: str | None = None
) -> Conditions:
    """``--prompt`` (repeatable), ``--prompts FILE`` (one per line, blank lines skipped) and ``--class-labels``
    (``1,2,3`` or a file of labels separated by commas, spaces or newlines)."""
    texts = list(prompts)
    if prompt_file is not None:
        try:
            lines = Path(prompt_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"--prompts {prompt_file}: cannot read it ({type(e).__name__}: {e}); give a UTF-8 text file with one "
                "prompt per line"
            ) from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise ConfigError(f"--prompts {prompt_file} holds no prompt; write one prompt per line")
        texts += from_file
    if any(not t.strip() for t in texts):
        raise ConfigError("--prompt got an empty prompt; give the text to condition on, e.g. --prompt 'a red car'")
    parsed: list[int] = []
    if labels is not None:
        parsed = _parse_labels(labels)
    if texts and parsed:
        raise ConfigError("give prompts (--prompt/--prompts) or class labels (--class-labels), not both")
    return Conditions(tuple(texts), tuple(parsed))


def _parse_labels(text: str) -> list[int]:
    source, body = "--class-labels", text
    if not _looks_like_labels(text):
        path = Path(text)
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"--class-labels {text}: neither a comma-separated list of integers (e.g. 1,2,3) nor a readable "
                f"file of labels ({type(e).__name__})"
            ) from None
        source = f"--class-labels {text}"
    items = [item for item in body.replace(",", " ").split() if item]
    bad = [item for item in items if not item.lstrip("-").isdigit()]
    if bad or not items:
        raise ConfigError(
            f"{source}: expected integer class labels separated by commas, spaces or newlines, got {bad[:3] or 'none'}"
        )
    return [int(item) for item in items]


def _looks_like_labels(text: str) -> bool:
    return all(part.strip().lstrip("-").isdigit() for part in text.split(","))


@dataclass
class Conditioning:
    """The conditioning of ``n`` samples: the UNet's ``cond`` (``[n, ...]`` on CPU, None if unconditional), the
    guidance ``scale`` and its unconditional ``uncond`` (None when the scale is 1), and what each sample was
    conditioned on (prompts or labels, for saving beside the images)."""

    cond: Tensor | None
    scale: float
    uncond: Tensor | None
    per_sample: list = field(default_factory=list)

    def describe(self) -> str:
        if self.cond is None:
            return "unconditional"
        kinds = sorted({str(v) for v in self.per_sample})
        shown = ", ".join(repr(k) for k in kinds[:3]) + (", ..." if len(kinds) > 3 else "")
        guided = f"guidance {self.scale:g} (pooled [uncond; cond] rows)" if self.uncond is not None else "no guidance"
        return f"{len(kinds)} condition(s) cycled over {len(self.per_sample)} samples ({shown}), {guided}"


@torch.no_grad()
def conditioning(base: Base, conditions: Conditions, n: int, guidance: float | None) -> Conditioning:
    """``n`` samples' conditioning for ``base``: its kind of conditions (prompts for text models, labels for
    label models, none otherwise) cycled over the samples, and the guidance (default: the preset's)."""
    kind = base.kind
    if guidance is not None and not math.isfinite(guidance):
        raise ConfigError(f"--guidance must be a finite number, got {guidance}")
    if kind == "unet-only":
        raise ConfigError(
            f"{base.name} is conditional, but only its UNet is loaded (no text encoder or class embedder "
            "here): give the diffusers folder of the whole pipeline (unet/, vae/, text_encoder/, tokenizer/) as "
            "--model, or a latent preset with a pipeline and its checkpoint"
        )
    if kind == "none":
        if conditions:
            raise ConfigError(f"{base.name} is an unconditional model: drop {conditions.options()}")
        if guidance is not None and guidance != 1.0:
            raise ConfigError(f"{base.name} is an unconditional model: --guidance does not apply, drop it")
        return Conditioning(None, 1.0, None, [None] * n)
    if kind == "text" and not conditions.prompts:
        got = " (class labels are for label models)" if conditions.labels else ""
        raise ConfigError(f"{base.name} is text-conditioned: {_FIX_TEXT}{got}")
    if kind == "label":
        if not conditions.labels:
            got = " (prompts are for text models)" if conditions.prompts else ""
            raise ConfigError(f"{base.name} is class-conditional: {_FIX_LABELS}{got}")
        classes, uncond_class = base.label_range()
        bad = [v for v in conditions.labels if not 0 <= v < classes or v == uncond_class]
        if bad:
            last = classes - 1 if uncond_class != classes - 1 else classes - 2
            extra = f" ({uncond_class} is the unconditional class)" if uncond_class is not None else ""
            raise ConfigError(f"--class-labels: {bad[:5]} out of range; {base.name} has classes 0..{last}{extra}")
    values = list(conditions.prompts or conditions.labels)
    scale = base.default_guidance if guidance is None else float(guidance)
    unique = list(dict.fromkeys(values))
    encoded = base.pipe.condition(unique if kind == "text" else torch.tensor(unique)).cpu()
    index = torch.tensor([unique.index(values[i % len(values)]) for i in range(n)])
    uncond = None
    if scale != 1.0:
        uncond = base.pipe.unconditional(1).cpu()
    return Conditioning(encoded[index], scale, uncond, [values[i % len(values)] for i in range(n)])


# ----------------------------------------------------------------------------------------------------------------
# Device


def device_of(text: str) -> torch.device:
    """``--device``: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ... , refused unless torch can use it here."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise ConfigError("--device meta holds no data; use cpu, cuda, cuda:N or mps")
    if device.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, device.type, None)
        is_available = getattr(backend, "is_available", None)
        available = bool(is_available()) if callable(is_available) else False
        count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    if not available:
        raise ConfigError(f"--device {text}: torch finds no {device.type} device here; use --device cpu")
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {text}: there are {count} {device.type} device(s) here (0..{count - 1})")
    return device


_LATENT_NOTE = "latent model: SQNR and PSNR are over the latents x0, before the first stage decodes them"


def _default_batch(unet) -> int:
    """Trajectories sampled together by default: 8 for latent UNets (SD's attention at 64x64 is large), else 64."""
    from ..models.openai_unet import LDMUNet

    return 8 if isinstance(unet, LDMUNet) else 64


def _base_for(model, args: argparse.Namespace, *, required: bool):
    """The full-precision base of a loaded model from ``--model`` / ``--weights`` (checked against the weights
    fingerprint the model was fitted on), or None when neither is given and ``required`` is False."""
    from ..errors import ConfigError
    from ..io import fingerprint
    from .models import base_of_artifact

    base = None
    if required or args.model or args.weights:
        base = base_of_artifact(model.unet, args.path, args.model, args.weights, args.tokenizer)
    if base is None:
        if required:
            raise ConfigError(
                f"{args.path} needs its base model here (to condition and decode): pass --weights, the checkpoint "
                "file or diffusers folder it was fitted from (and --model PRESET for a checkpoint file)"
            )
        return None
    if model.base_fingerprint and fingerprint(base.unet) != model.base_fingerprint:
        raise ConfigError(
            f"{args.path} was fitted on other weights than {args.weights or args.model} (weights fingerprint "
            "differs); pass the checkpoint it was fitted from"
        )
    return base


def _refuse_conditions(args: argparse.Namespace, conditions) -> None:
    """A pixel-space (DDPM) model is unconditional: prompts, labels and guidance are misuse."""
    from ..errors import ConfigError

    if conditions:
        raise ConfigError(f"{args.path} is an unconditional model: drop {conditions.options()}")
    if args.guidance is not None and args.guidance != 1.0:
        raise ConfigError(f"{args.path} is an unconditional model: --guidance does not apply, drop it")


def _guidance(args: argparse.Namespace, model) -> float | None:
    """``--guidance``, else the scale the model was calibrated with (None: the preset's)."""
    if args.guidance is None:
        return model.calibration_guidance
    fitted = model.calibration_guidance
    if fitted is not None and fitted != args.guidance:
        print(f"note: {args.path} was calibrated with guidance {fitted:g}; sampling with {args.guidance:g}")
    return args.guidance


def _fitted_sampler(model, spacing: str | None):
    """``(sampler, steps, kwargs)`` a loaded model must be sampled with: its recorded `SamplerSettings`
    (``--spacing`` other than the fitted one is refused by the sampler), else, for files written before those
    were recorded, DDIM with the preset's defaults."""
    from ..sampling import ddim, sampler_of

    settings = model.sampler_settings
    if settings is None:
        steps, kwargs = sampling_defaults(model.unet, model.num_steps, spacing)
        return ddim, steps, kwargs
    kwargs = settings.call_kwargs()
    if spacing is not None:
        kwargs["spacing"] = spacing
    return sampler_of(settings), kwargs.pop("steps"), kwargs
