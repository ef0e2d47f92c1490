"""Saving and loading fitted `CompressedUNet` models: one safetensors file, the recipe in its metadata.

Metadata (all strings): ``cq_format`` (version), ``recipe`` (the fitted recipe as JSON, schedule included),
``model`` (how to build the base UNet: family, config, noise schedule, preset), ``num_steps``, ``fingerprint``
(SHA-256 of the full-precision base weights the recipe was fitted on), ``calibration_seeds``, ``sampler`` (the
`SamplerSettings` it must be sampled with; absent in files written before them), ``guidance_scale`` (the
classifier-free guidance of the calibration trace; absent before it was saved) and ``checksum``:
SHA-256 of every saved tensor *and* every other metadata field (format 2; format 1 covered the tensors only
and still loads), verified on load, so a flipped bit anywhere is refused. Tensors: the model's
``state_dict()`` -- quantized weights as integers plus scales, per-step activation tables, corrections.
Written atomically (temp file + fsync + rename), metadata in sorted order (refitting writes the same bytes).
Nothing is unpickled; whatever is wrong with a file is a `CheckpointFormatError` naming the field.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .compressed import CompressedUNet
from .errors import CheckpointFormatError, ConfigError, CqError, StepCountMismatchError, in_file
from .io import checksum as _checksum
from .io import fingerprint, read_safetensors, remove_stale_temps, save_safetensors
from .models.loading import build_from_description, describe_model
from .quant.backend import Backend
from .quant.packing import pack_nibbles, unpack_nibbles
from .registry import from_dict, to_dict
from .sampling.settings import SamplerSettings


__all__ = ["save", "load", "fingerprint", "FORMAT_VERSION"]

FORMAT_VERSION = 3  # 2: the checksum covers the metadata too; 3: the cache correction is owned by the cache

# tensors renamed since an older format: old key prefix -> new (applied after the checksum check)
_RENAMED = {"cache_correction.": "cache.correction."}  # format 3


def _pack_low_bit_weights(model: nn.Module, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights of <= 4 bits go two codes per byte under ``<key>.packed4``; returns the tensors and their index."""
    tensors, packed = {}, {}
    for key, value in state.items():
        if key.endswith(".weight_q"):
            spec = model.get_submodule(key[: -len(".weight_q")]).spec
            if spec.bits <= 4:
                offset = -spec.qmin  # symmetric codes are signed; shift them to [0, 15]
                tensors[key + ".packed4"] = pack_nibbles(value, offset)
                packed[key] = {
                    "shape": list(value.shape),
                    "dtype": str(value.dtype).removeprefix("torch."),
                    "offset": offset,
                }
                continue
        tensors[key] = value
    return tensors, packed


def _unpack_low_bit_weights(tensors: dict[str, Tensor], packed: dict[str, Any]) -> dict[str, Tensor]:
    out = dict(tensors)
    for key, info in packed.items():
        data = out.pop(key + ".packed4", None)
        if data is None:
            raise CheckpointFormatError(f"packed weight {key!r} is listed in the metadata but missing from the file")
        out[key] = unpack_nibbles(data, tuple(info["shape"]), getattr(torch, info["dtype"]), info["offset"])
    return out


def save(model: CompressedUNet, path: str | Path) -> Path:
    """Write ``model`` (fitted by `Recipe.fit`) to ``path``."""
    recipe = model.recipe
    if recipe is None:
        raise ConfigError(
            "only models fitted by Recipe.fit (or built by Recipe.build) can be saved: they carry their recipe"
        )
    tensors, packed = _pack_low_bit_weights(model, model.state_dict())
    metadata = {
        "cq_format": str(FORMAT_VERSION),
        "recipe": json.dumps(to_dict(recipe), sort_keys=True),
        "model": json.dumps(describe_model(model.unet), sort_keys=True),
        "num_steps": str(model.num_steps),
        "fingerprint": model.base_fingerprint,
        "packed4": json.dumps(packed, sort_keys=True),
        "calibration_seeds": json.dumps(list(model.calibration_seeds)),
    }
    if model.sampler_settings is not None:
        metadata["sampler"] = json.dumps(model.sampler_settings.to_dict(), sort_keys=True)
    if model.calibration_guidance is not None:
        metadata["guidance_scale"] = json.dumps(model.calibration_guidance)
    metadata = dict(sorted(metadata.items()))
    metadata["checksum"] = _checksum(tensors, metadata)
    path = Path(path)
    save_safetensors(tensors, path, metadata=metadata)
    return path


