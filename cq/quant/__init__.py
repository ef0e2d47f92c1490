"""Post-training quantization by module replacement: specs, fake-quant modules, strategies, calibration."""

from ..calib.replay import CalibrationBatch
from ..registry import deprecated_names
from .affine import fake_quantize, qparams
from .backend import Backend
from .layer_table import FLOAT_TO_FAKE, LAYERS, LayerKind, fake_quant_classes, float_classes, integer_classes, kind_of
from .modules import ActQuantizer, QConv1d, QConv2d, QLinear, QMatMul, QuantizedWeight
from .ptq4dm import PTQ4DM
from .quantizer import Quantizer, quantized_modules
from .spec import QuantSpec
from .uniform import UniformQuantizer


__all__ = [
    "Backend",
    "QuantSpec",
    "Quantizer",
    "UniformQuantizer",
    "PTQ4DM",
    "QConv2d",
    "QConv1d",
    "QLinear",
    "QMatMul",
    "ActQuantizer",
    "QuantizedWeight",
    "CalibrationBatch",
    "quantized_modules",
    "qparams",
    "fake_quantize",
    "LayerKind",
    "LAYERS",
    "FLOAT_TO_FAKE",
    "kind_of",
    "float_classes",
    "fake_quant_classes",
    "integer_classes",
]


__getattr__ = deprecated_names(__name__, {"Uniform": UniformQuantizer})  # its former name, for one release
