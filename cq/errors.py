"""Errors raised by cq.

Every message says what was expected, what was received, and what to do about it. Catch `CqError` to catch
them all; the subclasses name the failing operation (flax style: <Object><Problem>Error).
"""

from __future__ import annotations


__all__ = [
    "CqError",
    "CheckpointError",
    "CheckpointKeyMismatchError",
    "CheckpointFormatError",
    "CheckpointValueError",
    "CheckpointWriteError",
    "UnsafeCheckpointError",
    "ConfigError",
    "StrategyNotRegisteredError",
    "ModelFamilyNotRegisteredError",
    "ScheduleInvalidError",
    "StepNotSetError",
    "StepCountMismatchError",
    "SamplerMismatchError",
    "TimestepNotFittedError",
    "AmbiguousTimestepError",
    "CacheEmptyError",
    "CachePointError",
    "InputShapeError",
    "InputValueError",
    "TraceBudgetError",
    "TraceStorageError",
    "BudgetError",
    "CalibrationSeedsError",
    "ReferenceMismatchError",
    "SampleFolderError",
    "SampleSettingsMismatchError",
    "ImageSetError",
    "ReferenceStatsError",
    "MetricUnavailableError",
    "BackendUnavailableError",
    "ExportUnsupportedError",
]


class CqError(Exception):
    """Base class of every error cq raises on purpose."""


class ConfigError(CqError, ValueError):
    """A strategy, preset or model configuration holds an invalid value.

    Example: ``UniformSchedule(interval=0)`` -> "interval must be >= 1, got 0".
    """


class CheckpointError(CqError):
    """Base class for checkpoint loading problems."""


class CheckpointKeyMismatchError(CheckpointError, KeyError):
    """A state dict does not fit the model: missing keys, unexpected keys or wrong shapes.

    The message lists the offending keys (first 20 of each kind) so a wrong preset or a wrong key layout
    (original vs diffusers) is visible at once. Fix: pick the preset that matches the checkpoint, or pass
    ``format="diffusers"`` / ``format="original"``.
    """

    def __init__(
        self,
        *,
        missing: list[str] = (),
        unexpected: list[str] = (),
        shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
        hint: str = "",
    ):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.shape_mismatch = list(shape_mismatch)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {_head(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): {_head(self.unexpected)}")
        if self.shape_mismatch:
            shown = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatch[:20]]
            parts.append(f"{len(self.shape_mismatch)} shape mismatch(es): {shown}")
        message = "checkpoint does not match the model; " + "; ".join(parts)
        if hint:
            message += f". {hint}"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class CheckpointFormatError(CheckpointError, ValueError):
    """The file is not a readable checkpoint (truncated, wrong format, or no state dict inside)."""


class CheckpointValueError(CheckpointFormatError):
    """The file reads, but its tensors hold what the model cannot use: integer tensors for float parameters (they
    would be cast silently), NaN or inf weights (every output would be NaN). The message names the tensors; the
    non-finite check has an opt-out (``check_finite=False``) for files known to carry such values on purpose."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a file failed (disk full, no permission, read-only file system). An `OSError` with the original
    ``errno`` (``errno.ENOSPC`` for a full disk), so scripts can catch either; the target is left untouched."""

    def __str__(self) -> str:  # the message names the file already
        return str(self.strerror)


class UnsafeCheckpointError(CheckpointError):
    """The pickle asks to run code that `torch.load(weights_only=True)` refuses.

    Fix: convert the file to safetensors, or pass ``trust_pickle=True`` if, and only if, you trust its source.
    """


class StrategyNotRegisteredError(CqError, KeyError):
    """`from_dict` or the CLI met a strategy name no registry knows."""

    def __str__(self) -> str:
        return self.args[0]


class ModelFamilyNotRegisteredError(ConfigError):
    """A saved model or a config names a model family that is not registered, or a UNet to save is of an
    unregistered class. Fix: import the module that registers it (``@cq.models.register_family``) or pass
    ``--plugin MODULE`` on the command line."""


class PluginError(CqError, ImportError):
    """A plugin module (``--plugin``) or a ``cq.strategies`` entry point could not be imported."""


class ScheduleInvalidError(CqError, ValueError):
    """A cache schedule returned a mask that breaks the contract (length, first step refreshed)."""


class StepNotSetError(CqError, RuntimeError):
    """A per-step module was called outside `cq.step_scope(step)`.

    Call the model through `CompressedUNet.forward(x, t, cond, step=i)` (the samplers do), which sets the step.
    """


class StepCountMismatchError(CqError, ValueError):
    """A model fitted for T sampling steps was asked to run with a different number of steps."""


