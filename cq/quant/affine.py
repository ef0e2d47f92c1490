"""Uniform affine quantization: parameters from a range, fake quantization, and range searches.

``q = clamp(floor((x + (zero_point + 1/2) * scale) * (1/scale)), qmin, qmax)`` -- ``round(x / scale) + zero_point``
rounding half up, written as two exactly rounded elementwise ops (an add and a multiply, no division, no fused
multiply-add) so that `cq.quant.int8` computes bit-identical codes with fast in-place kernels --
``dq = (q - zero_point) * scale``. Ranges always
include 0 (so 0 is exactly representable and zero padding stays exact), and zero points are integers inside
``[qmin, qmax]`` -- unlike the reference search, which scores clamped parameters but stores unclamped ones
(algorithms.md §8.3 trap 9).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .spec import QuantSpec


__all__ = ["qparams", "quantize", "dequantize", "fake_quantize", "search_range", "lp_error", "reduce_dims"]

_EPS = 1e-12
_VECTOR_LIMIT = 1 << 14  # per-tensor searches up to this size evaluate all candidates at once


def qparams(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` (float32, zero point integer-valued) for the range ``[lo, hi]``, widened to hold 0."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if spec.symmetric:
        scale = torch.maximum(hi, -lo) / spec.qmax
        return scale.clamp_min(_EPS), torch.zeros_like(scale)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(_EPS)
    zero_point = (spec.qmin - lo / scale).round().clamp(spec.qmin, spec.qmax)
    return scale, zero_point


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Integer grid values (as float) ``clamp(floor((x + (zp + 1/2) * scale) * (1/scale)), qmin, qmax)``."""
    shifted = (x + (zero_point + 0.5) * scale) * torch.reciprocal(scale)
    return shifted.floor_().clamp_(spec.qmin, spec.qmax)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return (q - zero_point) * scale


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """``dequantize(quantize(x))``: x rounded to the quantization grid, in x's dtype."""
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point).to(x.dtype)


def reduce_dims(x: Tensor, per_channel: bool) -> tuple[int, ...]:
    """Dimensions reduced to get a per-tensor (all) or per-output-channel (all but 0) statistic."""
    return tuple(range(1, x.ndim)) if per_channel else tuple(range(x.ndim))


def lp_error(x: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec, p: float | None = None) -> Tensor:
    """``mean |x - fake_quantize(x)|^p`` per channel (per_channel) or as a scalar."""
    scale, zp = qparams(lo, hi, spec)
    shape = _param_shape(x, spec.per_channel)
    err = (x - fake_quantize(x, scale.reshape(shape), zp.reshape(shape), spec)).abs().pow(p or spec.p)
    return err.mean(dim=reduce_dims(x, spec.per_channel))


def search_range(x: Tensor, spec: QuantSpec, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` for ``x`` by ``spec.method``; per output channel (shape ``[C]``) or scalars.

    The ``mse`` candidates include the min-max range itself (i = 0), so the search never ends with a larger
    L_p error than min-max. ``weights`` (per-tensor only, same shape as ``x``): how many elements of a larger
    tensor each value stands for, when ``x`` is a weighted sample of it (`cq.quant.calibrate`).
    """
    x = x.detach().float()
    if weights is not None:
        if spec.per_channel or weights.shape != x.shape:
            raise ConfigError(
                f"search_range: weights need a per-tensor spec and the shape of x ({tuple(x.shape)}), got "
                f"{tuple(weights.shape)} with per_channel={spec.per_channel}"
            )
        if spec.method == "mse":
            return _search_all_at_once(x.reshape(-1), x.min(), x.max(), spec, weights.reshape(-1).float())
    dims = reduce_dims(x, spec.per_channel)
    if spec.method == "percentile" and spec.percentile < 1.0:
        flat = x.reshape(x.shape[0], -1) if spec.per_channel else x.reshape(1, -1)
        flat = _subsample(flat)
        lo = torch.quantile(flat, 1 - spec.percentile, dim=1)
        hi = torch.quantile(flat, spec.percentile, dim=1)
        return (lo, hi) if spec.per_channel else (lo[0], hi[0])
    lo, hi = x.amin(dim=dims), x.amax(dim=dims)
    if spec.method in ("minmax", "percentile"):
        return lo, hi
    if not spec.per_channel and x.numel() <= _VECTOR_LIMIT:
        return _search_all_at_once(x.reshape(-1), lo, hi, spec)
    best_lo, best_hi = lo.clone(), hi.clone()
    best_err = lp_error(x, lo, hi, spec)
    for i in range(2, 80, 2):
        shrink = 1 - 0.01 * i
        cand_lo, cand_hi = lo * shrink, hi * shrink
        err = lp_error(x, cand_lo, cand_hi, spec)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, cand_lo, best_lo)
        best_hi = torch.where(better, cand_hi, best_hi)
    return best_lo, best_hi


def _search_all_at_once(
    x: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The per-tensor ``mse`` search with all 40 candidates in one ``[40, N]`` pass (same result as the loop);
    ``weights``: per-value weights of the L_p error (a weighted sample of a larger tensor)."""
    shrink = 1 - 0.01 * torch.arange(0, 80, 2, dtype=torch.float32, device=x.device)
    cand_lo, cand_hi = lo * shrink, hi * shrink
    scale, zp = qparams(cand_lo, cand_hi, spec)
    err = (x[None, :] - fake_quantize(x[None, :], scale[:, None], zp[:, None], spec)).abs().pow(spec.p)
    err = err.mean(1) if weights is None else (err * weights[None, :]).sum(1)
    best = int(torch.argmin(err))  # first minimum, as the loop keeps the earliest on ties
    return cand_lo[best], cand_hi[best]


def _param_shape(x: Tensor, per_channel: bool) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.ndim - 1) if per_channel else ()


def _subsample(flat: Tensor, limit: int = 1 << 20) -> Tensor:
    """At most ``limit`` evenly strided columns (``torch.quantile`` refuses inputs over 16M elements)."""
    if flat.shape[1] <= limit:
        return flat
    return flat[:, :: -(-flat.shape[1] // limit)]
