"""`seeded_noise`: initial noise where every sample depends on its own seed only (edm2 style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


__all__ = ["seeded_noise"]


def seeded_noise(sample_shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """``[len(seeds), *sample_shape]`` standard normal noise, each row drawn from its own seed (edm2 style).

    A sample depends only on its seed, not on the batch it was drawn in.
    """
    rows = [
        torch.randn(tuple(sample_shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds
    ]
    return torch.stack(rows) if rows else torch.empty((0, *sample_shape), dtype=dtype)