class SamplerMismatchError(StepCountMismatchError):
    """A fitted model was sampled with other settings (sampler, steps, spacing, eta, clip_x0, timesteps) than the
    trace it was fitted on; see `cq.sampling.SamplerSettings`."""


class TimestepNotFittedError(SamplerMismatchError):
    """A fitted model was called without ``step=`` at a timestep its sampler settings never visit (another step
    count, spacing or scheduler than it was fitted for). Fix: sample with the fitted settings, or refit on a trace of
    the scheduler you use."""


class AmbiguousTimestepError(SamplerMismatchError):
    """A fitted model was called without ``step=`` at a timestep two of its calls share (PLMS / PNDM call the model
    twice at their second timestep); pass ``step=`` (the model-call index)."""


class CacheEmptyError(CqError, RuntimeError):
    """A shallow (cached) forward was requested but no feature is in the cache for that point."""


class CachePointError(CqError, KeyError):
    """A cache point name that the UNet does not expose."""

    def __str__(self) -> str:
        return self.args[0]


class InputShapeError(CqError, ValueError):
    """A tensor passed to a model or sampler has the wrong shape or dtype."""


class InputValueError(CqError, ValueError):
    """A tensor passed to a model holds values it cannot take: timesteps outside ``[0, T)``, NaN or inf."""


class TraceBudgetError(CqError, ValueError):
    """A trace would need more memory than the budget the caller allowed."""


class TraceStorageError(CqError, ValueError):
    """A trace folder (``cq.trace(storage=...)`` / `Trace.open`) cannot be written or read: it exists already, it is
    incomplete (its writer did not finish), or it is not a trace folder."""


class BudgetError(CqError, ValueError):
    """No candidate setting meets the compute budget asked for (e.g. `cq.choose_point`'s ``min_speedup``)."""


class CalibrationSeedsError(CqError, ValueError):
    """Quality was asked for on seeds the model was calibrated on; `cq.evaluate` measures held-out seeds only."""


class ReferenceMismatchError(CqError, ValueError):
    """The full-precision reference is not the model a compressed model was fitted on (architecture or weights)."""


class SampleFolderError(CqError, ValueError):
    """A sample folder (``cq sample --out DIR``) cannot be used: not a folder, a folder of something else, an
    unreadable manifest or shard, or a run that is not finished yet (`cq.sampling.shards.read_samples`)."""


class SampleSettingsMismatchError(SampleFolderError):
    """A sample folder holds a run with other settings (model, seeds, shard size, sampler, conditions): resuming
    into it would mix two runs. Fix: the same command as the first run, or a new ``--out`` folder."""


class ImageSetError(CqError, ValueError):
    """A sample set (``cq eval`` input or reference) cannot be read as images: no images, an unreadable file,
    another layout than uint8 ``[N, H, W, C]`` under ``arr_0``, or images of different sizes."""


class ReferenceStatsError(CqError, ValueError):
    """A reference-statistics file (``cq eval --ref``) is unreadable or does not hold ``mu`` ``[D]`` and ``sigma``
    ``[D, D]`` of the feature extractor in use. Fix: rebuild it with ``cq eval --make-ref IMAGES -o ref.npz``."""


class MetricUnavailableError(CqError, RuntimeError):
    """A metric cannot be computed here: its optional dependency is not installed (``pip install cq[eval]``), its
    feature-extractor weights are missing, or no library cq trusts provides it (sFID)."""


_IN_FILE: dict[type, type] = {}


def in_file(error: CqError, message: str) -> CheckpointError:
    """``error`` (raised while rebuilding what a file describes) as an error of the file, keeping its class: the
    result is a `CheckpointFormatError` *and* an instance of ``error``'s class (a `StrategyNotRegisteredError`
    still tells the user to pass ``--plugin``), carrying ``message``. Checkpoint errors are returned as they are."""
    if isinstance(error, CheckpointError):
        return error
    kind = type(error)
    if kind not in _IN_FILE:
        _IN_FILE[kind] = type(kind.__name__, (kind, CheckpointFormatError), {"__module__": kind.__module__})
    return _IN_FILE[kind](message)


def _head(keys: list[str], n: int = 20) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


class BackendUnavailableError(CqError, RuntimeError):
    """An execution backend cannot run here: its package is not installed, or it has no exact fast path on this
    CPU. The message names the package to install (e.g. ``pip install 'cq[openvino]'``) or the backend to ask for."""


class ExportUnsupportedError(CqError, ValueError):
    """A model holds something its lowering to an inference runtime cannot express; the message names the layer,
    why, and the option that falls back (e.g. ``fallback=True``) where one exists."""
