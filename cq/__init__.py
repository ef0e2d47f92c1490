"""cq: cache + quantize diffusion UNets without retraining (CacheQuant, Liu et al., CVPR 2025, in pure PyTorch)."""

from . import errors, models, sampling
from .models import build, load
from .trace import Trace, trace


__all__ = ["errors", "models", "sampling", "build", "load", "trace", "Trace"]
__version__ = "0.1.0"
