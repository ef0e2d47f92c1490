"""`ChannelAffine`: a per-step, per-channel affine correction ``h <- a[step] * h + b[step]`` (tensors in buffers)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.step import step_row


__all__ = ["ChannelAffine"]


class ChannelAffine(nn.Module):
    """Per-step, per-channel gain and offset, applied to ``[B, C, ...]`` tensors.

    Identity when built; correctors fill ``gain`` and ``offset`` (``[T, C]``).
    """

    def __init__(self, num_steps: int, channels: int):
        super().__init__()
        self.register_buffer("gain", torch.ones(num_steps, channels))
        self.register_buffer("offset", torch.zeros(num_steps, channels))

    def forward(self, h: Tensor, step: int | Tensor) -> Tensor:
        """``step``: an int, or the 0-d step tensor of `cq.core.step.current_step_index` (inside compiled graphs)."""
        shape = (1, -1) + (1,) * (h.ndim - 2)
        gain, offset = step_row(self.gain, step), step_row(self.offset, step)
        return h * gain.reshape(shape).to(h.dtype) + offset.reshape(shape).to(h.dtype)

    @property
    def macs_per_pixel(self) -> int:
        """Multiply-adds per pixel of the corrected feature (one per channel)."""
        return self.gain.shape[1]

    def is_identity(self, step: int) -> bool:
        return bool((self.gain[step] == 1).all() and (self.offset[step] == 0).all())

    def extra_repr(self) -> str:
        return f"steps={self.gain.shape[0]}, channels={self.gain.shape[1]}"