def load(
    path: str | Path, *, unet: nn.Module | None = None, num_steps: int | None = None, int8: bool = False
) -> CompressedUNet:
    """Rebuild a saved model.

    Args:
        path: a file written by `save` / `CompressedUNet.save`.
        unet: optionally, the full-precision UNet you expect the file was fitted on; a different one raises.
        num_steps: optionally, the step count you will sample with; a different one raises.
        int8: convert the quantized layers to integer kernels after loading (`CompressedUNet.to_int8`); a
            recipe saved with ``backend="int8"`` (or a kernel family) is converted either way.

    The file is opened once and read whole from that descriptor, so a load concurrent with a save to the same
    path gets the old file or the new one. Temporary files of writers killed mid-save are removed first.

    Raises:
        CheckpointFormatError: not a cq file, a newer format, or a checksum mismatch (corrupted file). A saved
            description naming a strategy nobody registered is also a `StrategyNotRegisteredError` (load the
            plugin that defines it), an invalid one also a `ConfigError`: the error is of both classes.
        ConfigError: fitted on another base model than ``unet``.
        StepCountMismatchError: fitted for another step count than ``num_steps``.
    """
    path = Path(path)
    with contextlib.suppress(OSError):  # best effort: a read-only folder still loads
        remove_stale_temps(path)  # what writers killed mid-save (kill -9) left next to it
    if not path.exists():
        raise CheckpointFormatError(f"no such file: {path}")
    tensors, metadata = read_safetensors(path)  # one open: never a header of one save with bytes of another
    if "cq_format" not in metadata:
        raise CheckpointFormatError(f"{path} is a safetensors file but not a saved cq model (no cq metadata)")
    version = metadata["cq_format"]
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise CheckpointFormatError(f"{path}: cq_format must be a positive integer, got {version!r}")
    if int(version) > FORMAT_VERSION:
        raise CheckpointFormatError(f"{path} uses cq format {version}; this cq reads <= {FORMAT_VERSION}")
    # format 1 checksummed the tensors only; format 2 every metadata field as well
    expected = _checksum(tensors) if int(version) == 1 else _checksum(tensors, metadata)
    if expected != metadata.get("checksum"):
        raise CheckpointFormatError(f"{path}: checksum mismatch, the file is corrupted (tensors or metadata)")
    known = metadata.get("fingerprint", "")
    if int(version) >= 2 and not _is_sha256(known):
        raise CheckpointFormatError(f"{path}: the base-model fingerprint is missing or malformed ({known!r})")
    try:
        tensors = _unpack_low_bit_weights(tensors, _json_field(metadata, "packed4", path, default="{}"))
        if int(version) < 3:
            tensors = _renamed(tensors)
        steps = _int_field(metadata, "num_steps", path)
        description = _json_field(metadata, "model", path)
        recipe_data = _json_field(metadata, "recipe", path)
        seeds = _json_field(metadata, "calibration_seeds", path, default="[]")
        if not isinstance(seeds, list) or not all(isinstance(v, int) for v in seeds):
            raise CheckpointFormatError(f"{path}: calibration_seeds must be a list of integers")
        settings = None
        if "sampler" in metadata:  # files before the sampler settings were recorded: only num_steps is checked
            settings = SamplerSettings.from_dict(_json_field(metadata, "sampler", path))
            if settings.calls != steps:
                raise ValueError(f"sampler settings make {settings.calls} model calls, num_steps is {steps}")
        guidance = _json_field(metadata, "guidance_scale", path, default="null")
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, int | float)):
            raise CheckpointFormatError(f"{path}: guidance_scale must be a number, got {guidance!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: malformed metadata ({e})") from None
    if num_steps is not None and num_steps != steps:
        raise StepCountMismatchError(f"{path} was fitted for {steps} sampling steps, not {num_steps}; refit it")
    if unet is not None and known and fingerprint(unet) != known:
        raise ConfigError(f"{path} was fitted on another base model than the one given (weights fingerprint differs)")
    try:
        base = build_from_description(description, device="meta")  # no float weights allocated
        recipe = from_dict(recipe_data)
    except CqError as e:
        raise in_file(e, f"{path}: the saved model or recipe description is invalid ({e})") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointFormatError(
            f"{path}: the saved model or recipe description is invalid ({type(e).__name__}: {e})"
        ) from None
    try:
        model = recipe.build(
            base,
            steps,
            calibration_seeds=tuple(seeds),
            sampler_settings=settings,
            base_fingerprint=known,
            calibration_guidance=guidance,
        ).to_empty(device="cpu")
        model.load_state_dict(tensors, strict=True)
    except CqError as e:
        raise in_file(e, f"{path}: the recipe does not build on the saved model ({e})") from e
    except RuntimeError as e:
        raise CheckpointFormatError(
            f"{path}: the tensors do not fit the model its metadata describes ({str(e).splitlines()[0]})"
        ) from None
    if int8 or recipe.int8_kernels is not None:
        model.to_int8(recipe.int8_kernels or Backend.INT8)
    return model.eval()


def _renamed(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors of an older format under today's names (`_RENAMED`)."""
    out = {}
    for key, value in tensors.items():
        for old, new in _RENAMED.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key] = value
    return out


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _json_field(metadata: dict[str, str], key: str, path: Path, default: str | None = None) -> Any:
    if key not in metadata and default is None:
        raise CheckpointFormatError(f"{path}: metadata field {key!r} is missing")
    try:
        return json.loads(metadata.get(key, default))
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: metadata field {key!r} is not valid JSON ({e})") from None


def _int_field(metadata: dict[str, str], key: str, path: Path) -> int:
    value = metadata.get(key)
    if value is None or not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise CheckpointFormatError(f"{path}: metadata field {key!r} must be a positive integer, got {value!r}")
    return int(value)
