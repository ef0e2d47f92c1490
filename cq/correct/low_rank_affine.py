"""`LowRankAffine`: a per-step correction ``h <- a[step] ∘ h + U[step] (V[step] h) + b[step]`` (tensors in buffers).

DEC's per-channel affine (`ChannelAffine`) plus a rank-r map across channels, applied per pixel (two 1x1
convolutions of r channels): what a stale feature needs when its channels drift together, as at the shallow
cache points where a per-channel gain cannot follow the feature.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.step import step_row


__all__ = ["LowRankAffine"]


class LowRankAffine(nn.Module):
    """Per-step gain, offset (``[T, C]``) and rank-r cross-channel factors ``up [T, C, r]``, ``down [T, r, C]``.

    Identity when built (gain 1, the rest 0); correctors fill the buffers."""

    def __init__(self, num_steps: int, channels: int, rank: int):
        super().__init__()
        self.register_buffer("gain", torch.ones(num_steps, channels))
        self.register_buffer("offset", torch.zeros(num_steps, channels))
        self.register_buffer("up", torch.zeros(num_steps, channels, rank))
        self.register_buffer("down", torch.zeros(num_steps, rank, channels))

    def fill(self, gain: Tensor, offset: Tensor, up: Tensor, down: Tensor) -> None:
        """Copy fitted tensors (`cq.correct.low_rank_affine_fit`'s result) into the buffers."""
        for buffer, value in zip((self.gain, self.offset, self.up, self.down), (gain, offset, up, down), strict=True):
            buffer.copy_(value)

    @property
    def rank(self) -> int:
        return self.up.shape[2]

    @property
    def macs_per_pixel(self) -> int:
        """Multiply-adds per pixel of the corrected feature: the per-channel affine plus two rank-r 1x1 maps."""
        channels = self.gain.shape[1]
        return channels + 2 * self.rank * channels

    def forward(self, h: Tensor, step: int | Tensor) -> Tensor:
        """``h``: ``[B, C, ...]``; ``step``: an int or the 0-d step tensor (inside compiled graphs)."""
        shape = (1, -1) + (1,) * (h.ndim - 2)
        gain, offset = step_row(self.gain, step).to(h.dtype), step_row(self.offset, step).to(h.dtype)
        up, down = step_row(self.up, step).to(h.dtype), step_row(self.down, step).to(h.dtype)
        flat = h.flatten(2)  # [B, C, P]
        mixed = (up @ (down @ flat)).reshape(h.shape)
        return h * gain.reshape(shape) + mixed + offset.reshape(shape)

    def is_identity(self, step: int) -> bool:
        return bool(
            (self.gain[step] == 1).all()
            and (self.offset[step] == 0).all()
            and ((self.up[step] @ self.down[step]) == 0).all()
        )

    def extra_repr(self) -> str:
        return f"steps={self.gain.shape[0]}, channels={self.gain.shape[1]}, rank={self.rank}"
