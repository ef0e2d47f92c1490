"""Images from a saved model: a batch of seeded noise sampled with the sampler the model was fitted with, guided by
its conditioning and decoded by the first stage of latent models (`draw`), and a run of seeds in batches
(`sample_images`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .guidance import guided
from .resolve import fitted_sampler
from .seeded import seeded_noise


if TYPE_CHECKING:
    from ..models.conditioning import Conditioning
    from ..models.pipelines import LatentDiffusion

__all__ = ["draw", "sample_images"]


def draw(
    model,
    sampler: tuple[Callable[..., Any], int, dict],
    noise: Tensor,
    conditioning: Conditioning,
    rows: slice | Tensor,
    *,
    pipe: LatentDiffusion | None = None,
    progress: bool = False,
) -> Tensor:
    """The float CPU images of one batch: ``noise`` sampled by ``sampler`` (`fitted_sampler`'s ``(function, steps,
    kwargs)``) with ``model`` guided for the ``rows`` of ``conditioning``, decoded by ``pipe`` when given."""
    sample_fn, steps, kwargs = sampler
    c = conditioning.cond[rows].to(noise.device) if conditioning.cond is not None else None
    denoiser = guided(model, conditioning.scale, conditioning.uncond, rows)
    x0 = sample_fn(denoiser, noise, steps=steps, cond=c, progress=progress, **kwargs)
    return (pipe.decode(x0) if pipe is not None else x0).float().cpu()


@torch.no_grad()
def sample_images(
    model,
    seeds: range,
    *,
    conditioning: Conditioning | None = None,
    pipe: LatentDiffusion | None = None,
    spacing: str | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Tensor:
    """``[len(seeds), C, H, W]`` float images of the `CompressedUNet` ``model`` from the noise of ``seeds``, in
    batches of ``batch_size`` (default: `cq.models.base.default_batch`); ``conditioning`` holds one row per seed
    (None: unconditional), ``pipe`` decodes latents."""
    from ..models.base import default_batch
    from ..models.conditioning import Conditioning

    conditioning = conditioning or Conditioning(None, 1.0, None)
    sampler = fitted_sampler(model, spacing)
    model.to(device)
    if pipe is not None:  # to decode; conditions were encoded, the float UNet is idle
        pipe.first_stage.to(device)
    batch = batch_size or default_batch(model.unet)
    images = []
    for first in range(0, len(seeds), batch):
        rows = slice(first, min(first + batch, len(seeds)))
        noise = seeded_noise(model.sample_shape, seeds[rows]).to(device)
        images.append(draw(model, sampler, noise, conditioning, rows, pipe=pipe, progress=progress))
    return torch.cat(images)
