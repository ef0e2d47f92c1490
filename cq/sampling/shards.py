"""Resumable, sharded sample folders (``cq sample --out DIR``): fixed-size shards of seeds plus a manifest.

A run of ``num`` seeds from ``first_seed`` is cut into shards of ``shard_size`` consecutive seeds: shard ``i``
holds seeds ``first_seed + i * S ..`` whatever the batch size or the number of processes, and each sample depends
on its own seed only (`seeded_noise`), so the bytes of a shard depend on the run's settings alone. Each shard is
written atomically (``shard-00000.npz``: uint8 NHWC images ``arr_0`` -- the layout of the ADM / torch-fidelity
evaluation batches -- their ``seeds``, and labels ``arr_1`` or ``prompts``; or a folder ``shard-00000`` of one
PNG per seed plus ``shard.json`` with the same fields), so a run killed at any point leaves
complete shards only, and the same command resumes from them. ``manifest.json`` records what the samples are of
(model fingerprint, sampler, seeds, conditions, ...); a run with other settings into the same folder is refused.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError, SampleFolderError, SampleSettingsMismatchError
from ..io import atomic_dir, atomic_path


__all__ = [
    "ShardPlan",
    "SampleManifest",
    "open_folder",
    "shard_path",
    "existing_shards",
    "read_shard",
    "write_shards",
    "read_samples",
    "to_uint8_nhwc",
]

MANIFEST = "manifest.json"
FORMAT = "cq-samples"
VERSION = 1
SHARD_FORMATS = ("npz", "png")
_PLAN_KEYS = frozenset({"format", "version", "first_seed", "num", "shard_size", "shard_format"})
# manifest fields that describe the run to a reader but do not change a sample's bytes
_INFORMATIONAL = frozenset({"model_file"})


@dataclass(frozen=True)
class ShardPlan:
    """Seeds ``first_seed .. first_seed + num - 1`` cut into shards of ``shard_size`` consecutive seeds (the last
    one may be shorter). The cut depends on these three numbers only, never on batch size or world size."""

    first_seed: int
    num: int
    shard_size: int

    def __post_init__(self) -> None:
        for name in ("first_seed", "num", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"ShardPlan.{name} must be an integer, got {value!r}")
        if self.num < 1:
            raise ConfigError(f"the number of samples must be >= 1, got {self.num}")
        if self.shard_size < 1:
            raise ConfigError(f"the shard size must be >= 1 samples, got {self.shard_size}")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num / self.shard_size)

    def rows(self, shard: int) -> range:
        """Sample indices (0 = ``first_seed``) of ``shard``; conditions are cycled over these."""
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < self.num_shards:
            raise ConfigError(f"shard must be an integer in 0..{self.num_shards - 1}, got {shard!r}")
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num))

    def seeds(self, shard: int) -> range:
        rows = self.rows(shard)
        return range(self.first_seed + rows.start, self.first_seed + rows.stop)


@dataclass(frozen=True)
class SampleManifest:
    """What a sample folder holds: the `ShardPlan` and the run's settings (a JSON object: model fingerprint,
    sampler, conditions, ...). Two runs whose manifests are equal write the same bytes into every shard."""

    plan: ShardPlan
    settings: Mapping[str, Any] = field(default_factory=dict)
    shard_format: str = "npz"

    def __post_init__(self) -> None:
        if self.shard_format not in SHARD_FORMATS:
            raise ConfigError(f"shard format must be one of {', '.join(SHARD_FORMATS)}, got {self.shard_format!r}")
        try:  # JSON-normalised (tuples become lists), so a manifest read back compares equal
            settings = json.loads(json.dumps(dict(self.settings), sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"sample manifest settings must be JSON values ({e})") from None
        reserved = _PLAN_KEYS & settings.keys()
        if reserved:
            raise ConfigError(f"sample manifest settings may not set {sorted(reserved)}: the plan holds them")
        object.__setattr__(self, "settings", settings)

    def to_dict(self) -> dict[str, Any]:
        plan = {"first_seed": self.plan.first_seed, "num": self.plan.num, "shard_size": self.plan.shard_size}
        return {"format": FORMAT, "version": VERSION, **plan, "shard_format": self.shard_format, **self.settings}

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> SampleManifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SampleFolderError(
                f"{where} is not a cq sample manifest (expected a JSON object with format {FORMAT!r})"
            )
        if data.get("version") != VERSION:
            raise SampleFolderError(f"{where}: manifest version {data.get('version')!r}; this cq reads {VERSION}")
        try:
            plan = ShardPlan(data["first_seed"], data["num"], data["shard_size"])
            rest = {k: v for k, v in data.items() if k not in _PLAN_KEYS}
            return cls(plan, rest, data["shard_format"])
        except (KeyError, ConfigError) as e:
            raise SampleFolderError(f"{where}: malformed seed plan ({type(e).__name__}: {e})") from None

    def differences(self, other: SampleManifest) -> list[str]:
        """The fields (informational ones aside) in which two manifests differ."""
        a, b = self.to_dict(), other.to_dict()
        return sorted(k for k in a.keys() | b.keys() if k not in _INFORMATIONAL and a.get(k) != b.get(k))


def read_manifest(folder: str | Path) -> SampleManifest:
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SampleFolderError(f"{folder} holds no {MANIFEST}: not a folder written by `cq sample --out`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleFolderError(f"{path} is unreadable ({e}); delete the folder and sample again") from None
    return SampleManifest.from_dict(data, str(path))


def open_folder(folder: str | Path, manifest: SampleManifest) -> Path:
    """Make ``folder`` hold ``manifest``: write it (atomically) into a new or empty folder, or check that the
    folder's own manifest is the same run (`SampleSettingsMismatchError` naming the fields that differ)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SampleFolderError(f"--out {folder} is a file; give a folder (new, or one this run wrote before)")
    if (folder / MANIFEST).exists():
        if not os.access(folder, os.W_OK):
            raise SampleFolderError(f"cannot write into --out {folder} (no permission); choose a writable folder")
        found = read_manifest(folder)
        differ = found.differences(manifest)
        if differ:
            shown = "; ".join(
                f"{k}: {found.to_dict().get(k)!r} there, {manifest.to_dict().get(k)!r} now" for k in differ
            )
            raise SampleSettingsMismatchError(
                f"{folder} holds samples of another run ({_clip(shown)}); rerun the command that started it to "
                "resume, or choose a new --out folder"
            )
        return folder
    if folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir()):
        raise SampleFolderError(f"--out {folder} is not empty and holds no {MANIFEST}; choose a new or empty folder")
    try:
        with atomic_path(folder / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest.to_dict(), indent=1, sort_keys=True) + "\n")
    except OSError as e:
        raise SampleFolderError(f"cannot write into --out {folder} ({e.strerror}); choose a writable folder") from None
    return folder


