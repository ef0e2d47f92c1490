"""Packing 4-bit weight codes two per byte for storage (the file holds half the bytes of int8 codes)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CheckpointFormatError


__all__ = ["pack_nibbles", "unpack_nibbles"]


def pack_nibbles(codes: Tensor, offset: int = 0) -> Tensor:
    """``codes + offset`` (each in [0, 15]) -> uint8 ``[ceil(n/2)]``: element 2i in the low nibble, 2i+1 high."""
    flat = codes.reshape(-1).to(torch.int16) + offset
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 15):
        raise ValueError(f"codes + {offset} must lie in [0, 15] to pack, got [{int(flat.min())}, {int(flat.max())}]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_nibbles(packed: Tensor, shape: tuple[int, ...], dtype: torch.dtype, offset: int = 0) -> Tensor:
    """Inverse of `pack_nibbles`."""
    n = 1
    for s in shape:
        n *= s
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise CheckpointFormatError(f"packed 4-bit tensor has {packed.numel()} bytes, expected {(n + 1) // 2}")
    p = packed.to(torch.int16)
    flat = torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)[:n]
    return (flat - offset).to(dtype).reshape(shape)
