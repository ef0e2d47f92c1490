"""`Recipe`: cacher + quantizer + correctors, fitted in one fixed order (CacheQuant's pipeline, in code).

``recipe.fit(unet, trace)`` returns a new `CompressedUNet`; the input UNet is not modified. Order:

1. the cacher fits its schedule on the trace (DPS needs the features at its point); a cacher that declares
   ``needs_rollout`` (its schedule searches on the compressed model's end-to-end error, `TrajectorySearch`) also
   gets ``rollout=``, a `cq.fit.rollout.CalibrationRollout` that builds candidate models with this recipe's
   `Stage.BEFORE_QUANTIZATION` correctors -- on the body quantized once with every step a full call, when the
   recipe has a quantizer and the cacher's ``quantized_rollout`` -- and samples them on the trace's calibration
   trajectories;
2. correctors declaring ``stage = Stage.BEFORE_QUANTIZATION`` (the DEC cache correction) are fitted on the
   full-precision cached model;
3. the quantizer calibrates on the *cached* model, through the model's own cache with those corrections active
   (CacheQuant's "aftercacheadd" calibration);
4. correctors declaring ``Stage.AFTER_QUANTIZATION`` (the DEC quantization correction) are fitted on the
   quantized cached model;
5. with ``backend="int8"`` the quantized layers are moved to integer kernels (`CompressedUNet.to_int8`).

This is the one fitting path: a rollout's candidate is the model steps 2-5 build here with the candidate cacher
(on the shared quantized body, without the correctors after quantization), and everything else that fits --
`cq.choose_point`, `cq.fit_to_budget` (``cachequant(budget=)`` with its table), `cq.diffusers.compress`, the CLI --
calls `Recipe.fit`. `cq.fit.steps.assemble` is the one place a `CompressedUNet` is put together.

Presets: `cachequant`, `deepcache`, `quant_only`, `naive`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ..cache import DPS, UniformSchedule
from ..cache.cacher import Cacher
from ..cache.deepcache import DeepCache
from ..compressed import CompressedUNet
from ..correct import CacheErrorCorrector, Corrector, QuantErrorCorrector, Stage
from ..errors import ConfigError, ReferenceMismatchError
from ..io import fingerprint
from ..quant import Backend, Quantizer, UniformQuantizer
from ..registry import RECIPES, check_registered
from .budget_cache import BudgetCache
from .rollout import CalibrationRollout
from .steps import assemble, fit_after_cacher


if TYPE_CHECKING:
    from ..calib.trace import Trace

__all__ = ["Recipe", "cachequant", "deepcache", "quant_only", "naive", "parse_bits", "PRESET_RECIPES"]


@RECIPES.register("recipe")
@dataclass(frozen=True, kw_only=True)
class Recipe:
    """What compresses a UNet: a cacher, a quantizer and error correctors (each optional).

    ``backend``: ``"fake"`` (quantized layers simulate quantization in float: the accuracy reference), ``"int8"``
    (real integer kernels, picked by device), or a kernel family, ``"onednn"`` / ``"int_mm"``. Saved with the
    recipe: `cq.load` converts again.

    Example:
        >>> recipe = Recipe(cacher=DeepCache(schedule=DPS(interval=5)), quantizer=cq.quant.UniformQuantizer(),
        ...                 correctors=(CacheErrorCorrector(), QuantErrorCorrector()), backend="int8")
        >>> trace = cq.trace(unet, steps=50, num_samples=32, points=recipe.points(unet))
        >>> model = recipe.fit(unet, trace)
    """

    VERSION: ClassVar[int] = 1
    cacher: Cacher | None = None
    quantizer: Quantizer | None = None
    correctors: tuple[Corrector, ...] = field(default_factory=tuple)
    backend: Backend | str = Backend.FAKE

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", Backend.parse(self.backend))
        if self.backend is not Backend.FAKE and self.quantizer is None:
            raise ConfigError(
                f"Recipe.backend={self.backend.value!r} runs quantized layers: the recipe needs a quantizer"
            )
        if self.cacher is not None and not isinstance(self.cacher, Cacher):
            raise ConfigError(f"Recipe.cacher must be a Cacher, got {type(self.cacher).__name__}")
        if self.quantizer is not None and not isinstance(self.quantizer, Quantizer):
            raise ConfigError(f"Recipe.quantizer must be a Quantizer, got {type(self.quantizer).__name__}")
        if not isinstance(self.correctors, tuple) or not all(isinstance(c, Corrector) for c in self.correctors):
            raise ConfigError("Recipe.correctors must be a tuple of Corrector values")
        kinds = [type(c) for c in self.correctors]
        if len(set(kinds)) != len(kinds):
            raise ConfigError(f"Recipe.correctors repeats a corrector: {[k.__name__ for k in kinds]}")
        slots: dict[str, str] = {}
        for corrector in self.correctors:
            name = type(corrector).__name__
            if corrector.slot and corrector.slot in slots:
                raise ConfigError(
                    f"Recipe.correctors: {name} and {slots[corrector.slot]} both install {corrector.slot!r}; "
                    "keep one of them"
                )
            slots[corrector.slot] = name
            if not isinstance(corrector.stage, Stage):
                raise ConfigError(f"{name}.stage must be a cq.correct.Stage, got {corrector.stage!r}")
            if corrector.needs_cacher and self.cacher is None:
                raise ConfigError(f"{name} corrects cached features: the recipe needs a cacher")
            if corrector.needs_quantizer and self.quantizer is None:
                raise ConfigError(f"{name} corrects quantization error: the recipe needs a quantizer")
        for part in (self.cacher, self.quantizer, *self.correctors):
            if part is not None:
                check_registered(part)

    def points(self, unet: nn.Module) -> tuple[str, ...]:
        """Cache points a trace must record for `fit`."""
        return self.cacher.points(unet) if self.cacher is not None else ()

    def stage(self, stage: Stage) -> tuple[Corrector, ...]:
        """The correctors fitted at ``stage``, in the recipe's order."""
        return tuple(c for c in self.correctors if c.stage is stage)

    def fit(
        self,
        unet: nn.Module,
        trace: Trace,
        *,
        progress: bool = True,
        wrap_rollout: Callable[[CalibrationRollout], Callable[[Cacher, int | None], Tensor]] | None = None,
    ) -> CompressedUNet:
        """Fit every component on ``trace`` (recorded from ``unet`` in full precision) in the order above.

        A cacher that `needs_rollout` is fitted with ``rollout=`` `rollout` (candidate models sampled end to end on
        the trace's trajectories; quantized if the cacher's `quantized_rollout`), or with
        ``wrap_rollout(that rollout)``, e.g. a wrapper recording every candidate (`cq.fit_to_budget` builds its
        table so); either is dropped, and its quantized body with it, once the cacher is fitted. One
        `CompressedUNet` (and so one `FeatureCache`) is built next, on the full-precision UNet; correctors of
        `Stage.BEFORE_QUANTIZATION` fit on it, the quantizer calibrates through its cache (their corrections on),
        its body becomes the quantized copy, and correctors of `Stage.AFTER_QUANTIZATION` fit on that."""
        if trace.x.shape[1] == 0:
            raise ConfigError(
                "the trace stores no trajectories (recorded with keep=0: only its observers saw the samples); "
                "fitting calibrates on them: record it with keep >= 1 (default: all)"
            )
        missing = [p for p in self.points(unet) if p not in trace.features]
        if missing:
            raise ConfigError(f"the trace lacks features at {missing}; record it with points=recipe.points(unet)")
        base = fingerprint(unet)
        if trace.base_fingerprint and trace.base_fingerprint != base:
            raise ReferenceMismatchError(
                "the trace was recorded from another model than the UNet being fitted (weights fingerprint "
                "differs); record the trace with cq.trace(unet, ...) of this UNet"
            )
        needs_rollout = self.cacher is not None and self.cacher.needs_rollout
        if wrap_rollout is not None and not needs_rollout:
            raise ConfigError(
                f"Recipe.fit: wrap_rollout= is for a cacher that searches on rollouts (needs_rollout); "
                f"{self.cacher.label() if self.cacher is not None else 'no cacher'} does not"
            )
        cacher = self.cacher
        if needs_rollout:
            # passed, not kept: its quantized body (a UNet copy) is freed before the final calibration
            wrap = wrap_rollout or (lambda rollout: rollout)
            cacher = cacher.fit(unet, trace, rollout=wrap(self.rollout(unet, trace, progress=progress)))
        elif cacher is not None:
            cacher = cacher.fit(unet, trace)
        return fit_after_cacher(  # steps 2-5, the code every rollout candidate runs too
            unet,
            trace,
            cacher=cacher,
            correctors=self.correctors,
            quantizer=self.quantizer,
            int8_kernels=self.int8_kernels,
            recipe=replace(self, cacher=cacher),
            base_fingerprint=base,
            progress=progress,
        )

    def rollout(self, unet: nn.Module, trace: Trace, *, progress: bool = False) -> CalibrationRollout:
        """What `fit` hands a cacher that `needs_rollout`: `CalibrationRollout.of` with this recipe's
        `Stage.BEFORE_QUANTIZATION` correctors and, when the cacher's `quantized_rollout`, its quantizer."""
        quantized = self.cacher is None or self.cacher.quantized_rollout
        return CalibrationRollout.of(
            unet,
            trace,
            correctors=self.stage(Stage.BEFORE_QUANTIZATION),
            quantizer=self.quantizer if quantized else None,
            progress=progress,
        )

    @property
    def int8_kernels(self) -> Backend | None:
        """The `to_int8` backend this recipe runs on, or None for fake quantization."""
        return self.backend.kernels

    def build(self, unet: nn.Module, num_steps: int, **fields: Any) -> CompressedUNet:
        """The structure of a fitted model with identity corrections and unfitted tables (for loading saved
        tensors into). The cacher must be fitted (its schedule part of the recipe); ``fields`` are the fitted
        model's `CompressedUNet` fields (`cq.fit.steps.assemble`)."""
        body = self.quantizer.prepare(unet, num_steps) if self.quantizer is not None else unet
        model = assemble(body, num_steps, cacher=self.cacher, recipe=self, **fields)
        for corrector in self.correctors:
            corrector.attach(model)
        return model


