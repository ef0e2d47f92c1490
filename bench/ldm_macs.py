"""MACs per UNet call of the latent-diffusion presets (full call and CacheQuant's shallow call), counted on the meta
device (no memory, no weights), plus the first-stage decoder.

    python bench/ldm_macs.py
    python bench/ldm_macs.py --presets sd-v1 --latent 32     # SD at 256 px
    python bench/ldm_macs.py --tiny-speed                    # + CPU wall-clock of the tiny configs' calls

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
from common import interleaved_medians, machine_line, print_table  # noqa: E402

import cq  # noqa: E402
from cq.core.view import CacheView  # noqa: E402
from cq.metrics import predicted_speedup, unet_macs  # noqa: E402
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
    parser.add_argument("--interval", type=int, default=5, help="cache interval N of the predicted speedup column")
    parser.add_argument("--tiny-speed", action="store_true", help="also time the tiny configs' calls on this CPU")
    parser.add_argument("--repeats", type=int, default=20)
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
        cond = None
        if c.context_dim:  # prompts: 77 tokens (SDXL: plus y packed as trailing tokens); class labels: 1
            text = preset.pipeline.conditioner is not None and preset.pipeline.conditioner.kind != "class_embedder"
            cond = torch.empty(1, 77 if text else 1, c.context_dim, device="meta")
            if c.adm_in_channels:
                cond = unet.pack_cond(cond, torch.empty(1, c.adm_in_channels, device="meta"))
        point = unet.default_cache_point()
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
        calls = _calls(preset)
        mask = [i % args.interval == 0 for i in range(calls)]
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
                f"{predicted_speedup(full, shallow, mask):.2f}x ({calls} calls, {sum(mask)} full)",
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
            f"MAC speedup N={args.interval}",
            "decoder convs",
        ],
        rows,
        title="MACs per UNet call (batch 1; conv + linear + attention matmuls)",
    )
    if args.tiny_speed:
        tiny_speed(args.repeats)


def _calls(preset) -> int:
    """Model calls of the preset's default sampler run (PLMS: steps + 1)."""
    steps = preset.sampling.get("steps", 50)
    return steps + 1 if preset.pipeline is not None and preset.pipeline.sampler == "plms" else steps


def tiny_speed(repeats: int) -> None:
    """Wall-clock of a full and a cached (shallow) UNet call of each tiny config, batch 2 (one guided pair)."""
    rows = []
    for name in ("tiny-sd", "tiny-sd-v2", "tiny-ldm-cin", "tiny-ldm-bedroom", "tiny-ldm-church"):
        unet = cq.models.build(name, seed=0)
        point = unet.default_cache_point()
        x = torch.randn(2, *unet.sample_shape)
        t = torch.full((2,), 500)
        cond = unet.example_cond(2)
        view = CacheView.full(record=[point])
        with torch.no_grad():
            unet(x, t, cond, cache=view)
        feature = view.features[point]
        macs = unet_macs(unet, batch=2, cond=cond, points=[point])

        def full(unet=unet, x=x, t=t, cond=cond):
            with torch.no_grad():
                unet(x, t, cond)

        def cached(unet=unet, x=x, t=t, cond=cond, point=point, feature=feature):
            with torch.no_grad():
                unet(x, t, cond, cache=CacheView.shallow(point, feature))

        times = interleaved_medians({"full": full, "cached": cached}, repeats, warmup=3)
        rows.append(
            (
                name,
                f"{tuple(unet.sample_shape)}",
                f"{macs['full'] / 1e6:.1f}M",
                f"{1000 * times['full']:.2f}",
                f"{1000 * times['cached']:.2f}",
                f"{times['full'] / times['cached']:.2f}x",
                f"{macs['full'] / macs[point]:.2f}x",
            )
        )
    print_table(
        ["tiny config", "latent", "MACs/call", "full ms", "cached ms", "measured", "by MACs"],
        rows,
        title=f"Tiny configs, CPU wall-clock per UNet call (batch 2, medians of {repeats}; {machine_line()})",
    )


if __name__ == "__main__":
    main()
