"""Lowering a fitted `CompressedUNet` to ONNX: cq's own scales as QuantizeLinear / DequantizeLinear pairs.

Two graphs per model, as DeepCache runs (Ma et al. 2024, Sec. 3.2): the **full** call, which also outputs the
feature entering the cache point, and the **shallow** call, which takes that feature as an input. The sampler
loop, the refresh-or-reuse decision and the cache-error correction stay in Python (`FeatureCache`), exactly as in
eager execution.

What each quantized layer becomes:

* every calibrated unsigned 8-bit activation quantizer -> ``QuantizeLinear`` + ``DequantizeLinear`` with that
  step's scale and zero point (ONNX rounds half to even, cq half up: the two differ only on exact ties);
* weights -> signed codes behind a per-output-channel ``QuantizeLinear`` + ``DequantizeLinear`` (``axis=0``,
  zero point 0) when they fit the CPU's exact int8 range (`cq.runtime.cpu.int8_weight_limit`), so the runtime runs
  that layer on int8 kernels. The int8 kernels take no weight zero points, so asymmetric codes ``q`` (zero point
  ``z``) are shifted per channel to ``c = q - m`` within that range, and the remainder is a rank-one term:
  ``op(x, s (q - z)) = op(x, s c) + s (m - z) * op(x, 1)``, the window sum of the input (one output channel, also
  int8) scaled per output channel -- the same decomposition as PyTorch's oneDNN path (`cq.quant.onednn`). Codes
  that do not fit (8-bit asymmetric codes span 255 levels: exact only with VNNI) stay float constants (exact in
  float: the runtime keeps that layer float);
* a split convolution (input ``cat(cached, skip)`` with one activation table per half, CacheQuant's split
  quantization) -> two convolutions, one per half, summed; the decoupled quantization-error correction of the
  cached half (`cq.correct.QuantErrorCorrector`) is a per-channel affine between them;
* a signed symmetric 8-bit activation quantizer -> a clamp at ``-127`` steps (cq's signed grid) and an int8
  ``QuantizeLinear`` + ``DequantizeLinear``;
* an attention matmul -> the matmul of its two quantized operands, transposed where that puts the softmax first
  (`_LoweredMatMul`): OpenVINO runs it on int8 kernels when neither operand has a zero point
  (`matmul_float_reason`; ``UniformQuantizer(attention_symmetric=True)``);
* activation quantizers the ONNX operators cannot express (other bit widths) -> cq's own rounding
  formula in float operators (exact, not accelerated) when ``fallback=True``; otherwise `ExportUnsupportedError`
  naming the layer.

The activation tables and corrections are graph *inputs* (``q{i}.scale``, ``q{i}.zero_point``, ``c{j}.gain``,
``c{j}.offset``): one exported graph serves every step; a runtime turns the table inputs into constants per
distinct table (`cq.runtime.openvino`), which is what lets it fuse the int8 kernels.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.view import CacheView
from ..errors import ExportUnsupportedError
from ..quant.affine import fake_quantize
from ..quant.modules import ActQuantizer, QConv1d, QConv2d, QLinear, QMatMul, QuantizedWeight
from ..quant.quantizer import set_submodule
from .cpu import int8_weight_limit


__all__ = [
    "LoweredCall",
    "LoweredLayers",
    "lower_call",
    "lower_layers",
    "layer_plan",
    "float_weight_reason",
    "matmul_float_reason",
    "table_acts",
]


@dataclass(frozen=True)
class LoweredCall:
    """One exported graph and how to feed it.

    Attributes:
        onnx: the serialized ONNX model.
        shallow: True for the shallow call (input ``feature``), False for the full call (output ``feature``).
        acts: the activation quantizers behind the table inputs ``q{i}.*``, in order (names in the UNet).
        corrections: the per-step affines behind ``c{j}.*`` (names of the layers they correct).
        t_dtype: the dtype ``t`` was exported with.
    """

    onnx: bytes
    shallow: bool
    acts: tuple[str, ...]
    corrections: tuple[str, ...]
    t_dtype: torch.dtype


class _TableAct(nn.Module):
    """Export stand-in of an `ActQuantizer`: quantizes with the table bound for this trace (graph inputs)."""

    def __init__(self, act: ActQuantizer, name: str, fallback: bool):
        super().__init__()
        self.spec, self.name = act.spec, name
        self.onnx_native = act.spec.bits == 8
        if not self.onnx_native and not fallback:
            raise ExportUnsupportedError(
                f"{name}: {act.spec.bits}-bit activations have no ONNX QuantizeLinear form (it takes 8-bit grids); "
                "quantize the activations to 8 bits, or pass fallback=True to run this quantizer as float operators"
            )
        if not bool(act.calibrated.all()):
            raise ExportUnsupportedError(
                f"{name}: activation quantizer not calibrated at every step; fit the model on a trace "
                "(Recipe.fit) before lowering it"
            )
        self.bound: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        scale, zero_point = self.bound
        if not self.onnx_native:
            return fake_quantize(x, scale, zero_point.float(), self.spec)
        if self.spec.symmetric:  # cq's signed grid stops at -127, int8's at -128: clamp first (fused by runtimes)
            x = torch.maximum(x, -127 * scale)
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), -128, 127)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), 0, 255)


class _ConstWeight(nn.Module):
    """Export stand-in of a `QuantizedWeight`: signed codes behind a per-channel Q/DQ pair and the per-channel
    remainder of the shift (`int8_codes`) where the codes fit the CPU's exact int8 range, else float constants."""

    def __init__(self, weight: QuantizedWeight, columns: slice | None, limit: int, groups: int = 1):
        super().__init__()
        q = weight.weight_q if columns is None else weight.weight_q[:, columns]
        channels = q.shape[0]
        scale = weight.weight_scale.float().expand(channels).clone()
        zero_point = weight.weight_zero_point.float().expand(channels)
        self.int8 = not float_weight_reason(weight, limit, groups)
        shape = (-1,) + (1,) * (q.ndim - 1)
        if self.int8:
            codes, shift = int8_codes(q, zero_point, limit)
            self.register_buffer("w", (codes.float() * scale.reshape(shape)).contiguous())
            remainder = scale * (shift - zero_point)
            self.remainder = remainder if bool(remainder.any()) else None
        else:
            self.register_buffer("w", ((q.float() - zero_point.reshape(shape)) * scale.reshape(shape)).contiguous())
            self.remainder = None
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int32))

    def dequantized(self) -> Tensor:
        if not self.int8:
            return self.w
        return torch.fake_quantize_per_channel_affine(self.w, self.scale, self.zero_point, 0, -128, 127)

    def window_term(self, xq: Tensor, op, *args) -> Tensor | float:
        """``s (m - z) * op(xq, 1)``: what the shifted codes leave out (0 where nothing is shifted). ``op`` is
        the layer's function (``F.conv2d`` / ``F.conv1d`` / ``F.linear``), ``args`` its stride etc."""
        if self.remainder is None:
            return 0.0
        ones = torch.fake_quantize_per_channel_affine(
            torch.ones((1, *self.w.shape[1:])), torch.ones(1), torch.zeros(1, dtype=torch.int32), 0, -128, 127
        )
        window = op(xq, ones, None, *args)  # one output channel: the input's sum under each output position
        if op is F.linear:  # [..., 1] * [out]
            return window * self.remainder
        return window * self.remainder.reshape((1, -1) + (1,) * (window.ndim - 2))


