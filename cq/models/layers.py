"""Small building blocks shared by the cq UNets."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


__all__ = ["MatMul", "ddpm_timestep_embedding"]


class MatMul(nn.Module):
    """``a @ b`` as a named module, so attention matmuls (q·kᵀ, softmax·v) can be observed and quantized.

    Holds no parameters: adding it changes no checkpoint key.
    """

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
