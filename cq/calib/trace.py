"""`trace`: one full-precision, no-cache sampling run, recorded for the strategies that fit on it.

What is recorded, per sampler step ``i``: the model input ``x_t``, the timestep ``t``, the conditioning and the
features entering the requested cache points. Only ``keep`` of the ``num_samples`` trajectories are stored,
and they are the *same* trajectories at every step, so step-to-step feature distances (DPS) and (stale, fresh)
feature pairs (DEC) compare like with like. Statistics over all trajectories can be streamed through
``observers`` without storing anything.

Memory (``Trace.estimate_bytes``), with ``k = min(keep, num_samples)`` and ``T = steps``::

    bytes = T * k * itemsize * (numel(x) + numel(cond) + sum_p numel(feature_p))  +  k * 4 * numel(x)

(the last term is the final fp32 samples ``x0`` of the kept trajectories). ``max_bytes`` is checked after the
first model call, when the feature shapes are known, before anything is stored.

``storage=FOLDER`` keeps the trace on disk instead of in memory (LDM-4 ImageNet's full trace is ~50 GB of
features): every tensor is a ``.npy`` file, memory-mapped, written as the sampler runs
and read back step by step by the fitting stages, so the memory a fit needs no longer grows with ``keep`` or the
step count -- every trajectory can be kept and every statistic (DPS distances, DEC moments, calibration) is
computed over all of them. The folder appears only when the trace is complete (written next to it, then renamed);
`Trace.open` reads it again, so one recorded trace serves many fits.

Features come through the UNet's explicit `CacheView` slot (no forward hooks are needed for named points).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.unet import check_cacheable
from ..core.view import CacheView
from ..errors import ConfigError, InputShapeError, TraceBudgetError, TraceStorageError
from ..io import atomic_dir, fingerprint
from ..sampling.adapter import FullPrecision
from ..sampling.ddim import ddim, resolve_noise_schedule
from ..sampling.guidance import check_guidance, guided
from ..sampling.model import SamplerModel
from ..sampling.noise import NoiseSchedule, check_steps
from ..sampling.samplers import model_calls, settings_of_call
from ..sampling.seeded import seeded_noise
from ..sampling.settings import SamplerSettings


__all__ = ["Trace", "trace", "seeded_noise"]

Observer = Callable[[int, Tensor, Tensor, Any, dict[str, Tensor]], None]


@dataclass
class Trace:
    """Recorded full-precision trajectories (tensors are on CPU).

    Attributes:
        timesteps: ``[T]`` model timestep of each sampler step (step 0 = noisiest).
        x: ``[T, k, *sample]`` model input at each step for the kept trajectories (guided traces: ``k`` is twice
            the kept trajectories, rows ``2i`` / ``2i + 1`` their unconditional / conditional halves).
        cond: ``[T, k, *cond]`` conditioning, or None for unconditional models.
        features: point -> ``[T, k, *feature]`` feature entering that cache point (full, no-cache forward).
        x0: ``[k, *sample]`` final samples of the kept trajectories (fp32).
        sample_ids: which of the ``num_samples`` trajectories were kept (their seeds are ``seed + id``).
        sampler: sampler settings used (name, steps, spacing, eta, seed, num_samples).
        seeds: the initial-noise seeds of all ``num_samples`` trajectories (kept or only observed). A model fitted
            on this trace carries them, and `cq.evaluate` refuses to measure it on any of them.
        base_fingerprint: `cq.io.fingerprint` of the UNet the trace was recorded from; `Recipe.fit` refuses to
            fit another UNet on it ("" for traces built by hand: not checked).
        settings: how the trajectories were sampled (`SamplerSettings`: sampler, steps, spacing, eta, clip_x0,
            timestep of every call); a model fitted on the trace must be sampled the same way. None for traces
            built by hand or recorded with a sampler other than cq's ``ddim`` / ``plms`` (then only the call
            count is checked).
        guidance_scale: the classifier-free guidance scale of the run (1: unguided, one row per trajectory).
    """

    timesteps: Tensor
    x: Tensor
    cond: Tensor | None
    features: dict[str, Tensor]
    x0: Tensor
    sample_ids: Tensor
    sampler: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    base_fingerprint: str = ""
    settings: SamplerSettings | None = None
    guidance_scale: float = 1.0

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def points(self) -> tuple[str, ...]:
        return tuple(self.features)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (in memory, or on disk for a trace with ``storage``)."""
        tensors = [self.x, self.x0, *self.features.values()] + ([self.cond] if self.cond is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def open(cls, folder: str | Path) -> Trace:
        """A trace written with ``cq.trace(..., storage=folder)``, its tensors memory-mapped from the folder
        (copy-on-write: nothing a caller does changes the files)."""
        folder = Path(folder)
        meta_file = folder / _TRACE_META
        if not meta_file.is_file():
            why = "is not a folder" if not folder.is_dir() else f"holds no {_TRACE_META} (not a complete cq trace)"
            raise TraceStorageError(f"{folder} {why}; record one with cq.trace(..., storage={str(folder)!r})")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            if meta.get("format") != _TRACE_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, this cq reads format {_TRACE_FORMAT}")
            names, points = list(meta["arrays"]), list(meta["points"])
            allowed = {"x", "x0", "cond", *(f"feature{i}" for i in range(len(points)))}
            if not {"x", "x0"} <= set(names) <= allowed:
                raise ValueError(f"arrays {names} are not a trace's (x, x0, cond, feature0..{len(points) - 1})")
            arrays = {name: _open_array(folder / f"{name}.npy") for name in names}
            steps_rows = tuple(arrays["x"].shape[:2])
            wrong = [n for n in names if n != "x0" and tuple(arrays[n].shape[:2]) != steps_rows]
            if wrong or steps_rows[0] != len(meta["timesteps"]):
                raise ValueError(
                    f"arrays {wrong or ['x']} do not match x's [steps, rows] {steps_rows} and the timesteps"
                )
            settings = SamplerSettings.from_dict(meta["settings"]) if meta["settings"] is not None else None
            return cls(
                timesteps=torch.tensor(meta["timesteps"], dtype=torch.long),
                x=arrays["x"],
                cond=arrays.get("cond"),
                features={p: arrays[f"feature{i}"] for i, p in enumerate(points)},
                x0=arrays["x0"],
                sample_ids=torch.tensor(meta["sample_ids"], dtype=torch.long),
                sampler=dict(meta["sampler"]),
                seeds=tuple(int(s) for s in meta["seeds"]),
                base_fingerprint=str(meta["base_fingerprint"]),
                settings=settings,
                guidance_scale=float(meta["guidance_scale"]),
            )
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise TraceStorageError(f"{folder} is not a readable cq trace: {type(e).__name__}: {e}") from None

    def _write_meta(self, folder: Path, arrays: Sequence[str]) -> None:
        meta = {
            "format": _TRACE_FORMAT,
            "arrays": list(arrays),
            "points": list(self.features),
            "timesteps": self.timesteps.tolist(),
            "sample_ids": self.sample_ids.tolist(),
            "sampler": self.sampler,
            "seeds": list(self.seeds),
            "base_fingerprint": self.base_fingerprint,
            "settings": self.settings.to_dict() if self.settings is not None else None,
            "guidance_scale": self.guidance_scale,
        }
        (folder / _TRACE_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    @staticmethod
    def estimate_bytes(
        *,
        steps: int,
        keep: int,
        sample_shape: Sequence[int],
        feature_shapes: dict[str, Sequence[int]],
        cond_shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> int:
        """Bytes a trace of these sizes stores (the formula in the module docstring)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_step = math.prod(sample_shape) + sum(math.prod(s) for s in feature_shapes.values())
        if cond_shape is not None:
            per_step += math.prod(cond_shape)
        return steps * keep * itemsize * per_step + keep * 4 * math.prod(sample_shape)


class _Recorder(SamplerModel):
    """Sampler-facing adapter: runs the full UNet, stores the kept rows of each call, feeds the observers.

    ``batch`` is the number of trajectories the sampler runs; ``guided``: every call carries the pooled batch
    ``[uncond; cond]`` of `ClassifierFreeGuidance` and both halves of each kept row are stored, interleaved."""

    def __init__(self, unet: nn.Module, owner: _TraceBuilder, keep_rows: Tensor, *, batch: int, guided: bool):
        super().__init__(noise_schedule=unet.noise_schedule)
        self.unet = unet
        self.owner = owner
        self.batch = batch
        self.guided = guided
        self.keep_rows = torch.stack([keep_rows, keep_rows + batch], 1).flatten() if guided else keep_rows

    def forward(self, x: Tensor, t: Tensor, cond: Any = None, *, step: int) -> Tensor:
        expected = 2 * self.batch if self.guided else self.batch
        if x.shape[0] != expected:
            hint = (
                "the sampler doubled the batch (classifier-free guidance inside the sampler?): pass "
                "guidance_scale= and uncond= to cq.trace instead, so both halves are recorded"
                if x.shape[0] == 2 * self.batch
                else "the sampler must call the model on its whole batch"
            )
            raise ConfigError(
                f"cq.trace: the model was called with {x.shape[0]} rows for {self.batch} trajectories; {hint}"
            )
        view = CacheView.full(record=self.owner.points)
        eps = self.unet(x, t, cond, cache=view)
        missing = set(self.owner.points) - set(view.features)
        if missing:
            raise ConfigError(f"the UNet did not pass cache point(s) {sorted(missing)} during a full forward")
        for observer in self.owner.observers:
            observer(step, x, t, cond, view.features)
        self.owner.store(step, t, x, cond, view.features, self.keep_rows)
        return eps


_TRACE_META = "trace.json"
_TRACE_FORMAT = 1
_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
}


def _open_array(path: Path) -> Tensor:
    return torch.from_numpy(np.load(path, mmap_mode="c"))


class _TraceBuilder:
    """Pre-allocated storage filled batch by batch (internal to `trace`): tensors in memory, or memory-mapped
    ``.npy`` files in ``folder``."""

    def __init__(self, *, steps, keep, points, observers, dtype, max_bytes, folder=None):
        self.steps, self.keep, self.points = steps, keep, tuple(points)
        self.observers, self.dtype, self.max_bytes = list(observers), dtype, max_bytes
        self.folder: Path | None = folder
        self.arrays: dict[str, Tensor] = {}  # name (on disk: the file name) -> tensor
        self.maps: list[np.memmap] = []
        self.offset = 0  # index of the first kept row of the current batch in the storage
        self.x = self.cond = None
        self.features: dict[str, Tensor] = {}
        self.timesteps = torch.full((steps,), -1, dtype=torch.long)

    def allocate(self, x: Tensor, cond: Any, features: dict[str, Tensor]) -> None:
        cond_shape = tuple(cond.shape[1:]) if isinstance(cond, Tensor) else None
        need = Trace.estimate_bytes(
            steps=self.steps,
            keep=self.keep,
            sample_shape=x.shape[1:],
            feature_shapes={p: f.shape[1:] for p, f in features.items()},
            cond_shape=cond_shape,
            dtype=self.dtype,
        )
        if self.max_bytes is not None and need > self.max_bytes:
            raise TraceBudgetError(
                f"trace would store {need / 2**20:.1f} MiB > max_bytes={self.max_bytes / 2**20:.1f} MiB "
                f"(steps={self.steps}, keep={self.keep}, points={list(self.points)}); "
                "lower keep or record fewer points"
            )
        self.x = self.empty("x", (self.steps, self.keep, *x.shape[1:]), self.dtype)
        if cond_shape is not None:
            self.cond = self.empty("cond", (self.steps, self.keep, *cond_shape), cond.dtype)
        self.features = {  # in the order the caller asked for
            p: self.empty(f"feature{i}", (self.steps, self.keep, *features[p].shape[1:]), self.dtype)
            for i, p in enumerate(self.points)
        }

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A tensor of ``shape`` in memory, or a memory-mapped ``name.npy`` in the storage folder."""
        if self.folder is None:
            tensor = torch.empty(shape, dtype=dtype)
        else:
            if dtype not in _NUMPY_DTYPES:
                raise TraceStorageError(
                    f"a trace on disk stores float32, float16 or integer tensors, not {dtype}: use "
                    "dtype=torch.float16 or torch.float32 with storage="
                )
            array = np.lib.format.open_memmap(self.folder / f"{name}.npy", "w+", _NUMPY_DTYPES[dtype], shape)
            self.maps.append(array)
            tensor = torch.from_numpy(array)
        self.arrays[name] = tensor
        return tensor

    def flush(self) -> None:
        """Write the memory-mapped files' pages out (before the folder is synced and renamed)."""
        for array in self.maps:
            array.flush()

    def store(self, step, t, x, cond, features, rows) -> None:
        if self.x is None:
            self.allocate(x, cond, features)
        self.timesteps[step] = int(t[0])
        if len(rows) == 0:
            return
        dst = slice(self.offset, self.offset + len(rows))
        self.x[step, dst] = x[rows].to(self.dtype).cpu()
        if self.cond is not None:
            self.cond[step, dst] = cond[rows].cpu()
        for p, f in features.items():
            self.features[p][step, dst] = f[rows].to(self.dtype).cpu()


@torch.no_grad()
def trace(
    unet: nn.Module,
    sampler: Callable[..., Tensor] = ddim,
    *,
    steps: int,
    num_samples: int,
    points: Sequence[str] = (),
    keep: int | None = None,
    batch_size: int = 32,
    cond: Tensor | None = None,
    seed: int = 0,
    noise: NoiseSchedule | None = None,
    dtype: torch.dtype = torch.float32,
    max_bytes: int | None = None,
    observers: Sequence[Observer] = (),
    guidance_scale: float = 1.0,
    uncond: Tensor | None = None,
    storage: str | Path | None = None,
    progress: bool = True,
    **sampler_kwargs: Any,
) -> Trace:
    """Sample ``num_samples`` trajectories with the full-precision ``unet`` and record them.

    Args:
        unet: a cq UNet (takes ``cache=``); it is run as is, in full precision, without caching.
        sampler: a cq sampler (`cq.sampling.ddim`); ``sampler_kwargs`` (spacing, eta, ...) go to it.
        steps: sampler steps. The trace records one entry per model call (``sampler.num_calls(steps)`` when the
            sampler defines it, e.g. PLMS: steps + 1), which is what a `CompressedUNet` counts as its steps.
        num_samples: trajectories to run; trajectory ``i`` starts from noise seeded with ``seed + i``.
        points: cache points whose features are recorded (see ``unet.cache_points()``).
        keep: trajectories stored at every step (default: all); the rest only feed ``observers``.
        batch_size: trajectories sampled together.
        cond: ``[num_samples, ...]`` conditioning, or None.
        seed: base seed of the initial noise, drawn per trajectory (independent of batching); with ``eta > 0``
            the sampler's noise is drawn per batch, so those traces also depend on ``batch_size``.
        noise: the model's noise schedule (default ``unet.noise_schedule``).
        dtype: storage dtype of x and features (float16 halves the memory).
        max_bytes: refuse (`TraceBudgetError`) a trace that would store more than this.
        observers: ``fn(step, x, t, cond, features)`` called for every batch (for streamed statistics).
        guidance_scale, uncond: classifier-free guidance (`ClassifierFreeGuidance`) with the unconditional
            ``uncond`` (``[1, ...]`` or ``[num_samples, ...]``). With a scale other than 1 every model call runs on
            the pooled batch ``[uncond; cond]`` and the trace stores both halves of each kept trajectory: rows
            ``2i`` and ``2i + 1`` are its unconditional and conditional rows (CacheQuant fits DPS, the activation
            tables and DEC on the pooled batch a guided sampler feeds the model).
        storage: a folder (it must not exist) to keep the trace in, memory-mapped, instead of memory (module
            docstring); it appears only once the trace is complete. ``Trace.open(folder)`` reads it again.
        progress: show a progress bar over batches.
    """
    check_steps(steps)
    if num_samples < 1 or batch_size < 1:
        raise ConfigError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    keep = num_samples if keep is None else keep
    if not 0 <= keep <= num_samples:
        raise ConfigError(f"keep must be in [0, num_samples={num_samples}], got {keep}")
    known = set(check_cacheable(unet, "cq.trace").cache_points())
    unknown = [p for p in points if p not in known]
    if unknown:
        raise ConfigError(f"unknown cache point(s) {unknown}; the UNet exposes {sorted(known)}")
    if cond is not None and (not isinstance(cond, Tensor) or cond.shape[0] != num_samples):
        raise InputShapeError(f"cond must be a tensor with first dimension num_samples={num_samples}")
    is_guided = check_guidance(guidance_scale, uncond, cond)
    sample_shape = tuple(unet.sample_shape)

    # The same `keep` trajectories, spread evenly over the run, are stored at every step.
    kept = (
        torch.linspace(0, num_samples - 1, keep).round().long().unique() if keep else torch.zeros(0, dtype=torch.long)
    )
    # one record per model call: PLMS calls the model twice at its first step (sampler.num_calls)
    calls = model_calls(sampler, steps)
    halves = 2 if is_guided else 1  # guided: rows 2i, 2i + 1 = unconditional, conditional half of trajectory i
    if storage is not None and Path(storage).exists():
        raise TraceStorageError(
            f"{storage} exists already: a trace is written to a new folder (Trace.open({str(storage)!r}) reads a "
            "finished one; delete or rename it to record again)"
        )
    with atomic_dir(storage) if storage is not None else contextlib.nullcontext() as folder:
        builder = _TraceBuilder(
            steps=calls,
            keep=halves * len(kept),
            points=points,
            observers=observers,
            dtype=dtype,
            max_bytes=max_bytes,
            folder=folder,
        )
        x0 = builder.empty("x0", (len(kept), *sample_shape), torch.float32)
        device = next(unet.parameters()).device
        batches = range(0, num_samples, batch_size)
        for start in tqdm(batches, desc="trace", disable=not progress, unit="batch"):
            ids = torch.arange(start, min(start + batch_size, num_samples))
            rows = torch.nonzero(torch.isin(ids, kept)).flatten()
            first = int(torch.searchsorted(kept, ids[0])) if len(kept) else 0
            builder.offset = halves * first
            x = seeded_noise(sample_shape, [seed + int(i) for i in ids]).to(device)
            batch_cond = cond[ids].to(device) if cond is not None else None
            generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
            recorder = _Recorder(unet, builder, rows.to(device), batch=len(ids), guided=is_guided)
            out = sampler(
                guided(recorder, guidance_scale, uncond, ids),
                x,
                steps=steps,
                cond=batch_cond,
                noise=noise,
                generator=generator,
                **sampler_kwargs,
            )
            x0[first : first + len(rows)] = out[rows].float().cpu()
        result = Trace(
            timesteps=builder.timesteps,
            x=builder.x,
            cond=builder.cond,
            features=builder.features,
            x0=x0,
            sample_ids=kept,
            sampler={
                "name": getattr(sampler, "__name__", str(sampler)),
                "steps": steps,
                "seed": seed,
                "num_samples": num_samples,
                **{k: v for k, v in sampler_kwargs.items() if _is_plain(v)},
            },
            seeds=tuple(range(seed, seed + num_samples)),
            guidance_scale=float(guidance_scale),
            base_fingerprint=fingerprint(unet),
            settings=_recorded_settings(
                sampler, steps, resolve_noise_schedule(FullPrecision(unet), noise), builder.timesteps, sampler_kwargs
            ),
        )
        if folder is not None:
            builder.flush()
            result._write_meta(folder, list(builder.arrays))
    return Trace.open(storage) if storage is not None else result


def _recorded_settings(sampler, steps, noise, timesteps: Tensor, kwargs: dict) -> SamplerSettings | None:
    settings = settings_of_call(sampler, steps, noise.num_timesteps, kwargs)
    if settings is not None and list(settings.timesteps) != timesteps.tolist():  # a sampler bug, not user input
        raise AssertionError(f"recorded timesteps {timesteps.tolist()} differ from planned {settings.timesteps}")
    return settings


def _is_plain(v: Any) -> bool:
    return isinstance(v, int | float | str | bool) or v is None
