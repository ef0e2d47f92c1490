"""What the ``cq`` commands load and condition on, from their options: the base model (`cq.models.base`), the
prompts or class labels (`cq.models.conditioning`), the guidance scale and the device (`device_of`). Every misuse is
a `ConfigError` naming the option and the fix, which the CLI prints as one line."""

from __future__ import annotations

import argparse

import torch

from ..errors import ConfigError
from ..models.base import Base, base_for, base_of_artifact, load_base
from ..models.conditioning import Conditioning, Conditions, conditioning, read_conditions, refuse_conditions


__all__ = [
    "Base",
    "Conditions",
    "Conditioning",
    "load_base",
    "base_of_artifact",
    "read_conditions",
    "conditioning",
    "device_of",
]

_LATENT_NOTE = "latent model: SQNR and PSNR are over the latents x0, before the first stage decodes them"


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


def _base_for(model, args: argparse.Namespace, *, required: bool) -> Base | None:
    """`cq.models.base.base_for` of ``args.path`` from ``--model`` / ``--weights`` / ``--tokenizer``."""
    return base_for(
        model, args.path, model=args.model, weights=args.weights, tokenizer=args.tokenizer, required=required
    )


def _refuse_conditions(args: argparse.Namespace, conditions: Conditions) -> None:
    refuse_conditions(args.path, conditions, args.guidance)


def _note_guidance(args: argparse.Namespace, model) -> None:
    """Say so when ``--guidance`` differs from the scale the model was calibrated with."""
    fitted = model.calibration_guidance
    if args.guidance is not None and fitted is not None and fitted != args.guidance:
        print(f"note: {args.path} was calibrated with guidance {fitted:g}; sampling with {args.guidance:g}")