def int8_codes(q: Tensor, zero_point: Tensor, limit: int) -> tuple[Tensor, Tensor]:
    """``(c, m)``: signed codes ``c = q - m`` per output channel and the shift ``m`` (as close to the zero point
    as the range allows, so symmetric codes keep ``m = z = 0``), with ``c`` inside `_code_range(limit)`."""
    lo, hi = _code_range(limit)
    flat = q.reshape(q.shape[0], -1).float()
    low, high = flat.amin(1), flat.amax(1)
    shift = torch.maximum(torch.minimum(zero_point, low - lo), high - hi)
    return (q.float() - shift.reshape((-1,) + (1,) * (q.ndim - 1))).to(torch.int8), shift


def _code_range(limit: int) -> tuple[int, int]:
    """The signed codes the CPU's int8 kernels sum exactly: all of int8 with VNNI (``limit >= 127``), else
    ``[-limit, limit]``."""
    return (-128, 127) if limit >= 127 else (-limit, limit)


class _BoundAffine(nn.Module):
    """Export stand-in of a per-step `ChannelAffine`: gain and offset bound for this trace (graph inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.bound: tuple[Tensor, Tensor] | None = None

    def forward(self, h: Tensor, step: object = None) -> Tensor:
        gain, offset = self.bound
        shape = (1, -1) + (1,) * (h.ndim - 2)
        return h * gain.reshape(shape) + offset.reshape(shape)


class _SplitConv2d(nn.Module):
    """Export form of a `QConv2d`: one convolution, or two over the halves of a split input (one activation table
    and one per-channel weight scale each), the cached half's correction applied before the sum."""

    def __init__(self, conv: QConv2d, acts: dict[str, _TableAct], limit: int, name: str):
        super().__init__()
        self.args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        self.bias = conv.bias
        self.split = conv.split
        self.act = acts[_child(name, "act")]
        if conv.split is None:
            self.weight = _ConstWeight(conv.weight, None, limit, conv.groups)
            return
        c = conv.split
        self.act_skip = acts[_child(name, "act_skip")]
        if conv.weight_skip is not None:
            self.weight = _ConstWeight(conv.weight, None, limit)
            self.weight_skip = _ConstWeight(conv.weight_skip, None, limit)
        else:
            self.weight = _ConstWeight(conv.weight, slice(0, c), limit)
            self.weight_skip = _ConstWeight(conv.weight, slice(c, None), limit)
        self.correction = _BoundAffine() if conv.correction is not None else None
        self.sizes = [c, int(self.weight_skip.w.shape[1])]  # static sizes: one Split, foldable into a concat

    def forward(self, x: Tensor) -> Tensor:
        if self.split is None:
            return _weighted(F.conv2d, self.act(x), self.weight, self.bias, self.args)
        head, tail = torch.split(x, self.sizes, dim=1)
        cached = _weighted(F.conv2d, self.act(head), self.weight, self.bias, self.args)
        if self.correction is not None:
            cached = self.correction(cached)
        return cached + _weighted(F.conv2d, self.act_skip(tail), self.weight_skip, None, self.args)


