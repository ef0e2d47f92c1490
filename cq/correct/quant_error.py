"""DEC quantization-error correction (CacheQuant Sec. 3.3, ``--error quant``), with the exact bias fold.

The decoder block at the cache point reads ``cat(cached, skip)``. Its entry convs (``conv1`` and
``nin_shortcut`` in the DDPM UNet; ``in_layers.2`` / ``skip_connection`` in LDM) are split-quantized; the part
fed by the cached half is ``P = conv(Q(x_c), Q(W_c)) + bias``. Per step and output channel, ``P`` is mapped to its
full-precision value ``conv(x_c, W_c) + bias`` by least squares, ``P <- a_i * P + b_i``. Folded, that is weights
``a_i * W_c`` and bias ``a_i * bias + b_i`` -- the reference adds ``bias + b_i``, off by ``(1 - a_i) * bias``
(algorithms.md §8.3 trap 5).

Statistics come from replaying the trace through the quantized model (cache correction on), as in calibration;
the cached-half input is taken at the conv itself, so GroupNorm groups straddling the split (CIFAR's 384-channel
blocks) need no special case. Which deep feature feeds the tail at a refresh step (``deep_features``):

* ``"full_precision"`` (default; the reference, ``error_dec/*_dec.py``): the trace's full-precision feature
  ``F_i`` at every step -- the refresh step's own at refresh steps, the cache-corrected ``a_i F_s(i) + b_i`` at
  cached steps. The correction then sees only the tail's own quantization error.
* ``"quantized"`` (cq before Corrector version 2): refresh steps run the whole quantized network, so the deep
  feature carries the deep layers' quantization error too (what a refresh step computes when sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..calib.replay import CalibrationBatch, every_step, replay
from ..core.step import current_step
from ..errors import ConfigError
from ..quant.modules import QConv2d
from ..registry import CORRECTORS
from .correction import ChannelAffine
from .corrector import Corrector, Stage
from .moments import ChannelMoments, affine_fit


if TYPE_CHECKING:
    from ..calib.trace import Trace
    from ..compressed import CompressedUNet

__all__ = ["QuantErrorCorrector"]


@CORRECTORS.register("quant_error")
@dataclass(frozen=True, kw_only=True)
class QuantErrorCorrector(Corrector):
    """Per-step, per-output-channel affine correction of the cached half of the tail entry convs.

    Args:
        samples: trace trajectories per step used for the statistics.
        deep_features: what feeds the tail at refresh steps while fitting, ``"full_precision"`` (the reference)
            or ``"quantized"`` (module docstring).
    """

    VERSION: ClassVar[int] = 2  # 2: deep_features, default "full_precision" (version 1 fitted with "quantized")
    stage: ClassVar[Stage] = Stage.AFTER_QUANTIZATION
    needs_quantizer: ClassVar[bool] = True
    samples: int = 32
    deep_features: Literal["full_precision", "quantized"] = "full_precision"

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"QuantErrorCorrector.samples must be >= 1, got {self.samples}")
        if self.deep_features not in ("full_precision", "quantized"):
            raise ConfigError(
                "QuantErrorCorrector.deep_features must be 'full_precision' or 'quantized', "
                f"got {self.deep_features!r}"
            )

    @classmethod
    def upgrade(cls, fields: dict, version: int) -> dict:
        """Version 1 files were fitted with the quantized deep features (the field only documents the fit)."""
        return {"deep_features": "quantized", **fields} if version < 2 else fields

    def targets(self, model: CompressedUNet) -> dict[str, QConv2d]:
        if model.cache is None:
            raise ConfigError("QuantErrorCorrector needs a cached model (it corrects the cached half)")
        consumer = model.unet.cache_consumer(model.cache.point)
        found = {}
        for name, module in model.unet.named_modules():
            if name.startswith(consumer + ".") and isinstance(module, QConv2d) and module.split:
                found[name] = module
        if not found:
            raise ConfigError(
                f"QuantErrorCorrector found no split-quantized conv in {consumer!r}; quantize the model first"
            )
        return found

    def attach(self, model: CompressedUNet) -> None:
        for module in self.targets(model).values():
            module.correction = ChannelAffine(model.num_steps, module.out_channels)

    def fit(self, model: CompressedUNet, reference: nn.Module, trace: Trace, *, progress: bool = False) -> None:
        targets = self.targets(model)
        for module in targets.values():
            module.correction = None  # statistics of the uncorrected layer
        moments = {name: ChannelMoments(model.num_steps, m.out_channels) for name, m in targets.items()}

        def observe(name: str, module: QConv2d, x: torch.Tensor) -> None:
            c = module.split
            w_fp = reference.get_submodule(name).weight[:, :c]
            args = (module.stride, module.padding, module.dilation, module.groups)
            y = F.conv2d(x[:, :c], w_fp, module.bias, *args)  # full precision: input and weight
            xq = F.conv2d(module.act(x[:, :c]), module.dequantized_weight()[:, :c], module.bias, *args)
            moments[name].update(current_step(), xq, y)

        cache = model.cache
        batches = every_step(cache.mask, cache.source, self.samples, trace.x.shape[1])
        if self.deep_features == "full_precision":  # refresh steps: a shallow call on their own FP feature
            batches = [CalibrationBatch(b.step, b.rows, b.step if b.source is None else b.source) for b in batches]
        handles = []
        try:
            for name, module in targets.items():
                handles.append(module.register_forward_pre_hook(lambda m, a, n=name: observe(n, m, a[0])))
            replay(model.unet, trace, batches, cache=cache, progress=progress, desc="quant DEC")
        finally:
            for h in handles:
                h.remove()
        self.attach(model)
        for name, module in targets.items():
            gain, offset = affine_fit(moments[name])
            module.correction.gain.copy_(gain)
            module.correction.offset.copy_(offset)
