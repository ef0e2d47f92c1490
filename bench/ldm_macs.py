"""MACs per UNet call of the latent-diffusion presets (full call and CacheQuant's shallow call), counted on the meta
device (no memory, no weights), plus the first-stage decoder.

    python bench/ldm_macs.py
    python bench/ldm_macs.py --presets sd-v1 --latent 32     # SD at 256 px

``cq.metrics.unet_macs`` counts Conv2d, Linear and the attention MatMul modules; the legacy attention of the LSUN
models projects with Conv1d (``qkv``, ``proj_out``), counted here in an extra column and included in the total.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

import cq  # noqa: E402
from cq.cache.view import CacheView  # noqa: E402
from cq.metrics import unet_macs  # noqa: E402
from cq.models.autoencoders import build_autoencoder  # noqa: E402


def conv1d_macs(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond, cache: CacheView | None) -> int:
    total = 0

    def hook(module: nn.Conv1d, inputs, out) -> None:
        nonlocal total
        total += out.numel() * (module.in_channels // module.groups) * module.kernel_size[0]

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, nn.Conv1d)]
    try:
        with torch.no_grad():
            unet(x, t, cond, cache=cache)
    finally:
        for h in handles:
            h.remove()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="ldm-cin256-v2,ldm-bedroom,ldm-church,sd-v1")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the preset's)")
    args = parser.parse_args()
    rows = []
    for name in args.presets.split(","):
        preset = cq.models.get_preset(name)
        with torch.device("meta"):
            unet = cq.models.build(name)
            decoder = build_autoencoder(preset.pipeline.autoencoder).decoder
        c = unet.config
        size = args.latent or c.image_size
        if size != c.image_size:
            unet.config = type(c)(**{**c.__dict__, "image_size": size})
        cond = (
            torch.empty(1, 77 if c.context_dim == 768 else 1, c.context_dim, device="meta") if c.context_dim else None
        )
        point = unet.cache_points()[-1]
        macs = unet_macs(unet, cond=cond, points=[point])
        x = torch.empty(1, *unet.sample_shape, device="meta")
        t = torch.full((1,), 500, device="meta")
        view = CacheView.full(record=[point])
        extra_full = conv1d_macs(unet, x, t, cond, view)
        full, shallow = macs["full"], macs[point]  # unet_macs includes the Conv1d share (reported apart below)
        z = torch.empty(1, preset.pipeline.autoencoder.z_channels, size, size, device="meta")
        dec = 0

        def count(module, inputs, out) -> None:
            nonlocal dec
            if isinstance(module, nn.Conv2d):
                dec += out.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]

        handles = [m.register_forward_hook(count) for m in decoder.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            decoder(z)
        for h in handles:
            h.remove()
        rows.append(
            (
                name,
                f"{tuple(unet.sample_shape)}",
                f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M",
                f"{full / 1e9:.1f}G",
                f"{extra_full / 1e9:.2f}G",
                point,
                f"{shallow / 1e9:.2f}G",
                f"{100 * shallow / full:.1f}%",
                f"{dec / 1e9:.0f}G",
            )
        )
    print_table(
        [
            "preset",
            "latent",
            "params",
            "MACs/call",
            "of which Conv1d",
            "cache point",
            "shallow call",
            "share",
            "decoder convs",
        ],
        rows,
        title="MACs per UNet call (batch 1; conv + linear + attention matmuls)",
    )


if __name__ == "__main__":
    main()
