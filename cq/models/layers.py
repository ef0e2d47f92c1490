"""Small building blocks shared by the cq UNets."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError


__all__ = ["MatMul", "ddpm_timestep_embedding"]


class MatMul(nn.Module):
    """``a @ b`` as a named module, so attention matmuls (q·kᵀ, softmax·v) can be observed and quantized.

    ``probabilities`` names the operand (``"a"`` or ``"b"``) that is a softmax output: its values lie in [0, 1]
    whatever the input, so a quantizer gives it that range instead of one calibrated on a few samples (a peaked
    attention on a held-out sample would otherwise be clamped and lose its mass). Holds no parameters: adding it
    changes no checkpoint key.
    """

    def __init__(self, probabilities: Literal["a", "b"] | None = None):
        super().__init__()
        if probabilities not in (None, "a", "b"):
            raise ConfigError(f"MatMul.probabilities must be None, 'a' or 'b', got {probabilities!r}")
        self.probabilities = probabilities

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(a, b)


def ddpm_timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of Ho et al. as in the ddim/pytorch_diffusion code: sin first, ``log(1e4)/(half-1)``.

    Equals diffusers' ``get_timestep_embedding(flip_sin_to_cos=False, downscale_freq_shift=1)`` up to op order.
    """
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1)))
    arg = t.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1, 0, 0))
    return emb
