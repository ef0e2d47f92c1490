"""Running a fitted model on an inference runtime's kernels: lowering to ONNX (`lower`), OpenVINO (`openvino`),
what this CPU's int8 kernels compute exactly (`cpu`), and
which path runs a model fastest here (`dispatch`)."""

from .cpu import cpu_flags, cpu_line, has_vnni, int8_weight_limit
from .dispatch import cpu_int8_path
from .lower import LoweredCall, LoweredLayers, layer_plan, lower_call, lower_layers
from .openvino import OpenVINOUNet, openvino_available


__all__ = [
    "cpu_flags",
    "cpu_int8_path",
    "cpu_line",
    "has_vnni",
    "int8_weight_limit",
    "LoweredCall",
    "LoweredLayers",
    "layer_plan",
    "lower_call",
    "lower_layers",
    "OpenVINOUNet",
    "openvino_available",
]
