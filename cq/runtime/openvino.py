"""`OpenVINOUNet`: a fitted `CompressedUNet`'s UNet run by OpenVINO's CPU plugin on its int8 kernels.

The model is lowered once per call kind (`cq.runtime.lower`: full and shallow graph, activation tables and
corrections as inputs). For each distinct activation table (per step, or per cache group with
``activation_tables="per_group"``) and batch size, the table inputs become constants and the graph is compiled:
OpenVINO's low-precision passes then turn each quantize / dequantize pair around a convolution or matmul into an
int8 kernel with a float32 output. Compiled graphs are kept, so a sampling run compiles at most two per table.

It takes the UNet's place inside `CompressedUNet` (`CompressedUNet.to_runtime`): the sampler, the step, the
refresh-or-reuse decision, the input checks and the cache-error correction are the model's own, unchanged.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.step import current_step
from ..core.view import CacheView
from ..errors import BackendUnavailableError, ExportUnsupportedError
from ..quant.modules import ActQuantizer
from .lower import LoweredCall, layer_plan, lower_call, table_acts


__all__ = ["OpenVINOUNet", "openvino_available"]


def openvino_available() -> bool:
    """Whether the ``openvino`` package imports (``pip install 'cq[openvino]'``)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _openvino():
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError(
            "the OpenVINO backend needs the openvino package: pip install 'cq[openvino]'"
        ) from e
    return openvino


