"""The steps of a fit after its cacher: the one place a `CompressedUNet` is assembled, and the sequence
`Recipe.fit` and every `cq.fit.rollout.CalibrationRollout` candidate share (correctors before quantization,
the quantized body, correctors after quantization, integer kernels)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..compressed import CompressedUNet
from ..correct import Corrector, Stage


if TYPE_CHECKING:
    from ..cache.cacher import Cacher
    from ..calib.trace import Trace
    from ..quant import Backend, Quantizer


__all__ = ["assemble", "fit_after_cacher"]


def assemble(
    body: nn.Module, num_steps: int, *, cacher: Cacher | None, recipe: Any = None, **fields: Any
) -> CompressedUNet:
    """The `CompressedUNet` around ``body`` with the fitted ``cacher``, corrections not yet installed;
    ``fields``: the model's other fields (calibration seeds, sampler settings, fingerprint, guidance)."""
    return CompressedUNet(body, num_steps=num_steps, cacher=cacher, recipe=recipe, **fields)


def fit_after_cacher(
    unet: nn.Module,
    trace: Trace,
    *,
    cacher: Cacher | None,
    correctors: tuple[Corrector, ...] = (),
    quantizer: Quantizer | None = None,
    int8_kernels: Backend | None = None,
    recipe: Any = None,
    body: nn.Module | None = None,
    base_fingerprint: str = "",
    progress: bool = False,
) -> CompressedUNet:
    """The model assembled on ``unet`` with the fitted ``cacher``, the correctors of `Stage.BEFORE_QUANTIZATION`
    fitted on it, the quantized body swapped in (``quantizer`` calibrated through the model's cache; or ``body``,
    a quantized copy of ``unet`` calibrated before: a rollout's shared one), the correctors of
    `Stage.AFTER_QUANTIZATION` fitted, then ``int8_kernels``. ``recipe``: what the model records as its recipe."""
    model = assemble(
        unet,
        trace.steps,
        cacher=cacher,
        recipe=recipe,
        calibration_seeds=trace.seeds,
        sampler_settings=trace.settings,
        base_fingerprint=base_fingerprint,
        calibration_guidance=trace.guidance_scale,
    )
    for corrector in correctors:
        if corrector.stage is Stage.BEFORE_QUANTIZATION:
            corrector.fit(model, unet, trace, progress=progress)
    if body is not None:
        model.unet = body
    elif quantizer is not None:
        model.unet = quantizer.quantize(unet, trace, cache=model.cache, progress=progress)
    for corrector in correctors:
        if corrector.stage is Stage.AFTER_QUANTIZATION:
            corrector.fit(model, unet, trace, progress=progress)
    if int8_kernels is not None:
        model.to_int8(int8_kernels)
    return model
