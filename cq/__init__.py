"""cq: cache + quantize diffusion UNets without retraining (CacheQuant, Liu et al., CVPR 2025, in pure PyTorch)."""

from . import _moved, diffusers, errors, models, sampling
from .artifact import load, save
from .calib.trace import Trace, trace
from .compressed import CompressedUNet
from .fit.budget import fit_to_budget
from .fit.choose_point import PointChoice, choose_point
from .fit.recipe import Recipe, cachequant, deepcache, naive, quant_only
from .metrics.evaluate import Evaluation, evaluate
from .metrics.paired import PairedComparison, compare
from .report.summary import Report, report


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

_moved.install(__name__)
__getattr__ = _moved.package_getattr(__name__)
