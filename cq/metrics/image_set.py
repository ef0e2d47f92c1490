"""A set of generated (or real) images on disk, read in batches: what ``cq eval`` measures.

Three layouts are read:

- a ``cq sample --out DIR`` folder (its ``manifest.json`` says the layout; an unfinished run is refused), or any
  folder of ``shard-*.npz`` files;
- one ``.npz`` file with ``arr_0`` = uint8 ``[N, H, W, C]`` (the ADM / torch-fidelity evaluation-batch layout,
  ``cq sample --npz``), class labels under ``arr_1`` or prompts under ``prompts``;
- a folder of PNG / JPEG images (sorted by file name).

Only headers are read up front; pixels are read one file at a time by `ImageSet.batches`, so a 50k-sample set
need not fit in memory.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ImageSetError


__all__ = ["ImageSet", "read_image_set", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ImageSet:
    """Images at ``path``: ``count`` images of ``shape`` ``(H, W, C)`` (C = 1 or 3) in ``sources`` (npz files or
    image files, in order); ``prompts`` / ``labels`` per image when the files carry them."""

    path: Path
    layout: str  # "shards" | "npz" | "images"
    sources: tuple[Path, ...]
    count: int
    shape: tuple[int, int, int]
    prompts: tuple[str, ...] | None = None
    labels: tuple[int, ...] | None = None

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """uint8 ``[B, C, H, W]`` batches of at most ``batch_size`` images, in order (the last may be smaller)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ImageSetError(f"batch_size must be an int >= 1, got {batch_size!r}")
        pending: list[np.ndarray] = []
        held = 0
        for array in self._arrays():
            pending.append(array)
            held += array.shape[0]
            while held >= batch_size:
                joined = np.concatenate(pending)
                yield _nchw(joined[:batch_size])
                pending, held = [joined[batch_size:]], joined.shape[0] - batch_size
        if held:
            yield _nchw(np.concatenate(pending))

    def _arrays(self) -> Iterator[np.ndarray]:
        for source in self.sources:
            array = _read_npz_images(source) if self.layout != "images" else _read_picture(source)[None]
            if tuple(array.shape[1:]) != self.shape:
                raise ImageSetError(
                    f"{source}: images of shape {tuple(array.shape[1:])}, but {self.path} starts with {self.shape}; "
                    "a set holds images of one size"
                )
            yield array


def read_image_set(path: str | Path) -> ImageSet:
    """The `ImageSet` at ``path`` (a folder of npz shards, one ``.npz``, or a folder of PNG / JPEG images).

    Raises:
        ImageSetError: no such path, no images in it, or files that are not uint8 ``[N, H, W, C]`` images.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".npz":
            raise ImageSetError(f"{path}: expected a .npz file (arr_0 = uint8 [N, H, W, C]) or a folder of images")
        return _npz_set(path, "npz", (path,))
    if not path.is_dir():
        raise ImageSetError(f"{path} does not exist; pass a sample folder (cq sample --out), a .npz or image folder")
    if (path / "manifest.json").is_file():
        return _sample_folder(path)
    shards = tuple(sorted(path.glob("shard-*.npz")))
    if shards:
        return _npz_set(path, "shards", shards)
    pictures = tuple(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
    if not pictures:
        npz = sorted(path.glob("*.npz"))
        hint = f" (it holds {npz[0].name}: pass that file)" if npz else ""
        raise ImageSetError(f"{path} holds no shard-*.npz and no {'/'.join(IMAGE_SUFFIXES)} images{hint}")
    first = _read_picture(pictures[0])
    return ImageSet(path=path, layout="images", sources=pictures, count=len(pictures), shape=tuple(first.shape))


def _sample_folder(path: Path) -> ImageSet:
    """A ``cq sample --out`` folder: refused unless finished (`cq.sampling.shards.finished_manifest`); npz shards or
    the PNG of each seed, in seed order."""
    from ..sampling.shards import finished_manifest, png_files, shard_path

    manifest = finished_manifest(path)
    if manifest.shard_format == "npz":
        return _npz_set(path, "shards", tuple(shard_path(path, i) for i in range(manifest.plan.num_shards)))
    pictures = tuple(png_files(path, manifest))
    first = _read_picture(pictures[0])
    return ImageSet(path=path, layout="images", sources=pictures, count=len(pictures), shape=tuple(first.shape))


def _npz_set(path: Path, layout: str, files: tuple[Path, ...]) -> ImageSet:
    count, shape, prompts, labels = 0, None, [], []
    for file in files:
        n, file_shape = _npz_header(file)
        if shape is None:
            shape = file_shape
        elif file_shape != shape:
            raise ImageSetError(f"{file}: images of shape {file_shape}, but {files[0]} holds {shape}")
        extra = _npz_extras(file, n)
        prompts.append(extra.get("prompts"))
        labels.append(extra.get("arr_1"))
        count += n
    if count == 0:
        raise ImageSetError(f"{path} holds no images (arr_0 has 0 rows)")
    return ImageSet(
        path=path,
        layout=layout,
        sources=files,
        count=count,
        shape=shape,
        prompts=_joined(prompts, str),
        labels=_joined(labels, int),
    )


def _joined(parts: list, kind: type) -> tuple | None:
    """Per-image values when every file carries them, else None."""
    if any(p is None for p in parts):
        return None
    return tuple(kind(v) for p in parts for v in p)


def _npz_header(file: Path) -> tuple[int, tuple[int, int, int]]:
    """``(N, (H, W, C))`` of ``arr_0`` from its .npy header, without reading the pixels."""
    try:
        with zipfile.ZipFile(file) as z, z.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except KeyError:
        raise ImageSetError(f"{file} has no arr_0 (expected uint8 images [N, H, W, C] under arr_0)") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ImageSetError(f"{file} is not a readable .npz file ({e})") from None
    _check_layout(file, shape, dtype)
    return shape[0], tuple(shape[1:])


def _check_layout(file: Path, shape: tuple, dtype: np.dtype) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
        raise ImageSetError(
            f"{file}: arr_0 is {dtype} {tuple(shape)}; expected uint8 [N, H, W, C] with C = 1 or 3 "
            "(convert floats in [-1, 1] with ((x + 1) * 127.5).round().astype(np.uint8), channels last)"
        )


def _npz_extras(file: Path, n: int) -> dict[str, np.ndarray]:
    """``arr_1`` (labels) and ``prompts`` of a file, checked to hold one entry per image."""
    out = {}
    with np.load(file, allow_pickle=False) as z:
        for key in ("arr_1", "prompts"):
            if key in z.files:
                try:
                    values = z[key]
                except ValueError as e:
                    raise ImageSetError(f"{file}: {key} is not a plain array ({e})") from None
                if values.ndim != 1 or values.shape[0] != n:
                    raise ImageSetError(f"{file}: {key} has shape {values.shape}, expected one entry per image ({n})")
                out[key] = values
    return out


def _read_npz_images(file: Path) -> np.ndarray:
    try:
        with np.load(file, allow_pickle=False) as z:
            array = z["arr_0"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ImageSetError(f"{file} is not a readable .npz file with arr_0 ({e})") from None
    _check_layout(file, array.shape, array.dtype)
    return array


def _read_picture(file: Path) -> np.ndarray:
    """``[H, W, C]`` uint8 (C = 1 for grayscale, 3 otherwise: palette and alpha images are converted to RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            image = image.convert("L" if image.mode in ("L", "I;16", "1") else "RGB")
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise ImageSetError(f"{file} is not a readable image ({e})") from None
    return array[..., None] if array.ndim == 2 else array


def _nchw(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()
