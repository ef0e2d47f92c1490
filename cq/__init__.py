"""cq: cache + quantize diffusion UNets without retraining (CacheQuant, Liu et al., CVPR 2025, in pure PyTorch)."""

from . import diffusers, errors, models, sampling
from .artifact import load, save
from .budget import fit_to_budget
from .choose_point import PointChoice, choose_point
from .compressed import CompressedUNet
from .metrics.evaluate import Evaluation, evaluate
from .metrics.paired import PairedComparison, compare
from .recipe import Recipe, cachequant, deepcache, naive, quant_only
from .report import Report, report
from .trace import Trace, trace


__all__ = [
    "errors",
    "diffusers",
    "models",
    "sampling",
    "load",
    "save",
    "report",
    "Report",
    "trace",
    "Trace",
    "Recipe",
    "CompressedUNet",
    "evaluate",
    "Evaluation",
    "compare",
    "PairedComparison",
    "cachequant",
    "deepcache",
    "naive",
    "quant_only",
    "choose_point",
    "fit_to_budget",
    "PointChoice",
]
__version__ = "0.1.0"
