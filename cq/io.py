"""Atomic file writes: a saved artifact is either complete or absent, never partial."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor


__all__ = ["atomic_path", "save_safetensors"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path`` (``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # created like any new file (mode 0o666 minus the umask), unlike mkstemp's 0o600
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file as 0o600
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (made contiguous, on CPU) to a safetensors file atomically."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=metadata)


def atomic_torch_save(obj: object, path: str | Path, save: Callable[..., None] = torch.save) -> None:
    """``torch.save`` through a temporary file (for resumable training state)."""
    with atomic_path(path) as tmp:
        save(obj, tmp)