class OpenVINOUNet:
    """Stands in for a quantized cq UNet: ``runtime(x, t, cond=None, cache=view)`` inside a step scope.

    Not an ``nn.Module``: it holds compiled graphs, not state; the fitted tables stay in the source UNet (and so
    in the model's state dict and its .cq file).

    Args:
        unet: the `CompressedUNet`'s quantized UNet (fake-quant layers, calibrated).
        point: the cache point the full graph outputs and the shallow graph reads.
        num_steps: steps of the model (one table row per step).
        threads: OpenVINO inference threads (default: ``torch.get_num_threads()``).
        fallback: lower activation quantizers ONNX cannot express as float operators (else refused).
    """

    def __init__(
        self, unet: torch.nn.Module, point: str, num_steps: int, *, threads: int | None = None, fallback: bool = False
    ):
        self._ov = _openvino()
        self.unet, self.point, self.num_steps = unet, point, num_steps
        self.threads = int(threads or torch.get_num_threads())
        self.fallback = fallback
        table_acts(unet, fallback)  # refuses what the lowering cannot express now, not at the first call
        self.plan = layer_plan(unet)
        self._core = self._ov.Core()
        self._lowered: dict[bool, LoweredCall] = {}
        self._inputs: dict[bool, set[str]] = {}
        self._compiled: dict[tuple[bool, str, int], Any] = {}
        self._keys: dict[tuple[bool, int], tuple[str, dict[str, np.ndarray]]] = {}

    # ------------------------------------------------------------------------------------------------------------

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None, *, cache: CacheView | None = None) -> Tensor:
        if cond is not None:
            raise ExportUnsupportedError(
                "the OpenVINO backend runs unconditional UNets (cond=None); run conditional models on the "
                "PyTorch backends"
            )
        shallow = cache is not None and cache.is_shallow
        if cache is not None and not shallow and cache.record - {self.point}:
            raise ExportUnsupportedError(
                f"the OpenVINO graph outputs the feature at {self.point!r} only; asked to record "
                f"{sorted(cache.record)}"
            )
        step = current_step()
        t = torch.as_tensor(t).expand(x.shape[0])
        feeds: dict[str, np.ndarray] = {"x": x.detach().float().contiguous().numpy()}
        feature = cache.cached().detach().float().contiguous() if shallow else None
        lowered = self._lower(shallow, x, t, feature)
        feeds["t"] = t.to(lowered.t_dtype).numpy()
        if feature is not None:
            feeds["feature"] = feature.numpy()
        for j, name in enumerate(lowered.corrections):
            correction = self.unet.get_submodule(name).correction
            feeds[f"c{j}.gain"] = correction.gain[step].float().numpy()
            feeds[f"c{j}.offset"] = correction.offset[step].float().numpy()
        request = self._request(shallow, step, x.shape[0])
        request.infer({k: v for k, v in feeds.items() if k in self._inputs[shallow]})
        out = torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))
        if cache is not None and not shallow:
            cache.store(self.point, torch.from_numpy(np.array(request.get_output_tensor(1).data, copy=True)))
        return out

    @property
    def compiled_graphs(self) -> int:
        """How many graphs have been compiled so far: one per (full / shallow call, distinct activation table,
        batch size)."""
        return len(self._compiled)

    def compiled_models(self) -> list[Any]:
        """The OpenVINO ``CompiledModel`` of each graph compiled so far, in compile order (to inspect what the
        runtime made of them: ``get_runtime_model()``, ``bench/openvino_graph.py``)."""
        return [request.get_compiled_model() for request in self._compiled.values()]

    def describe(self) -> dict[str, str]:
        """Layer -> how it runs: ``"int8 (OpenVINO)"`` or ``"float weights (OpenVINO: <why>)"``."""
        return {
            name: f"{mode.split(' (')[0]} (OpenVINO{': ' + mode.split(' (', 1)[1][:-1] if '(' in mode else ''})"
            for name, mode in self.plan.items()
        }

    # ------------------------------------------------------------------------------------------------------------

    def _lower(self, shallow: bool, x: Tensor, t: Tensor, feature: Tensor | None) -> LoweredCall:
        if shallow not in self._lowered:
            self._lowered[shallow] = lower_call(
                self.unet,
                self.point,
                shallow=shallow,
                example=(x, t),
                feature_shape=None if feature is None else tuple(feature.shape),
                fallback=self.fallback,
            )
            import onnx

            self._inputs[shallow] = {i.name for i in onnx.load_from_string(self._lowered[shallow].onnx).graph.input}
        return self._lowered[shallow]

    def _tables(self, shallow: bool, step: int) -> tuple[str, dict[str, np.ndarray]]:
        """The table constants of ``step`` and their digest (steps with equal tables share a compiled graph)."""
        if (shallow, step) not in self._keys:
            values: dict[str, np.ndarray] = {}
            for i, name in enumerate(self._lowered[shallow].acts):
                act = self.unet.get_submodule(name)
                assert isinstance(act, ActQuantizer)
                row = step if act.spec.per_step else 0
                values[f"q{i}.scale"] = act.scale[row].float().numpy().reshape(())
                values[f"q{i}.zero_point"] = act.zero_point[row].to(torch.int32).numpy().reshape(())
            digest = hashlib.sha256(b"".join(v.tobytes() for v in values.values())).hexdigest()
            self._keys[(shallow, step)] = (digest, values)
        return self._keys[(shallow, step)]

    def _request(self, shallow: bool, step: int, batch: int):
        digest, values = self._tables(shallow, step)
        key = (shallow, digest, batch)
        if key not in self._compiled:
            ov = self._ov
            model = _fold_concat_splits(self._core.read_model(_bind_inputs(self._lowered[shallow].onnx, values), b""))
            shapes = {}
            for param in model.get_parameters():
                shape = param.get_partial_shape()
                if shape.rank.get_length() and shape[0].is_dynamic:
                    shape[0] = batch
                shapes[param.output(0)] = shape
            model.reshape(shapes)
            compiled = self._core.compile_model(
                model, "CPU", {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": ov.Type.f32}
            )
            self._compiled[key] = compiled.create_infer_request()
        return self._compiled[key]


def _bind_inputs(onnx_model: bytes, values: dict[str, np.ndarray]) -> bytes:
    """``onnx_model`` with the named graph inputs turned into constants (initializers). Bound before OpenVINO
    reads the model, its ONNX frontend sees constant quantize / dequantize pairs and makes each one FakeQuantize,
    which its low-precision passes lower to int8 kernels everywhere (bound after reading, attention matmuls stay
    float and each quantize step runs as a float subgraph)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_model)
    kept = [i for i in model.graph.input if i.name not in values]
    model.graph.initializer.extend(
        numpy_helper.from_array(values[i.name], i.name) for i in model.graph.input if i.name in values
    )
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model.SerializeToString()


def _fold_concat_splits(model):
    """Feed each ``Split(Concat(a, b))`` into exactly ``(a, b)`` straight from ``a`` and ``b``: a split conv
    (`cq.runtime.lower`) reads the halves of the UNet's ``cat(cached, skip)``, and OpenVINO would otherwise copy
    both (measured: 8 ms of 184 for the CIFAR-10 UNet at batch 8). Returns ``model``, rewired in place."""
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Split", "VariadicSplit") or op.input_value(1).get_node().get_type_name() != (
            "Constant"
        ):
            continue
        concat = op.input_value(0).get_node()
        if concat.get_type_name() != "Concat" or concat.get_input_size() != op.get_output_size():
            continue
        rank = concat.get_output_partial_shape(0).rank.get_length()
        axis = int(op.input_value(1).get_node().get_vector()[0]) % rank
        if axis != int(concat.get_attributes()["axis"]) % rank:
            continue
        parts = [concat.input_value(i) for i in range(concat.get_input_size())]
        sizes = [p.get_partial_shape()[axis] for p in parts]
        outs = [op.get_output_partial_shape(i)[axis] for i in range(op.get_output_size())]
        if any(d.is_dynamic for d in sizes + outs):
            continue
        if [d.get_length() for d in sizes] != [d.get_length() for d in outs]:
            continue
        for i, part in enumerate(parts):
            op.output(i).replace(part)
    return model
