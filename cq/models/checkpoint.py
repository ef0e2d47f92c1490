"""Reading state dicts from checkpoint files safely (``weights_only=True`` pickles, safetensors, diffusers folders)."""

from __future__ import annotations

import builtins
import importlib.util
import json
import pickle
import re
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointFormatError, UnsafeCheckpointError
from ..io import read_safetensors


__all__ = ["read_state_dict", "read_diffusers_folder", "read_config", "extract_state_dict", "read_pickle"]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class _LightningCheckpointStub:
    """Stands in for ``pytorch_lightning...ModelCheckpoint`` objects found in old LDM/SD ``.ckpt`` files.

    Allow-listed under that foreign name only, so ``weights_only=True`` loading still refuses any other code.
    """

    def __setstate__(self, state: Any) -> None:
        self.state = state


_SAFE_FOREIGN_GLOBALS = [
    (_LightningCheckpointStub, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def read_state_dict(path: str | Path, *, ema: bool = True, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Read the tensors of a checkpoint file or diffusers folder into a flat ``{key: tensor}`` dict (on CPU).

    Args:
        path: ``.safetensors``, a pickle (``.ckpt/.pt/.pth/.bin``, loaded with ``weights_only=True``) or a folder
            holding ``diffusion_pytorch_model.safetensors`` / ``.bin``.
        ema: prefer EMA weights when the file holds both (ddim training lists, ``{"ema": ...}`` dicts).
        trust_pickle: allow arbitrary pickled objects (``weights_only=False``); only for files you trust.

    Raises:
        CheckpointFormatError: missing, truncated or unrecognised file.
        UnsafeCheckpointError: the pickle references code that ``weights_only=True`` refuses.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointFormatError(f"checkpoint not found: {path}")
    if path.is_dir():
        return read_diffusers_folder(path)[0]
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return extract_state_dict(read_pickle(path, trust_pickle=trust_pickle), ema=ema, source=path)
    raise CheckpointFormatError(
        f"unrecognised checkpoint suffix {path.suffix!r} for {path}; expected .safetensors, "
        f"{', '.join(PICKLE_SUFFIXES)} or a diffusers folder"
    )


def read_config(path: Path) -> dict[str, Any]:
    """A ``config.json`` as a dict; missing, non-JSON or non-object files are a `CheckpointFormatError`."""
    if not path.exists():
        raise CheckpointFormatError(f"{path} is missing: a diffusers pipeline folder describes each part there")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not config:
        raise CheckpointFormatError(f"{path} must be a non-empty JSON object (a diffusers / transformers config)")
    return config


def read_diffusers_folder(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights and ``config.json`` of a diffusers model folder (or of its ``unet/`` sub-folder)."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "unet" / "config.json").exists():
        path = path / "unet"
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointFormatError(f"{path} is a folder but holds no diffusers config.json")
    config = read_config(config_file)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / name).exists():
            return read_state_dict(path / name), config
    raise CheckpointFormatError(f"{path} holds no diffusion_pytorch_model.safetensors or .bin")


def extract_state_dict(obj: Any, *, ema: bool = True, source: Any = "checkpoint") -> dict[str, Tensor]:
    """Find the model state dict inside the containers checkpoints come in.

    Handled: a bare ``{key: tensor}`` dict; ``{"state_dict": ...}`` (Lightning); ``{"ema": ..., "model": ...}``;
    the ddim training list ``[model, optimizer, epoch, step, ema]``. A ``module.`` prefix (DataParallel) is dropped.
    """
    if isinstance(obj, list | tuple):
        candidates = [o for o in obj if _is_tensor_dict(o)]
        if not candidates:
            raise CheckpointFormatError(f"{source}: a list with no state dict inside")
        # ddim's training checkpoints put the EMA state last (index 4)
        obj = candidates[-1] if ema and len(obj) >= 5 and _is_tensor_dict(obj[4]) else candidates[0]
    elif isinstance(obj, dict) and not _is_tensor_dict(obj):
        keys = ("ema", "ema_state_dict", "state_dict", "model") if ema else ("state_dict", "model", "ema")
        found = next((obj[k] for k in keys if k in obj and isinstance(obj[k], dict)), None)
        if found is None and any(isinstance(v, Tensor) for v in obj.values()):
            found = obj  # a flat state dict with a few non-tensor entries (a step counter, say): drop those
        if found is None:
            raise CheckpointFormatError(
                f"{source}: no state dict found; top-level keys are {sorted(map(str, obj))[:20]}"
            )
        obj = found
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointFormatError(f"{source}: the state dict holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    return read_safetensors(path)[0]


def read_pickle(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` of ``path`` (on CPU, ``weights_only=True`` unless ``trust_pickle``): an unreadable file is a
    `CheckpointFormatError`, a refused global an `UnsafeCheckpointError`, never torch's raw exception."""
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_SAFE_FOREIGN_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused:
            raise UnsafeCheckpointError(
                f"{path} holds a pickled reference to `{refused}`, which safe (weights_only) loading refuses: "
                "unpickling it would import or run code. Convert the checkpoint to .safetensors, or pass "
                "trust_pickle=True only if you trust where the file came from"
            ) from None
        missing = _unknown_global(str(e))
        if missing:
            raise UnsafeCheckpointError(
                f"{path} holds a pickled reference to `{missing}`, a class or function of a module that is not "
                "installed here; safe (weights_only) loading refuses pickled code objects. Convert the checkpoint "
                "to .safetensors (or a plain state dict of tensors) where that module is installed, or pass "
                "trust_pickle=True there, only if you trust where the file came from"
            ) from None
        raise CheckpointFormatError(
            f"{path} is not a readable PyTorch checkpoint (truncated?): {_last_words(e)}"
        ) from None
    except (
        EOFError,
        RuntimeError,
        zipfile.BadZipFile,
        OSError,
        IndexError,
        KeyError,
        ValueError,
        TypeError,
        struct.error,
    ) as e:  # TypeError: an allow-listed callable rebuilt with arguments it does not take (a damaged pickle)
        raise CheckpointFormatError(
            f"{path} is not a readable PyTorch checkpoint (truncated?): {_last_words(e)}"
        ) from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _refused_global(text: str) -> str:
    """The global torch's weights_only error names as refused ("posix.system", "builtins.eval"), or ''.

    Only the name is kept: torch's message goes on to advise re-running with ``weights_only=False`` or
    allow-listing the global, advice cq never passes on."""
    for line in _ANSI.sub("", text).splitlines():
        m = re.search(r"GLOBAL (\S+)", line)
        if m and _names_real_global(m.group(1)):
            name = m.group(1)
            return name if "." in name else f"builtins.{name}"
    return ""


_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _unknown_global(text: str) -> str:
    """A well-formed ``package.attribute`` torch's weights_only error names whose top-level package is not
    installed here, or ''. A truncated pickle names fragments ("GLOBAL .", "GLOBAL torch._utils._"): not
    well-formed, or of a package that is installed (cut inside an attribute)."""
    for line in _ANSI.sub("", text).splitlines():
        m = re.search(r"GLOBAL (\S+)", line)
        if m and _DOTTED_NAME.fullmatch(m.group(1)):
            top = m.group(1).split(".")[0]
            if top not in sys.modules and top not in sys.builtin_module_names and not importlib.util.find_spec(top):
                return m.group(1)
    return ""


def _names_real_global(name: str) -> bool:
    """Whether ``module.attribute`` names something that exists, found without importing or running anything.

    A truncated pickle makes torch report fragments ("GLOBAL .", "GLOBAL torch._."): those are corruption, not
    a refused payload. Either way the file is refused; this only picks the clearer error.
    """
    module_name, _, attribute = name.rpartition(".")
    if not module_name and attribute:  # a builtin pickled by bare name ("GLOBAL eval")
        return hasattr(builtins, attribute)
    if not module_name or not attribute:
        return False
    module = sys.modules.get(module_name)
    if module is not None:
        return hasattr(module, attribute)
    top = module_name.split(".")[0]
    return bool(top) and top in sys.builtin_module_names or importlib.util.find_spec(top) is not None


def _last_words(e: BaseException) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return (useful or lines or [type(e).__name__])[0][:200]
