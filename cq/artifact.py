"""Saving and loading fitted `CompressedUNet` models: one safetensors file, the recipe in its metadata.

Metadata (all strings): ``cq_format`` (version), ``recipe`` (the fitted recipe as JSON, schedule included),
``model`` (how to build the base UNet: family, config, noise schedule, preset), ``num_steps``, ``fingerprint``
(SHA-256 of the full-precision base weights the recipe was fitted on) and ``checksum`` (SHA-256 of every saved
tensor, verified on load). Tensors: the model's ``state_dict()`` -- quantized weights as integers plus scales,
per-step activation tables, corrections. Written atomically (temp file + rename). Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .compressed import CompressedUNet
from .errors import CheckpointFormatError, ConfigError, StepCountMismatchError
from .io import save_safetensors
from .models.loading import build_from_description, describe_model
from .registry import from_dict, to_dict


__all__ = ["save", "load", "fingerprint", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def fingerprint(unet: nn.Module) -> str:
    """SHA-256 over a model's state dict (sorted keys, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for key, value in sorted(unet.state_dict().items()):
        _hash_tensor(h, key, value)
    return h.hexdigest()


def _checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key, value in sorted(tensors.items()):
        _hash_tensor(h, key, value)
    return h.hexdigest()


def _hash_tensor(h: Any, key: str, value: Tensor) -> None:
    value = value.detach().cpu().contiguous()
    h.update(f"{key}|{tuple(value.shape)}|{value.dtype}|".encode())
    h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")


def save(model: CompressedUNet, path: str | Path) -> Path:
    """Write ``model`` (fitted by `Recipe.fit`) to ``path``."""
    recipe = getattr(model, "recipe", None)
    if recipe is None:
        raise ConfigError("only models fitted by Recipe.fit can be saved (they carry their recipe)")
    tensors = {k: v for k, v in model.state_dict().items()}
    metadata = {
        "cq_format": str(FORMAT_VERSION),
        "recipe": json.dumps(to_dict(recipe)),
        "model": json.dumps(describe_model(model.unet)),
        "num_steps": str(model.num_steps),
        "fingerprint": getattr(model, "base_fingerprint", ""),
        "checksum": _checksum(tensors),
    }
    path = Path(path)
    save_safetensors(tensors, path, metadata=metadata)
    return path


def load(path: str | Path, *, unet: nn.Module | None = None, num_steps: int | None = None) -> CompressedUNet:
    """Rebuild a saved model.

    Args:
        path: a file written by `save` / `CompressedUNet.save`.
        unet: optionally, the full-precision UNet you expect the file was fitted on; a different one raises.
        num_steps: optionally, the step count you will sample with; a different one raises.

    Raises:
        CheckpointFormatError: not a cq file, a newer format, or a checksum mismatch (corrupted file).
        ConfigError: fitted on another base model than ``unet``.
        StepCountMismatchError: fitted for another step count than ``num_steps``.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointFormatError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (SafetensorError, OSError) as e:
        raise CheckpointFormatError(f"{path} is not a readable cq file ({e})") from None
    if "cq_format" not in metadata:
        raise CheckpointFormatError(f"{path} is a safetensors file but not a saved cq model (no cq metadata)")
    if int(metadata["cq_format"]) > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path} uses cq format {metadata['cq_format']}; this cq reads <= {FORMAT_VERSION}"
        )
    if _checksum(tensors) != metadata.get("checksum"):
        raise CheckpointFormatError(f"{path}: checksum mismatch, the file is corrupted")
    steps = int(metadata["num_steps"])
    if num_steps is not None and num_steps != steps:
        raise StepCountMismatchError(f"{path} was fitted for {steps} sampling steps, not {num_steps}; refit it")
    if unet is not None and metadata.get("fingerprint") and fingerprint(unet) != metadata["fingerprint"]:
        raise ConfigError(f"{path} was fitted on another base model than the one given (weights fingerprint differs)")
    base = build_from_description(json.loads(metadata["model"]))
    recipe = from_dict(json.loads(metadata["recipe"]))
    model = recipe.build(base, steps)
    model.load_state_dict(tensors, strict=True)
    model.base_fingerprint = metadata.get("fingerprint", "")
    return model.eval()