class _LoweredLayer(nn.Module):
    """Export form of a `QLinear` / `QConv1d`: its activation table, then the layer on `_ConstWeight`."""

    def __init__(self, layer: QLinear | QConv1d, acts: dict[str, _TableAct], limit: int, name: str):
        super().__init__()
        conv = isinstance(layer, QConv1d)
        self.op = F.conv1d if conv else F.linear
        self.args = (layer.stride, layer.padding, layer.dilation, layer.groups) if conv else ()
        self.act, self.bias = acts[_child(name, "act")], layer.bias
        self.weight = _ConstWeight(layer.weight, None, limit, layer.groups if conv else 1)

    def forward(self, x: Tensor) -> Tensor:
        return _weighted(self.op, self.act(x), self.weight, self.bias, self.args)


class _LoweredMatMul(nn.Module):
    """Export form of a `QMatMul`. OpenVINO's int8 matmul takes a zero-point-free first operand (unsigned or
    signed) and a signed second one: a signed first operand times the softmax is computed transposed,
    ``a @ b = (bᵀ @ aᵀ)ᵀ``, so the softmax comes first."""

    def __init__(self, matmul: QMatMul, acts: dict[str, _TableAct], name: str):
        super().__init__()
        self.act, self.act_b = acts[_child(name, "act")], acts[_child(name, "act_b")]
        self.swap = matmul.probabilities == "b" and matmul.act.spec.symmetric

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.swap:
            return torch.matmul(self.act_b(b).transpose(-1, -2), self.act(a).transpose(-1, -2)).transpose(-1, -2)
        return torch.matmul(self.act(a), self.act_b(b))


