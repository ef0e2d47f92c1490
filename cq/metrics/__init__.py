"""Measurements: MAC counts and predicted speedups; errors against full precision."""

from .error import psnr, sample_error
from .macs import MacCount, count_macs, predicted_speedup, unet_macs
from .seed_stability import Stability, stability


__all__ = [
    "MacCount",
    "count_macs",
    "unet_macs",
    "predicted_speedup",
    "psnr",
    "sample_error",
    "Stability",
    "stability",
]