def shard_path(folder: str | Path, shard: int, shard_format: str = "npz") -> Path:
    """``shard-00000.npz``, or the folder ``shard-00000`` of PNGs (one per seed) + ``shard.json``."""
    name = f"shard-{shard:05d}"
    return Path(folder) / (f"{name}.npz" if shard_format == "npz" else name)


def existing_shards(folder: str | Path, manifest: SampleManifest) -> list[int]:
    """The shards of ``manifest`` whose file (or PNG folder) exists; each is complete: shards are written
    atomically."""
    fmt = manifest.shard_format
    exists = Path.is_file if fmt == "npz" else Path.is_dir
    return [i for i in range(manifest.plan.num_shards) if exists(shard_path(folder, i, fmt))]


@dataclass(frozen=True)
class Shard:
    """One shard as read back: uint8 images ``[n, H, W, C]``, their seeds, and the label or prompt of each (None:
    unconditional)."""

    images: np.ndarray
    seeds: np.ndarray
    per_sample: list | None


def read_shard(folder: str | Path, manifest: SampleManifest, shard: int) -> Shard:
    """Read and check shard ``shard``: the seeds the plan gives it, uint8 NHWC images, one label or prompt per
    image if any."""
    plan, fmt = manifest.plan, manifest.shard_format
    path = shard_path(folder, shard, fmt)
    fix = "delete it and rerun the same command to sample it again"
    try:
        arrays = _read_npz(path) if fmt == "npz" else _read_png_folder(path)
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise SampleFolderError(f"{path} is not a readable shard ({type(e).__name__}: {e}); {fix}") from None
    images, seeds = arrays.get("arr_0"), arrays.get("seeds")
    expected = np.arange(plan.seeds(shard).start, plan.seeds(shard).stop, dtype=np.int64)
    if images is None or seeds is None:
        raise SampleFolderError(f"{path} lacks arr_0 (images) or seeds; {fix}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(expected):
        raise SampleFolderError(
            f"{path}: expected {len(expected)} uint8 NHWC images, got {images.dtype} {tuple(images.shape)}; {fix}"
        )
    if seeds.shape != expected.shape or not np.array_equal(seeds, expected):
        raise SampleFolderError(f"{path} holds other seeds than {expected[0]}..{expected[-1]}; {fix}")
    per_sample = None
    for key, kind in (("arr_1", int), ("prompts", str)):
        if key in arrays:
            if np.shape(arrays[key]) != expected.shape:
                raise SampleFolderError(f"{path}: {key} must hold one entry per image; {fix}")
            per_sample = [kind(v) for v in np.asarray(arrays[key]).tolist()]
    return Shard(images, seeds, per_sample)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _png_name(seed: int) -> str:
    return f"{seed:06d}.png"


def _read_png_folder(path: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    meta = json.loads((path / "shard.json").read_text())
    seeds = np.asarray(meta["seeds"], dtype=np.int64)
    images = []
    for seed in seeds.tolist():
        with Image.open(path / _png_name(seed)) as image:
            array = np.asarray(image)
        images.append(array[..., None] if array.ndim == 2 else array)
    if len({a.shape for a in images}) > 1:
        raise ValueError("its PNGs have different sizes")
    arrays = {"arr_0": np.stack(images), "seeds": seeds}
    arrays.update({k: meta[k] for k in ("arr_1", "prompts") if k in meta})
    return arrays


def _write_shard(path: Path, images: np.ndarray, seeds: range, per_sample: Sequence, shard_format: str) -> None:
    labels = {}
    if per_sample and isinstance(per_sample[0], int):
        labels["arr_1"] = [int(v) for v in per_sample]
    elif per_sample and isinstance(per_sample[0], str):
        labels["prompts"] = list(per_sample)
    if shard_format == "npz":
        arrays = {"arr_0": images, "seeds": np.arange(seeds.start, seeds.stop, dtype=np.int64)}
        arrays.update({k: np.asarray(v, dtype=np.int64 if k == "arr_1" else str) for k, v in labels.items()})
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return
    from PIL import Image

    if images.shape[-1] not in (1, 3, 4):
        raise ConfigError(f"PNG shards take 1, 3 or 4 channels, the images have {images.shape[-1]}; use npz")
    with atomic_dir(path) as tmp:
        for seed, image in zip(seeds, images, strict=True):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp / _png_name(seed))
        (tmp / "shard.json").write_text(json.dumps({"seeds": list(seeds), **labels}, indent=1) + "\n")


def write_shards(
    folder: str | Path,
    manifest: SampleManifest,
    shards: Sequence[int],
    draw: Callable[[range, range], np.ndarray],
    *,
    batch_size: int,
    per_sample: Callable[[int], Any] = lambda row: None,
    progress: bool = True,
    desc: str = "samples",
    position: int = 0,
) -> list[Path]:
    """Sample and write each of ``shards`` (of ``manifest``, into ``folder``), in batches of at most ``batch_size``
    that never cross a shard: ``draw(seeds, rows)`` returns the uint8 NHWC images of those seeds (``rows``: their
    sample indices, for conditions); ``per_sample(row)`` the label or prompt saved with sample ``row``. A tqdm bar
    counts samples; a shard's file appears complete or not at all, so an interrupted call loses only the shard in
    progress. Returns the paths written."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    plan = manifest.plan
    total = sum(len(plan.rows(i)) for i in shards)
    written = []
    with tqdm(total=total, desc=desc, unit="sample", disable=not progress, position=position) as bar:
        for shard in shards:
            rows, seeds = plan.rows(shard), plan.seeds(shard)
            parts = []
            for start in range(0, len(rows), batch_size):
                part = draw(seeds[start : start + batch_size], rows[start : start + batch_size])
                if not isinstance(part, np.ndarray) or part.dtype != np.uint8 or part.ndim != 4:
                    raise ConfigError(f"draw must return uint8 NHWC images, got {type(part).__name__}")
                parts.append(part)
                bar.update(len(part))
            images = np.concatenate(parts)
            if len(images) != len(rows):
                raise ConfigError(f"draw returned {len(images)} images for the {len(rows)} seeds of shard {shard}")
            path = shard_path(folder, shard, manifest.shard_format)
            _write_shard(path, images, seeds, [per_sample(r) for r in rows], manifest.shard_format)
            written.append(path)
    return written


def finished_manifest(folder: str | Path) -> SampleManifest:
    """The manifest of a ``cq sample --out`` folder whose every shard is written; an unfinished run is refused
    (`SampleFolderError`: rerun the command that started it)."""
    manifest = read_manifest(folder)
    plan = manifest.plan
    missing = sorted(set(range(plan.num_shards)) - set(existing_shards(folder, manifest)))
    if missing:
        raise SampleFolderError(
            f"{folder} is unfinished: {len(missing)} of {plan.num_shards} shards missing (first: "
            f"{shard_path(folder, missing[0], manifest.shard_format).name}); rerun the `cq sample` command that "
            "started it to finish"
        )
    return manifest


def png_files(folder: str | Path, manifest: SampleManifest) -> list[Path]:
    """The PNG of every seed of a ``--format png`` folder, in seed order."""
    plan = manifest.plan
    return [shard_path(folder, i, "png") / _png_name(seed) for i in range(plan.num_shards) for seed in plan.seeds(i)]


def read_samples(folder: str | Path) -> tuple[np.ndarray, np.ndarray, list | None]:
    """Every sample of a finished ``cq sample --out`` folder, in seed order: ``(uint8 images [N, H, W, C], seeds
    [N] int64, labels or prompts (a list of N) or None when unconditional)``. An unfinished run is refused
    (`SampleFolderError`: rerun the command that started it)."""
    manifest = finished_manifest(folder)
    shards = [read_shard(folder, manifest, i) for i in range(manifest.plan.num_shards)]
    if len({s.images.shape[1:] for s in shards}) != 1:
        raise SampleFolderError(f"{folder}: shards hold images of different shapes; it mixes two runs")
    labels = [v for s in shards for v in s.per_sample] if shards[0].per_sample is not None else None
    if labels is not None and any(s.per_sample is None for s in shards):
        raise SampleFolderError(f"{folder}: some shards carry labels or prompts, others do not; it mixes two runs")
    return np.concatenate([s.images for s in shards]), np.concatenate([s.seeds for s in shards]), labels


def to_uint8_nhwc(images: Tensor) -> np.ndarray:
    """Images in [-1, 1] (``[N, C, H, W]``) as uint8 ``[N, H, W, C]`` (clamped, rounded)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _clip(text: str, n: int = 400) -> str:
    return text if len(text) <= n else text[:n] + " ..."
