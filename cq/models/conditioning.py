"""What samples are conditioned on: prompts or class labels (`Conditions`, `read_conditions`), cycled over the
samples and encoded by the base model's conditioner (`conditioning`), with the classifier-free guidance scale.
Misuse is a `ConfigError` naming the ``cq`` option (``--prompt`` / ``--class-labels`` / ``--guidance``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Base


__all__ = ["Conditions", "read_conditions", "Conditioning", "conditioning", "refuse_conditions", "fitted_guidance"]

_FIX_TEXT = "pass --prompt TEXT (repeatable) or --prompts FILE (one prompt per line)"
_FIX_LABELS = "pass --class-labels 1,2,3 (or a file of labels)"


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


def refuse_conditions(name: str, conditions: Conditions, guidance: float | None) -> None:
    """A pixel-space (DDPM) model ``name`` is unconditional: prompts, labels and guidance are misuse."""
    if conditions:
        raise ConfigError(f"{name} is an unconditional model: drop {conditions.options()}")
    if guidance is not None and guidance != 1.0:
        raise ConfigError(f"{name} is an unconditional model: --guidance does not apply, drop it")


def fitted_guidance(model, guidance: float | None) -> float | None:
    """``guidance``, else the scale the `CompressedUNet` ``model`` was calibrated with (None: the preset's)."""
    return model.calibration_guidance if guidance is None else guidance
