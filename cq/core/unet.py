"""`CacheableUNet`: the contract between a diffusion UNet and cq's cachers, quantizers, tracer and report.

A cacheable UNet names its cut points (DeepCache, Ma et al. CVPR 2024: the feature entering a decoder block) and
takes them through one explicit slot, ``forward(x, t, cond, cache=CacheView)``: a full call records the features
the view asks for, a shallow call runs only the encoder prefix and decoder suffix around the view's point and
reads the stored feature there. `DDPMUNet` and `LDMUNet` implement it; subclass it to bring another UNet.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..errors import CachePointError, ConfigError, InputShapeError, InputValueError


if TYPE_CHECKING:
    from ..sampling.noise import NoiseSchedule
    from .view import CacheView

__all__ = ["CacheableUNet", "PresetInfo", "check_cacheable", "check_model_inputs", "check_timestep_values"]


@runtime_checkable
class PresetInfo(Protocol):
    """What is read of the preset a UNet was built from; `cq.models.Preset` is one. (A protocol, so that the UNet
    modules need not import the preset table that builds them.)"""

    @property
    def name(self) -> str: ...

    @property
    def sampling(self) -> dict[str, Any]: ...


class CacheableUNet(nn.Module, metaclass=ABCMeta):
    """A UNet with named cache points and a `CacheView` slot.

    Args:
        noise_schedule: the betas it was trained with (the samplers' default), or None.
        preset: the `Preset` it was built from (sampling defaults, saved name), or None.

    Every call checks its input at the entry (`_check_timesteps`): ``x`` on the weights' device and in their dtype
    (under ``torch.autocast`` any float dtype), timesteps finite and in the noise schedule's ``[0, T)``. The checks
    read one reduction of ``t``; set ``check_inputs = False`` to skip them, and they are skipped inside compiled
    graphs (``torch.compiler.is_compiling()``), where a data-dependent branch would break the graph.
    """

    #: check x's device / dtype and t's values at every call (see the class docstring)
    check_inputs: bool = True

    def __init__(self, *, noise_schedule: NoiseSchedule | None = None, preset: PresetInfo | None = None):
        super().__init__()
        from ..sampling.noise import NoiseSchedule

        if noise_schedule is not None and not isinstance(noise_schedule, NoiseSchedule):
            raise ConfigError(f"noise_schedule must be a NoiseSchedule or None, got {type(noise_schedule).__name__}")
        if preset is not None and not isinstance(preset, PresetInfo):
            raise ConfigError(
                f"preset must be a cq.models.Preset (name, sampling defaults) or None, got {type(preset).__name__}"
            )
        self.noise_schedule = noise_schedule
        self.preset = preset

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input sample ``(C, H, W)``."""

    @abstractmethod
    def cache_points(self) -> tuple[str, ...]:
        """Names of the cut points, deepest first."""

    @abstractmethod
    def default_cache_point(self) -> str:
        """The point `cq.cache.DeepCache` caches when none is given; one of `cache_points`."""

    @abstractmethod
    def cache_consumer(self, point: str) -> str:
        """Name of the block that consumes ``cat(cached, skip)`` at ``point``."""

    @abstractmethod
    def cache_channels(self, point: str) -> int:
        """Channels of the cached tensor at ``point``."""

    @abstractmethod
    def concat_splits(self) -> dict[str, int]:
        """Modules whose input is ``cat(h, skip)`` along channels -> channel count of ``h`` (split quantization)."""

    @abstractmethod
    def io_layers(self) -> tuple[str, ...]:
        """The layers reading ``x_t`` and writing the model output (kept float by
        `cq.quant.UniformQuantizer.float_io`)."""

    @abstractmethod
    def forward(self, x: Tensor, t: Tensor, cond: Any = None, *, cache: CacheView | None = None) -> Tensor:
        """The model output for ``x_t`` at timesteps ``t``; ``cache`` records features or runs a shallow call."""

    def example_cond(self, batch: int = 1) -> Tensor | None:
        """A conditioning input of the right kind (for counting MACs); None for unconditional models."""
        return None

    # ------------------------------------------------------------------------------------------------------------
    # Input checks shared by the implementations

    def _check_point(self, point: str) -> None:
        if point not in self.cache_points():
            raise CachePointError(f"unknown cache point {point!r}; this UNet exposes {list(self.cache_points())}")

    def _check_timesteps(self, t: Tensor, batch: int, x: Tensor | None = None) -> Tensor:
        """``t`` of shape ``[batch]`` (a scalar is broadcast); with ``check_inputs`` (outside compiled graphs) also
        ``x``'s device and dtype against the weights' and ``t``'s values (`check_timestep_values`)."""
        if not isinstance(t, Tensor):
            raise InputShapeError(f"t must be a tensor of timesteps, got {type(t).__name__}")
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise InputShapeError(f"t must be a scalar or have shape [{batch}] (one per sample), got {tuple(t.shape)}")
        if not self.check_inputs or torch.compiler.is_compiling():
            return t
        schedule = self.noise_schedule
        check_model_inputs(x, t, schedule.num_timesteps if schedule is not None else None, self)
        return t

    def _check_cache(self, cache: CacheView | None) -> None:
        """Every point ``cache`` records or reads is one of this UNet's."""
        if cache is None:
            return
        for point in cache.record:
            self._check_point(point)
        if cache.is_shallow:
            self._check_point(cache.read)

    def _cached(self, cache: CacheView, batch: int) -> Tensor:
        """The stored feature a shallow call reads, checked against the point's batch and channels."""
        h = cache.cached()
        want = (batch, self.cache_channels(cache.read))
        if tuple(h.shape[:2]) != want:
            raise InputShapeError(
                f"cached feature at {cache.read!r} has shape {tuple(h.shape)}; "
                f"expected [{want[0]}, {want[1]}, ...] (same batch as x)"
            )
        return h


def check_model_inputs(x: Tensor | None, t: Tensor, num_timesteps: int | None, model: nn.Module) -> None:
    """The input check of every cq UNet call (the base UNets' and `CompressedUNet`'s): ``x`` on ``model``'s
    device and in its weights' float dtype (any float dtype under ``torch.autocast``), then
    `check_timestep_values`. A meta ``x`` passes only into a meta model (counting MACs without data)."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if x is not None and weight is not None:
        if x.device != weight.device:
            held = " (meta tensors hold no data)" if x.device.type == "meta" else ""
            raise InputShapeError(
                f"x is on {x.device}{held}, the model's weights on {weight.device}: pass x.to({str(weight.device)!r})"
            )
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise InputShapeError(
                f"x is {x.dtype}, the model's weights are {weight.dtype}: pass x.to({weight.dtype}), or convert the "
                f"model with .to({x.dtype}) (float16 / bfloat16 run on a GPU), or run under torch.autocast"
            )
    if t.device.type == "meta" and (weight is None or weight.device.type == "meta"):
        return
    check_timestep_values(t, num_timesteps)


def check_timestep_values(t: Tensor, num_timesteps: int | None) -> None:
    """Refuse timesteps a model cannot take instead of returning finite-looking output for them: NaN / inf, and
    values outside ``[0, num_timesteps)`` (``num_timesteps`` None: only negative ones). One reduction of ``t``."""
    if not t.numel():
        return
    if t.device.type == "meta":
        raise InputShapeError(
            f"t is on the meta device (it holds no data): pass t.to({'cpu'!r}) or the model's device"
        )
    lo, hi = torch.stack(torch.aminmax(t.detach().flatten())).double().tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputValueError(
            "t contains NaN or inf; pass integer timesteps in [0, T) (the sampler state or a timestep computation "
            "went wrong upstream)"
        )
    if lo < 0 or (num_timesteps is not None and hi >= num_timesteps):
        limit = "" if num_timesteps is None else f", {num_timesteps}"
        raise InputValueError(
            f"timesteps must lie in [0{limit}) for this model's noise schedule, got {lo:g}..{hi:g}; pass timesteps "
            "of the schedule the model was trained with (t = 0 is the least noisy)"
        )


def check_cacheable(obj: object, who: str) -> CacheableUNet:
    """``obj`` if it is a `CacheableUNet`; else a `ConfigError` saying what ``who`` needs."""
    if isinstance(obj, CacheableUNet):
        return obj
    kind = type(obj)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    raise ConfigError(
        f"{who} needs a cq UNet (a cq.models.CacheableUNet subclass: named cache points and a `cache=` slot), "
        f"got {name}; build one with cq.models.build/load or subclass CacheableUNet"
    )