def matmul_float_reason(matmul: QMatMul) -> str:
    """Why ``matmul`` runs in float on OpenVINO ("" when it runs int8): its int8 matmul takes operands without
    zero points -- a signed or softmax first operand, a signed second (either order, `_LoweredMatMul`)."""
    specs = {side: getattr(matmul, attr).spec for side, attr in (("a", "act"), ("b", "act_b"))}
    if any(s.bits != 8 for s in specs.values()):
        return "operands are not 8-bit"
    if all(s.symmetric or matmul.probabilities == side for side, s in specs.items()):
        return ""
    return (
        "operands with zero points: OpenVINO's int8 matmul takes none "
        "(UniformQuantizer(attention_symmetric=True) gives signed ones)"
    )


def _weighted(op, xq: Tensor, weight: _ConstWeight, bias: Tensor | None, args: tuple) -> Tensor:
    """``op(xq, W) + bias`` with ``W`` as `_ConstWeight` holds it: shifted codes plus their window term."""
    out = op(xq, weight.dequantized(), bias, *args)
    return out if weight.remainder is None else out + weight.window_term(xq, op, *args)


def table_acts(module: nn.Module, fallback: bool) -> dict[str, _TableAct]:
    """The export form of every activation quantizer of ``module``, by name; `ExportUnsupportedError` for one
    the lowering cannot express (without ``fallback``) or that is not calibrated."""
    return {
        name: _TableAct(sub, name, fallback) for name, sub in module.named_modules() if isinstance(sub, ActQuantizer)
    }


