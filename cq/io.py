"""Atomic file writes (a saved artifact is either complete or absent, never partial) and content fingerprints."""

from __future__ import annotations

import contextlib
import errno as errno_codes
import glob
import hashlib
import json
import math
import mmap
import os
import re
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointFormatError, CheckpointWriteError


__all__ = [
    "atomic_path",
    "atomic_dir",
    "save_safetensors",
    "read_safetensors",
    "fingerprint",
    "checksum",
    "file_sha256",
    "remove_stale_temps",
]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is flushed to disk (``fsync``) and renamed over
    ``path`` (``os.replace``), so a reader sees the old file or the whole new one, never a part.

    Temporary files left by writers that were killed (``kill -9`` skips every ``finally``) are removed on the
    next write to the same target: their name carries the writer's pid, and a pid that no longer runs is dead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    # created like any new file (mode 0o666 minus the umask), unlike mkstemp's 0o600
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file as 0o600
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """`atomic_path` for a folder: yield an empty temporary folder next to ``path``; on success its files are
    flushed to disk and it is renamed to ``path`` (which must not exist), so a reader sees all of it or nothing.
    Temporary folders of killed writers are removed on the next write to the same target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            _fsync(child)
        _fsync(tmp)
        os.rename(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete ``.<name>.<pid>.<hex>.tmp`` files (or folders) next to ``path`` whose writer process is gone; returns
    them."""
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 : -len(".tmp")].split(".")
        if len(parts) != 2 or not parts[0].isdigit() or _alive(int(parts[0])):
            continue
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (made contiguous, on CPU) to a safetensors file atomically, metadata keys in sorted order
    (safetensors itself writes them in a random order: the same content would give different bytes)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        with atomic_path(path) as tmp:
            save_file(data, str(tmp), metadata=metadata)
            _sort_metadata_in_place(tmp)
    except (SafetensorError, OSError) as e:
        raise write_error(e, path) from e


def write_error(e: BaseException, path: str | Path) -> CheckpointWriteError:
    """The `CheckpointWriteError` of a failed write to ``path``, keeping the OS error's ``errno`` (safetensors
    reports it only inside its message: ``... (os error 28)``)."""
    if isinstance(e, CheckpointWriteError):
        return e
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = re.search(r"\(os error (\d+)\)|code: (\d+)", str(e))
        code = int(m.group(1) or m.group(2)) if m else None
    fix = {
        errno_codes.ENOSPC: "free space on that disk or write elsewhere",
        errno_codes.EFBIG: "the file exceeds the size this process may write (ulimit -f); raise the limit",
        errno_codes.EACCES: "write to a folder you may write to",
        errno_codes.EROFS: "the file system is read-only; write elsewhere",
    }.get(code, "check the disk and the folder")
    reason = os.strerror(code) if code is not None else str(e)
    return CheckpointWriteError(code, f"{reason} while writing {path}: {fix} (nothing was replaced)", str(path))


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors (on CPU) and ``__metadata__`` of a safetensors file, all read from one open file descriptor.

    safetensors' own loaders read the header from one open of the path and the tensor bytes from another (torch
    maps the file again by name), so a file replaced in between (an atomic save by another process) gave a
    header of one file with the bytes of the other. Here the file is opened once and memory-mapped; a reader
    sees the old file or the new one, whole. Unreadable files are a `CheckpointFormatError`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError(f"{size} bytes, shorter than a safetensors header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as data:
                return _parse_safetensors(data, size)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, struct.error) as e:
        raise CheckpointFormatError(f"{path} is not a readable safetensors file ({e}); is it truncated?") from None


def _parse_safetensors(data: mmap.mmap, size: int) -> tuple[dict[str, Tensor], dict[str, str]]:
    (length,) = struct.unpack("<Q", data[:8])
    if length > size - 8:
        raise ValueError(f"the header claims {length} bytes, the file holds {size - 8} after its length")
    header = json.loads(bytes(data[8 : 8 + length]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ must map names to strings")
    start = 8 + length
    tensors = {}
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key!r} has dtype {info['dtype']!r}, which cq does not read")
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(v) for v in info["data_offsets"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= size - start or end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"tensor {key!r}: data offsets {begin}..{end} do not fit its shape or the file")
        if begin == end:
            tensors[key] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=start + begin)
            tensors[key] = flat.clone().view(dtype).reshape(shape)
    return tensors, {str(k): v for k, v in metadata.items()}


def _sort_metadata_in_place(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted; the header keeps its byte length (the
    same compact JSON, reordered), so the tensor data does not move. Left as is if the length would differ."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        raw = f.read(size)
        header = json.loads(raw)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        padded = text + b" " * (len(raw) - len(text))
        if len(padded) != len(raw) or json.loads(padded) != json.loads(raw):
            return
        f.seek(8)
        f.write(padded)


def atomic_torch_save(obj: object, path: str | Path, save: Callable[..., None] = torch.save) -> None:
    """``torch.save`` through a temporary file (for resumable training state)."""
    try:
        with atomic_path(path) as tmp:
            save(obj, tmp)
    except OSError as e:
        raise write_error(e, path) from e


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over a model's state dict (sorted keys, shapes, dtypes and bytes): which weights a trace was
    recorded from and a compressed model was fitted on."""
    return checksum(model.state_dict())


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in chunks (a saved model's identity, whatever its name or place)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksum(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """SHA-256 of the tensors (sorted keys) and, when given, of every metadata field but ``checksum`` itself."""
    h = hashlib.sha256()
    for key, value in sorted(tensors.items()):
        _hash_tensor(h, key, value)
    for key, value in sorted((metadata or {}).items()):
        if key != "checksum":
            h.update(f"meta|{key}|{len(value)}|{value}".encode())
    return h.hexdigest()


def _hash_tensor(h: Any, key: str, value: Tensor) -> None:
    value = value.detach().cpu().contiguous()
    h.update(f"{key}|{tuple(value.shape)}|{value.dtype}|".encode())
    h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