# ----------------------------------------------------------------------------------------------------------------
# Presets


def parse_bits(bits: str) -> tuple[int, int]:
    """``"w8a8"`` -> ``(8, 8)``; ``"w4a8"`` -> ``(4, 8)``."""
    if not isinstance(bits, str):
        raise ConfigError(
            f"bits names weight and activation bits as a string, 'w8a8' (8-bit weights and activations) or "
            f"'w4a8', got {bits!r} ({type(bits).__name__}); pass bits='w8a8'"
        )
    m = re.fullmatch(r"w(\d)a(\d)", bits.lower())
    if not m:
        raise ConfigError(f"bits must look like 'w8a8' or 'w4a8', got {bits!r}")
    return int(m.group(1)), int(m.group(2))


def _quantizer(bits: str) -> UniformQuantizer:
    weight_bits, act_bits = parse_bits(bits)
    return UniformQuantizer(weight_bits=weight_bits, act_bits=act_bits)


def cachequant(
    interval: int | None = None,
    bits: str = "w8a8",
    point: str | None = None,
    backend: str = "fake",
    *,
    refreshes: int | None = None,
    budget: str | float | None = None,
) -> Recipe:
    """CacheQuant: DPS schedule, per-step quantization on the cached model, both DEC corrections.

    ``interval``: the cache interval N (default 5); or ``refreshes``: the number of full calls K, DPS's compute
    budget; or ``budget``: a speedup to meet with the least error, ``"5x"`` (MACs) or ``"2.5x wall"`` (measured
    seconds on this machine) -- the cache point, K and the schedule are then chosen when the recipe is fitted
    (`cq.fit.BudgetCache`). One of the three."""
    given = [
        name for name, v in (("interval", interval), ("refreshes", refreshes), ("budget", budget)) if v is not None
    ]
    if len(given) > 1:
        raise ConfigError(f"cachequant takes one of interval, refreshes or budget, got {' and '.join(given)}")
    if budget is not None:
        if point is not None:
            raise ConfigError("cachequant(budget=) chooses the cache point; pass BudgetCache(candidates=...) instead")
        cacher: Cacher = BudgetCache(speedup=budget)
    else:
        schedule = (
            DPS(refreshes=refreshes) if refreshes is not None else DPS(interval=5 if interval is None else interval)
        )
        cacher = DeepCache(schedule=schedule, point=point)
    return Recipe(
        cacher=cacher,
        quantizer=_quantizer(bits),
        correctors=(CacheErrorCorrector(), QuantErrorCorrector()),
        backend=backend,
    )


def deepcache(interval: int = 5, point: str | None = None) -> Recipe:
    """DeepCache alone: uniform refresh every ``interval`` steps, full precision."""
    return Recipe(cacher=DeepCache(schedule=UniformSchedule(interval=interval), point=point))


def quant_only(bits: str = "w8a8", backend: str = "fake") -> Recipe:
    """Quantization alone (per-step activation tables), no caching."""
    return Recipe(quantizer=_quantizer(bits), backend=backend)


def naive(interval: int = 5, bits: str = "w8a8", point: str | None = None, backend: str = "fake") -> Recipe:
    """DeepCache (uniform) + quantization, without DPS or DEC: the baseline CacheQuant improves on."""
    cacher = DeepCache(schedule=UniformSchedule(interval=interval), point=point)
    return Recipe(cacher=cacher, quantizer=_quantizer(bits), backend=backend)


PRESET_RECIPES = {"cachequant": cachequant, "deepcache": deepcache, "quant_only": quant_only, "naive": naive}
