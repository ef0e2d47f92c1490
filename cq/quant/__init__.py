"""Post-training quantization by module replacement: specs, fake-quant modules, strategies, calibration."""

from ..replay import CalibrationBatch
from .backend import Backend
from .modules import ActQuantizer, QConv1d, QConv2d, QLinear, QMatMul, QuantizedWeight
from .ptq4dm import PTQ4DM
from .quantizer import Quantizer, quantized_modules
from .spec import QuantSpec
from .uniform import Uniform


__all__ = [
    "Backend",
    "QuantSpec",
    "Quantizer",
    "Uniform",
    "PTQ4DM",
    "QConv2d",
    "QConv1d",
    "QLinear",
    "QMatMul",
    "ActQuantizer",
    "QuantizedWeight",
    "CalibrationBatch",
    "quantized_modules",
]
