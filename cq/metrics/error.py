"""Error of compressed samples against full-precision samples from the same noise."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError


__all__ = ["sample_error", "psnr", "per_sample_psnr", "mse_psnr", "sqnr"]


def sample_error(x: Tensor, reference: Tensor) -> dict[str, float]:
    """MSE and PSNR (data range [-1, 1], peak-to-peak 2) of ``x`` against ``reference``."""
    mse = float((x.detach().float() - reference.detach().float()).pow(2).mean())
    return {"mse": mse, "psnr": psnr(mse)}


def psnr(mse: float, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` when ``mse == 0``."""
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def sqnr(x: Tensor, reference: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |x - ref|^2)`` in dB (torchao convention)."""
    x, reference = x.detach().float(), reference.detach().float()
    noise = float((x - reference).pow(2).sum())
    signal = float(reference.pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def per_sample_psnr(x: Tensor, reference: Tensor, data_range: float = 2.0) -> Tensor:
    """``[N]`` PSNR in dB of each sample of ``x`` against the same row of ``reference`` (``inf`` where equal)."""
    if x.shape != reference.shape:
        raise ConfigError(f"samples {tuple(x.shape)} and reference {tuple(reference.shape)} differ in shape")
    mse = (x.detach().double() - reference.detach().double()).pow(2).flatten(1).mean(1)
    return mse_psnr(mse, data_range)


def mse_psnr(mse: Tensor, data_range: float = 2.0) -> Tensor:
    """PSNR in dB (float32) of each MSE in ``mse`` (``inf`` where 0): `per_sample_psnr` of errors already
    reduced, e.g. a `cq.fit.rollout.CalibrationRollout`'s."""
    return (10 * torch.log10(data_range**2 / mse)).float()
