"""Samples written as pictures: image grids (PNG) and the images themselves (uint8 npz), atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..io import atomic_path


__all__ = ["save_grid", "to_uint8_grid", "save_npz"]


def to_uint8_grid(images: Tensor, nrow: int = 8, padding: int = 2, scale: int = 1) -> Tensor:
    """``[B, C, H, W]`` images in [-1, 1] -> one ``[H', W', C]`` uint8 grid, upscaled ``scale`` times (nearest)."""
    from torchvision.utils import make_grid

    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=255)
    return grid.permute(1, 2, 0).to(torch.uint8)


def save_grid(
    images: Tensor | Sequence[Tensor],
    path: str | Path,
    *,
    nrow: int = 8,
    scale: int = 1,
    labels: Sequence[str] | None = None,
) -> Path:
    """Save samples as a PNG grid; a list of batches becomes side-by-side panels (one per label)."""
    from PIL import Image, ImageDraw

    panels = [images] if isinstance(images, Tensor) else list(images)
    grids = [to_uint8_grid(p, nrow=nrow, scale=scale).numpy() for p in panels]
    pics = [Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).convert("RGB") for g in grids]
    top = 14 if labels else 0
    canvas = Image.new(
        "RGB", (sum(p.width for p in pics) + 8 * (len(pics) - 1), max(p.height for p in pics) + top), "white"
    )
    x = 0
    draw = ImageDraw.Draw(canvas)
    for i, pic in enumerate(pics):
        canvas.paste(pic, (x, top))
        if labels:
            draw.text((x + 2, 1), labels[i], fill="black")
        x += pic.width + 8
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def save_npz(path: str | Path, images: Tensor, per_sample: Sequence = ()) -> Path:
    """Images in [-1, 1] as uint8 ``[N, H, W, C]`` under ``arr_0`` (the layout of the ADM / torch-fidelity
    evaluation batches), with what each was conditioned on: class labels under ``arr_1``, prompts under
    ``prompts``."""
    import numpy as np

    from ..sampling.shards import to_uint8_nhwc

    arrays = {"arr_0": to_uint8_nhwc(images)}
    if per_sample and isinstance(per_sample[0], int):
        arrays["arr_1"] = np.asarray(per_sample, dtype=np.int64)
    elif per_sample and isinstance(per_sample[0], str):
        arrays["prompts"] = np.asarray(per_sample, dtype=str)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)
