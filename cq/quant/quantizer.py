"""`Quantizer`: post-training quantization by module replacement, in three explicit phases.

1. `prepare` (on a deep copy; the input UNet is untouched): every float layer of `cq.quant.layer_table`
   (``nn.Conv2d``, ``nn.Conv1d``, ``nn.Linear``, `MatMul`) whose fully-qualified name matches ``include`` and none
   of ``skip`` (fnmatch patterns) becomes its fake-quant class (`QConv2d`, ...) with its weight quantized; concat
   inputs (``unet.concat_splits()``) get split activation quantizers.
2. `calibrate`: run the strategy's calibration batches from a full-precision `Trace` *on the cached model* --
   refresh steps through the full network, cached steps through the shallow path fed with the full-precision
   cached feature of their refresh step (CacheQuant §4.3) -- while scoped hooks record activation ranges.
3. `convert`: write the ranges into the quantizers (unobserved steps take the nearest observed step).

Strategies (`cq.quant.UniformQuantizer`, `cq.quant.PTQ4DM`) choose the specs and the calibration batches.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..calib.replay import CalibrationBatch, replay
from ..core.unet import check_cacheable
from ..errors import ConfigError
from .adaround import adaround_round
from .calibrate import RangeTables, observe
from .gptq import apply_gptq, apply_rounding, record_hessians
from .layer_table import FLOAT_TO_FAKE, fake_quant_classes
from .modules import ActQuantizer
from .spec import QuantSpec


if TYPE_CHECKING:
    from ..cache.cacher import Cacher, FeatureCache
    from ..calib.trace import Trace

__all__ = ["Quantizer", "CalibrationBatch", "quantized_modules", "set_submodule", "WEIGHT_ROUNDINGS"]

#: the ``weight_rounding`` names (`Quantizer.rounding`)
WEIGHT_ROUNDINGS = ("nearest", "gptq", "adaround", "auto")


class Quantizer(ABC):
    """Base class of quantization strategies (register subclasses with ``@QUANTIZERS.register(name)``).

    Subclasses are frozen dataclasses with ``include`` / ``skip`` pattern fields and implement `specs` and
    `calibration_batches`.
    """

    registry_kind: ClassVar[str] = "quantizer"  # the registry its subclasses register in
    #: 2: float_io (input and output layers stay float); 3: split_weights; 4: weight_rounding (GPTQ below 8 bits);
    #: 5: activation_tables (one range per cache group as an option)
    VERSION: ClassVar[int] = 5
    include: tuple[str, ...]
    skip: tuple[str, ...]
    #: keep the UNet's input and output layers (``unet.io_layers()``) in float; subclasses may make it a field
    float_io: bool = True
    #: quantize the two input halves of a split conv's weight separately (CacheQuant); subclasses may make it a field
    split_weights: bool = True
    #: ``"nearest"`` (round each weight to nearest), ``"gptq"`` (`cq.quant.gptq`: round for the output error on
    #: the calibration inputs), ``"adaround"`` (`cq.quant.adaround`: learned up / down rounding for the same error;
    #: below 8 bits only) or ``"auto"`` (GPTQ for weights below 8 bits); subclasses may make it a field
    weight_rounding: str = "nearest"
    #: per-step activation quantizers: ``"per_step"`` (one range per sampling step, CacheQuant) or ``"per_group"``
    #: (one range per cache group -- the steps sharing a refresh -- written into each of its steps: the union of
    #: the group's per-step ranges); subclasses may make it a field
    activation_tables: str = "per_step"

    @abstractmethod
    def specs(self, name: str, module: nn.Module) -> tuple[QuantSpec | None, QuantSpec]:
        """``(weight_spec, activation_spec)`` for the module ``name`` (weight spec None for `MatMul`)."""

    @abstractmethod
    def calibration_batches(
        self, trace: Trace, mask: tuple[bool, ...], source: list[int]
    ) -> Iterator[CalibrationBatch]:
        """Which trace steps and rows calibrate the activations, given the cache's refresh ``mask`` and the
        refresh step each step reuses (``source``)."""

    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def upgrade(cls, fields: dict, version: int) -> dict:
        """Fields saved by ``version`` of this strategy, as this version reads them (`cq.registry.from_dict`).

        Before version 2 the UNet's input and output layers were quantized, before version 3 a split conv's weight
        had one scale per output channel across both halves, before version 4 weights were rounded to nearest:
        such files keep what they were fitted with; before version 5 activation tables were per step."""
        names = {f.name for f in dataclasses.fields(cls)}
        if version < 2 and "float_io" in names:
            fields = {"float_io": False, **fields}
        if version < 3 and "split_weights" in names:
            fields = {"split_weights": False, **fields}
        if version < 4 and "weight_rounding" in names:
            fields = {"weight_rounding": "nearest", **fields}
        if version < 5 and "activation_tables" in names:
            fields = {"activation_tables": "per_step", **fields}
        return fields

    def check_activation_tables(self) -> None:
        """Refuse an unknown ``activation_tables`` (`ConfigError`)."""
        if self.activation_tables not in ("per_step", "per_group"):
            raise ConfigError(
                f"{type(self).__name__}.activation_tables must be 'per_step' or 'per_group', got "
                f"{self.activation_tables!r}"
            )

    def rounding(self) -> str:
        """The weight rounding `quantize` runs: ``"nearest"``, ``"gptq"`` or ``"adaround"`` (``weight_rounding``
        with ``"auto"`` resolved: GPTQ below 8 bits). `ConfigError` for an unknown name, and for ``"adaround"`` at
        8-bit weights: there the nearest grid is already finer than the output error the reconstruction could
        remove (W8A8 nearest is within noise of GPTQ), so it would spend minutes for nothing."""
        name = type(self).__name__
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ConfigError(
                f"{name}.weight_rounding must be one of {', '.join(map(repr, WEIGHT_ROUNDINGS))}, got "
                f"{self.weight_rounding!r}"
            )
        bits = getattr(self, "weight_bits", 8)
        if self.weight_rounding == "adaround" and bits >= 8:
            raise ConfigError(
                f"{name}(weight_rounding='adaround') at {bits}-bit weights is a no-op in effect (a reconstruction "
                "below the 8-bit grid's own error); use it below 8 bits (e.g. weight_bits=4), or "
                "weight_rounding='nearest' / 'gptq' at 8"
            )
        if self.weight_rounding == "auto":
            return "gptq" if bits < 8 else "nearest"
        return self.weight_rounding

    def uses_gptq(self) -> bool:
        """Whether `quantize` re-rounds the weights with GPTQ (``weight_rounding``; "auto": below 8 bits).
        Validates ``weight_rounding`` (`rounding`)."""
        return self.rounding() == "gptq"

    def label(self) -> str:
        """Short description for reports, e.g. ``UniformQuantizer(W8A8)``; override to show more."""
        return type(self).__name__

    def selects(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.skip
        )

    def prepare(self, unet: nn.Module, num_steps: int) -> nn.Module:
        """A deep copy of ``unet`` with the selected modules replaced by fake-quant modules (weights quantized).

        With ``float_io`` the layers ``unet.io_layers()`` names stay float (why: `cq.models.DDPMUNet.io_layers`).
        """
        model = copy.deepcopy(check_cacheable(unet, f"{type(self).__name__}.prepare"))
        splits = model.concat_splits()
        io = set(model.io_layers()) if self.float_io else set()
        targets = [
            (name, m)
            for name, m in model.named_modules()
            if type(m) in FLOAT_TO_FAKE and self.selects(name) and name not in io
        ]
        if not targets:
            raise ConfigError(f"{type(self).__name__}: include={self.include} skip={self.skip} select no module")
        for name, module in targets:
            weight_spec, act_spec = self.specs(name, module)
            split = splits.get(name)
            qmodule = FLOAT_TO_FAKE[type(module)](
                module, weight_spec, act_spec, num_steps, split=split, split_weights=self.split_weights
            )
            set_submodule(model, name, qmodule)
        return model

    @torch.no_grad()
    def calibrate(
        self,
        model: nn.Module,
        trace: Trace,
        *,
        cache: FeatureCache | None = None,
        cacher: Cacher | None = None,
        progress: bool = True,
    ) -> RangeTables:
        """Record activation ranges on ``trace`` and write them into ``model``'s quantizers.

        Calibrates the cached model (CacheQuant §4.3): ``cache`` is the model's `FeatureCache` -- its refresh mask
        says which steps run shallow, and its correction (the DEC cache correction, when fitted) is applied to the
        cached feature, as when sampling. ``cacher`` (a fitted `Cacher`) builds a cache without correction
        instead; neither: every step a full call.

        With ``activation_tables="per_group"`` every per-step quantizer gets one range per cache group (the steps
        of ``cache.source`` sharing a refresh); without a cache each step is its own group.

        Returns the range tables: per quantizer which steps were observed (``seen``) and which quantizers saw no
        data at all (``unobserved``; they stay pass-through)."""
        self.check_activation_tables()
        num_steps = trace.steps
        for name, module in model.named_modules():
            if isinstance(module, ActQuantizer) and module.spec.per_step and module.num_tables != num_steps:
                raise ConfigError(
                    f"{name} has {module.num_tables} per-step tables but the trace has {num_steps} steps; "
                    "prepare the model with the trace's step count"
                )
        cache = _cache_for(model, num_steps, cache, cacher)
        mask, source = _refresh_plan(cache, num_steps)
        batches = self.calibration_batches(trace, mask, source)
        groups = source if self.activation_tables == "per_group" else None
        with observe(model, RangeTables(groups=groups)) as tables:
            replay(model, trace, batches, cache=cache, progress=progress, desc="calibrate")
        tables.apply(model)
        return tables

    @torch.no_grad()
    def round_weights(
        self,
        model: nn.Module,
        unet: nn.Module,
        trace: Trace,
        *,
        cache: FeatureCache | None = None,
        cacher: Cacher | None = None,
        progress: bool = True,
    ) -> list[str]:
        """GPTQ (`cq.quant.gptq`) or AdaRound (`cq.quant.adaround`), as `rounding` says: re-round the weights of
        ``model`` (prepared from ``unet``, not yet calibrated) for the output error on the calibration calls of
        `calibrate` (the cached model's, cached calls included). Returns the layers re-rounded (AdaRound: those
        finished when interrupted)."""
        if any(
            isinstance(m, ActQuantizer) and bool(m.calibrated.any()) and m.fixed_range is None for m in model.modules()
        ):
            raise ConfigError("round_weights runs before calibration: its inputs must not be quantized yet")
        method = "adaround" if self.rounding() == "adaround" else "gptq"
        cache = _cache_for(model, trace.steps, cache, cacher)
        mask, source = _refresh_plan(cache, trace.steps)
        with record_hessians(model) as tables:
            replay(
                model,
                trace,
                self.calibration_batches(trace, mask, source),
                cache=cache,
                progress=progress,
                desc=f"{method} inputs",
            )
        if method == "adaround":
            return apply_rounding(
                model, unet, tables, adaround_round, progress=progress, desc="adaround", interruptible=True
            )
        return apply_gptq(model, unet, tables)

    def convert(self, model: nn.Module) -> nn.Module:
        """Finish ``model`` after calibration (checks that no observation hook is left)."""
        for name, module in model.named_modules():
            if isinstance(module, ActQuantizer) and module._forward_pre_hooks:
                raise ConfigError(f"{name} still has observation hooks; calibrate inside `with observe(...)` only")
        return model

    def quantize(
        self,
        unet: nn.Module,
        trace: Trace,
        *,
        cache: FeatureCache | None = None,
        cacher: Cacher | None = None,
        progress: bool = True,
    ) -> nn.Module:
        """prepare -> calibrate -> convert: a quantized copy of ``unet`` for ``trace.steps`` sampling steps
        (``cache`` / ``cacher``: see `calibrate`)."""
        model = self.prepare(unet, trace.steps)
        cache = _cache_for(model, trace.steps, cache, cacher)  # one cache for both replays (a cacher builds it once)
        if self.rounding() != "nearest":
            self.round_weights(model, unet, trace, cache=cache, progress=progress)
        self.calibrate(model, trace, cache=cache, progress=progress)
        return self.convert(model)


def _cache_for(
    model: nn.Module, num_steps: int, cache: FeatureCache | None, cacher: Cacher | None
) -> FeatureCache | None:
    if cache is not None and cacher is not None:
        raise ConfigError("pass the model's cache or a cacher to calibrate with, not both")
    if cacher is not None:
        return cacher.build(model, num_steps)
    if cache is not None and cache.num_steps != num_steps:
        raise ConfigError(f"the cache is built for {cache.num_steps} steps but the trace has {num_steps}")
    return cache


def _refresh_plan(cache: FeatureCache | None, num_steps: int) -> tuple[tuple[bool, ...], list[int]]:
    """``(refresh mask, source step of every step)`` the calibration calls follow: the cache's, or without a cache
    every step a full call (its own source)."""
    if cache is not None:
        return cache.mask, cache.source
    return (True,) * num_steps, list(range(num_steps))


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """``{name: class name}`` of every fake-quant module in ``model``."""
    fake = fake_quant_classes()
    return {n: type(m).__name__ for n, m in model.named_modules() if type(m) in fake}


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
