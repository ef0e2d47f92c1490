"""GPTQ weight rounding (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Alg. 1), for the weights of cq's fake-quant layers.

Round-to-nearest rounds every weight on its own. GPTQ rounds the input columns of a layer one after another and
moves each column's rounding error onto the columns not yet rounded, weighted by the inverse of the layer's input
second moment ``H = E[x xᵀ]`` (its "Hessian"), so that the *output* error ``|(W - Q) x|²`` over calibration
inputs is small rather than the weight error. Scales and zero points stay those of the weight's own range search
(per output channel, per split half), so the result is stored and run exactly as a round-to-nearest weight:
int8 kernels, artifacts and MAC counts do not change.

Inputs come from the calibration calls (`cq.calib.replay`, the cached model's own calls: refresh steps full, cached
steps shallow) with weights rounded to nearest and activations not yet quantized; a conv's input is unfolded
into its ``C * kh * kw`` patch columns (``torch.nn.functional.unfold``), about `ROWS_PER_CALL` rows per call
(evenly strided samples of the batch, then strided rows).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .modules import QConv1d, QConv2d, QLinear, QuantizedWeight


__all__ = ["HessianTables", "record_hessians", "gptq_round", "apply_gptq", "apply_rounding"]

ROWS_PER_CALL = 2048  # input rows per call entering H (strided samples, then strided rows): bounds the cost
DAMPING = 0.01  # fraction of the mean diagonal added to H (GPTQ's "percdamp")
BLOCK = 128  # columns per lazy batch update (GPTQ §3, step 2)
ACT_ORDER = True  # round the columns in decreasing order of input energy diag(H) (GPTQ's reference "act-order")

_WEIGHT_LAYERS = (QConv2d, QConv1d, QLinear)


class HessianTables:
    """Per layer name: the running sum of ``x xᵀ`` over input rows (each call's products in float32, the sum over
    calls in float64) and the row count."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}

    def update(self, name: str, module: nn.Module, x: Tensor) -> None:
        x = x.detach().float()
        per_sample = x[0].numel() // x.shape[-1] if isinstance(module, QLinear) else _positions(module, x)
        if x.shape[0] > 1 and x.shape[0] * per_sample > ROWS_PER_CALL:  # evenly strided samples before unfolding
            x = x[:: max(1, x.shape[0] * per_sample // ROWS_PER_CALL)]
        cols = _input_columns(module, x)
        if cols.shape[0] > ROWS_PER_CALL:
            cols = cols[:: -(-cols.shape[0] // ROWS_PER_CALL)]
        outer = (cols.T @ cols).double()  # float32 products of one call, summed over calls in float64
        if name in self.sums:
            self.sums[name] += outer
            self.rows[name] += cols.shape[0]
        else:
            self.sums[name], self.rows[name] = outer, cols.shape[0]

    def hessian(self, name: str) -> Tensor | None:
        return None if name not in self.sums else self.sums[name] / self.rows[name]


@contextlib.contextmanager
def record_hessians(model: nn.Module) -> Iterator[HessianTables]:
    """Accumulate the input second moment of every weight layer of ``model`` while the block runs."""
    tables = HessianTables()
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=name: tables.update(n, mod, args[0]))
        for name, m in model.named_modules()
        if isinstance(m, _WEIGHT_LAYERS)
    ]
    try:
        yield tables
    finally:
        for h in handles:
            h.remove()


def _positions(module: nn.Module, x: Tensor) -> int:
    """Output positions per sample of a conv (rows its input unfolds into), from its geometry."""
    size = 1
    for i, n in enumerate(x.shape[2:]):
        k, d, p, st = module.kernel_size[i], module.dilation[i], module.padding[i], module.stride[i]
        size *= (n + 2 * p - d * (k - 1) - 1) // st + 1
    return size


def _input_columns(module: nn.Module, x: Tensor) -> Tensor:
    """``[rows, in_features]``: the input as the weight's columns see it (conv patches unfolded)."""
    if isinstance(module, QConv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if isinstance(module, QConv1d):
        patches = F.unfold(
            x[..., None], (module.kernel_size[0], 1), (module.dilation[0], 1), (module.padding[0], 0),
            (module.stride[0], 1),
        )  # fmt: skip
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def gptq_round(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    act_order: bool = ACT_ORDER,
) -> Tensor:
    """Integer codes (as float, ``[out, d]``) for ``weight`` ``[out, d]`` on per-column grids.

    ``scale`` / ``zero_point``: ``[out, d]`` (each column's output-channel scales: a split weight's halves have
    their own). Columns the calibration never excites (zero diagonal) are rounded to nearest."""
    w = weight.double().clone()
    h = hessian.double().clone()
    d = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += DAMPING * torch.diagonal(h).mean() * torch.eye(d, dtype=h.dtype, device=h.device)
    s, z = scale.double(), zero_point.double()
    order = None
    if act_order:  # the columns with the largest input energy first (GPTQ's "act-order"): their error is spread
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h, s, z = w[:, order], h[order][:, order], s[:, order], z[:, order]
    chol = torch.linalg.cholesky(h)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    codes = torch.empty_like(w)
    for i1 in range(0, d, BLOCK):
        i2 = min(i1 + BLOCK, d)
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        u = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = block[:, i]
            c = i1 + i
            q = (torch.round(col / s[:, c]) + z[:, c]).clamp(qmin, qmax)
            codes[:, c] = q
            err = (col - (q - z[:, c]) * s[:, c]) / u[i, i]
            block[:, i:] -= err[:, None] * u[i, i:][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    return codes


def apply_gptq(model: nn.Module, float_model: nn.Module, tables: HessianTables) -> list[str]:
    """Re-round the weights of every layer of ``model`` that ``tables`` observed, from the float weights of the
    same-named layer of ``float_model``. Returns the names of the layers re-rounded."""
    return apply_rounding(model, float_model, tables, gptq_round)


RoundFn = Callable[[Tensor, Tensor, Tensor, Tensor, int, int], Tensor]


def apply_rounding(
    model: nn.Module,
    float_model: nn.Module,
    tables: HessianTables,
    round_fn: RoundFn,
    *,
    progress: bool = False,
    desc: str = "round",
    interruptible: bool = False,
) -> list[str]:
    """`apply_gptq` with another rounding ``round_fn(weight, hessian, scale, zero_point, qmin, qmax) -> codes``
    (e.g. `cq.quant.adaround.adaround_round`), one layer at a time with a progress bar. With ``interruptible``,
    a KeyboardInterrupt stops after the layers finished (they keep their codes; the others keep theirs) and
    warns instead of propagating."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, _WEIGHT_LAYERS) and tables.hessian(name) is not None
    ]
    done: list[str] = []
    try:
        for name in tqdm(names, desc=desc, unit="layer", disable=not progress):
            _round_layer(model, float_model, name, tables.hessian(name), round_fn)
            done.append(name)
    except KeyboardInterrupt:
        if not interruptible:
            raise
        warnings.warn(
            f"{desc} interrupted: {len(done)} of {len(names)} layers re-rounded and kept, the other "
            f"{len(names) - len(done)} keep round-to-nearest codes",
            stacklevel=2,
        )
    return done


def _round_layer(model: nn.Module, float_model: nn.Module, name: str, h: Tensor, round_fn: RoundFn) -> None:
    module = model.get_submodule(name)
    weight = float_model.get_submodule(name).weight.detach()
    parts = [module.weight] + ([module.weight_skip] if getattr(module, "weight_skip", None) is not None else [])
    flat = weight.reshape(weight.shape[0], -1)
    scales, zeros = [], []
    for part in parts:
        width = part.weight_q[0].numel()
        scale, zp = _column_params(part, weight.shape[0])
        scales.append(scale.expand(-1, width))
        zeros.append(zp.expand(-1, width))
    spec = parts[0].spec
    codes = round_fn(flat, h.to(flat.device), torch.cat(scales, 1), torch.cat(zeros, 1), spec.qmin, spec.qmax)
    start = 0
    for part in parts:
        width = part.weight_q[0].numel()
        chunk = codes[:, start : start + width].reshape(part.weight_q.shape)
        part.weight_q.copy_(chunk.to(part.weight_q.dtype))
        start += width


def _column_params(part: QuantizedWeight, out: int) -> tuple[Tensor, Tensor]:
    """``[out, 1]`` scale and zero point of a quantized weight (per-tensor ones broadcast)."""
    scale = part.weight_scale.double().reshape(-1, 1).expand(out, 1)
    zp = part.weight_zero_point.double().reshape(-1, 1).expand(out, 1)
    return scale, zp