def _child(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


def float_weight_reason(weight: QuantizedWeight, limit: int, groups: int = 1) -> str:
    """Why ``weight`` cannot run on the int8 kernels exactly ("" when it can): its codes, shifted per channel to
    signed ones (`int8_codes`), must fit the CPU's exact range (without VNNI ``[-limit, limit]``,
    `cq.runtime.cpu`), and a shift needs an ungrouped layer (one window sum for every output channel)."""
    lo, hi = _code_range(limit)
    q = weight.weight_q.reshape(weight.weight_q.shape[0], -1).float()
    span = int((q.amax(1) - q.amin(1)).max())
    if span > hi - lo:
        return f"weight codes span {span + 1} levels > {hi - lo + 1}, the exact u8 x s8 range of a CPU without VNNI"
    zero_point = weight.weight_zero_point.float().expand(q.shape[0])
    if groups != 1 and not torch.equal(int8_codes(weight.weight_q, zero_point, limit)[1], zero_point):
        return "shifted weight codes in a grouped convolution: no single window sum"
    return ""


def layer_plan(unet: nn.Module, limit: int | None = None) -> dict[str, str]:
    """How each quantized layer of ``unet`` runs once lowered: ``"int8"`` or ``"float weights (<why>)"``."""
    limit = int8_weight_limit() if limit is None else limit
    plan = {}
    for name, module in unet.named_modules():
        if isinstance(module, QMatMul):
            reason = matmul_float_reason(module)
            plan[name] = f"float ({reason})" if reason else "int8"
            continue
        if not isinstance(module, QConv2d | QLinear | QConv1d):
            continue
        weights = [module.weight] + ([module.weight_skip] if getattr(module, "weight_skip", None) else [])
        groups = getattr(module, "groups", 1)
        reasons = [r for r in (float_weight_reason(w, limit, groups) for w in weights) if r]
        acts = [m for m in module.children() if isinstance(m, ActQuantizer)]
        if any(a.spec.bits != 8 or a.spec.symmetric for a in acts):
            reasons.append("activations are not unsigned 8-bit")
        plan[name] = f"float weights ({reasons[0]})" if reasons else "int8"
    return plan


class _Call(nn.Module):
    """The traced function: ``(x, t[, feature], *tables) -> out[, feature]``."""

    def __init__(self, unet: nn.Module, point: str, shallow: bool, acts: list[_TableAct], affines: list[_BoundAffine]):
        super().__init__()
        self.unet, self.point, self.shallow = unet, point, shallow
        self.acts, self.affines = acts, affines  # plain lists: the modules are registered inside the UNet

    def forward(self, x: Tensor, t: Tensor, *rest: Tensor):
        feature, tables = (rest[0], rest[1:]) if self.shallow else (None, rest)
        n = len(self.acts)
        for i, act in enumerate(self.acts):
            act.bound = (tables[2 * i], tables[2 * i + 1])
        for j, affine in enumerate(self.affines):
            affine.bound = (tables[2 * n + 2 * j], tables[2 * n + 2 * j + 1])
        if self.shallow:
            return self.unet(x, t, None, cache=CacheView.shallow(self.point, feature))
        view = CacheView.full(record=[self.point])
        out = self.unet(x, t, None, cache=view)
        return out, view.features[self.point]


@dataclass
class LoweredLayers:
    """A copy of a module with every fake-quant layer in its export form (`lower_layers`).

    Attributes:
        body: the copy.
        acts: name -> export activation quantizer, in module order; bind ``act.bound = (scale, zero_point)``.
        corrections: name of the corrected layer -> its export affine; bind ``affine.bound = (gain, offset)``.
    """

    body: nn.Module
    acts: dict[str, _TableAct]
    corrections: dict[str, _BoundAffine]


def lower_layers(module: nn.Module, *, fallback: bool = False, limit: int | None = None) -> LoweredLayers:
    """Copy ``module`` and swap each fake-quant layer for its export form (see the module docstring)."""
    limit = int8_weight_limit() if limit is None else limit
    body = copy.deepcopy(module).eval()
    acts = table_acts(body, fallback)
    corrections: dict[str, _BoundAffine] = {}
    for name, sub in list(body.named_modules()):
        if isinstance(sub, QConv2d):
            lowered = _SplitConv2d(sub, acts, limit, name)
            if lowered.split is not None and lowered.correction is not None:
                corrections[name] = lowered.correction
            if name:
                set_submodule(body, name, lowered)
            else:
                body = lowered
        elif isinstance(sub, QLinear | QConv1d):
            set_submodule(body, name, _LoweredLayer(sub, acts, limit, name))
        elif isinstance(sub, QMatMul):
            set_submodule(body, name, _LoweredMatMul(sub, acts, name))
    return LoweredLayers(body, acts, corrections)


def lower_call(
    unet: nn.Module,
    point: str,
    *,
    shallow: bool,
    example: tuple[Tensor, Tensor],
    feature_shape: tuple[int, ...] | None = None,
    fallback: bool = False,
    limit: int | None = None,
) -> LoweredCall:
    """Export one call of the quantized ``unet`` (a `CompressedUNet`'s ``unet``: fake-quant layers) to ONNX.

    Args:
        point: the cache point the full call outputs / the shallow call reads.
        shallow: which of the two calls.
        example: ``(x, t)`` of the batch to trace with (the batch axis stays dynamic).
        feature_shape: the cached feature's shape (shallow call only).
        fallback: run activation quantizers ONNX cannot express as float operators instead of refusing.
        limit: largest weight code run on int8 kernels (default: this CPU's exact range).
    """
    lowered = lower_layers(unet, fallback=fallback, limit=limit)
    body = lowered.body
    used = list(lowered.acts.values())
    affines, corrections = list(lowered.corrections.values()), list(lowered.corrections)
    call = _Call(body, point, shallow, used, affines)
    x, t = example
    args: list[Tensor] = [x, t]
    names = ["x", "t"]
    if shallow:
        args.append(torch.zeros(x.shape[0], *feature_shape[1:]))
        names.append("feature")
    for i in range(len(used)):
        args += [torch.ones(()), torch.zeros((), dtype=torch.int32)]
        names += [f"q{i}.scale", f"q{i}.zero_point"]
    for j, name in enumerate(corrections):
        channels = body.get_submodule(name).weight.w.shape[0]
        args += [torch.ones(channels), torch.zeros(channels)]
        names += [f"c{j}.gain", f"c{j}.offset"]
    outputs = ["out"] if shallow else ["out", "feature_out"]
    dynamic = {n: {0: "batch"} for n in ("x", "t", "feature", *outputs) if n in names or n in outputs}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape checks: they hold per batch
        torch.onnx.export(
            call,
            tuple(args),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=False,  # folding would merge the weights' Q/DQ pairs
        )
    return LoweredCall(
        onnx=buffer.getvalue(),
        shallow=shallow,
        acts=tuple(a.name for a in used),
        corrections=tuple(corrections),
        t_dtype=t.dtype,
    )
