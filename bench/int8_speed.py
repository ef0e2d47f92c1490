"""Real int8 vs fp32 vs fake quantization: per layer, whole UNet forward, end-to-end DDIM; checkpoint sizes.

    python bench/int8_speed.py                       # DDPM-CIFAR10 preset (random weights: speed and size
                                                     # do not depend on the values), about 10 minutes
    python bench/int8_speed.py --part layers --batches 1,8

Runs are interleaved (round-robin, alternating order) and medians are reported.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine_line, print_table  # noqa: E402

import cq  # noqa: E402
from cq.calib.trace import seeded_noise  # noqa: E402
from cq.compressed import CompressedUNet  # noqa: E402
from cq.core.step import step_scope  # noqa: E402
from cq.fit.recipe import Recipe, parse_bits  # noqa: E402
from cq.quant import QConv2d, QuantSpec  # noqa: E402
from cq.quant.int8 import Int8Conv2d, int8_layers  # noqa: E402
from cq.sampling import FullPrecision, ddim  # noqa: E402


LAYERS = [  # (label, C_in, C_out, kernel, H) -- shapes of the DDPM-CIFAR10 UNet
    ("3x3 128->128 @32", 128, 128, 3, 32),
    ("3x3 256->256 @16", 256, 256, 3, 16),
    ("3x3 256->256 @4", 256, 256, 3, 4),
    ("1x1 384->128 @32 (skip)", 384, 128, 1, 32),
    ("3x3 384->128 @32 (split)", 384, 128, 3, 32),
]


def layers(batches: list[int], repeats: int) -> None:
    rows = []
    g = torch.Generator().manual_seed(0)
    for label, cin, cout, k, h in LAYERS:
        conv = nn.Conv2d(cin, cout, k, padding=k // 2)
        split = 256 if "split" in label else None
        fake = QConv2d(conv, QuantSpec(per_channel=True, method="minmax"), QuantSpec(method="minmax"), 1, split=split)
        for q in fake.modules():
            if type(q).__name__ == "ActQuantizer":
                q.set_range(torch.tensor([-3.0]), torch.tensor([4.0]))
        real = Int8Conv2d(fake)
        for b in batches:
            x = torch.randn(b, cin, h, h, generator=g)
            x_last = x.contiguous(memory_format=torch.channels_last)
            t = interleaved_medians(
                {
                    "fp32": lambda c=conv, x=x: c(x),
                    "fake": lambda m=fake, x=x: m(x),
                    "int8": lambda m=real, x=x_last: m(x),
                },
                repeats,
            )
            rows.append(
                [
                    label,
                    b,
                    f"{1e3 * t['fp32']:.2f}",
                    f"{1e3 * t['fake']:.2f}",
                    f"{1e3 * t['int8']:.2f}",
                    f"{t['fp32'] / t['int8']:.2f}x",
                ]
            )
    print_table(
        ["layer", "batch", "fp32 ms", "fake-quant ms", "int8 ms", "int8 vs fp32"],
        rows,
        title="per layer (int8 includes quantizing the input; asymmetric weights, per-tensor activations; inputs "
        "in each model's layout: NCHW for fp32, channels-last for int8, whose kernels write channels-last)",
    )


def fitted(unet, bits: str, interval: int | None, steps: int, *, symmetric: bool = False, point=None, backend="fake"):
    """CacheQuant (or quant-only when interval is None) fitted on a small trace (calibration is not timed)."""
    weight_bits, _ = parse_bits(bits)
    quantizer = cq.quant.UniformQuantizer(
        weight_bits=weight_bits, weight_symmetric=symmetric, refresh_samples=4, cached_samples=2
    )
    if interval is None:
        recipe = Recipe(quantizer=quantizer, backend=backend)
    else:
        preset = cq.cachequant(interval=interval, bits=bits, point=point)
        recipe = Recipe(cacher=preset.cacher, quantizer=quantizer, correctors=preset.correctors, backend=backend)
    trace = cq.trace(unet, steps=steps, num_samples=4, points=recipe.points(unet), spacing="linspace", progress=False)
    return recipe.fit(unet, trace, progress=False)


def whole(unet, batches: list[int], repeats: int) -> None:
    fake = fitted(unet, "w8a8", None, steps=2)
    asym = fitted(unet, "w8a8", None, steps=2, backend="int8")
    sym = fitted(unet, "w8a8", None, steps=2, symmetric=True, backend="int8")
    fallbacks = sorted({v for v in asym.execution.values() if not v.startswith("int8")})
    print(f"\nint8 layers: {int8_layers(asym.unet)}; fallbacks: {fallbacks or 'none'}")
    rows = []
    for b in batches:
        x = torch.randn(b, *unet.sample_shape)
        t = torch.full((b,), 500)
        with step_scope(0):
            times = interleaved_medians(
                {
                    "fp32": lambda x=x, t=t: unet(x, t),
                    "fake": lambda x=x, t=t: fake.unet(x, t),
                    "int8": lambda x=x, t=t: asym.unet(x, t),
                    "int8 sym": lambda x=x, t=t: sym.unet(x, t),
                },
                repeats,
            )
        rows.append(
            [b]
            + [f"{1e3 * times[k]:.1f}" for k in ("fp32", "fake", "int8", "int8 sym")]
            + [f"{times['fp32'] / times['int8']:.2f}x", f"{times['fp32'] / times['int8 sym']:.2f}x"]
        )
    print_table(
        ["batch", "fp32 ms", "fake-quant ms", "int8 ms", "int8 sym-w ms", "int8 vs fp32", "sym-w vs fp32"],
        rows,
        title=f"whole UNet forward (W8A8, DDPM-CIFAR10 preset, {torch.get_num_threads()} threads); int8 = "
        "CacheQuant's asymmetric weights, sym-w = UniformQuantizer(weight_symmetric=True)",
    )


def end_to_end(unet, steps: int, batch: int, intervals: list[int], points: list[str], repeats: int) -> None:
    noise = seeded_noise(unet.sample_shape, range(batch))
    runs = {"fp32 full": lambda: ddim(FullPrecision(unet), noise, steps=steps, spacing="linspace")}
    for point in points:
        for n in intervals:
            dc = CompressedUNet(unet, num_steps=steps, cacher=cq.deepcache(n, point=point).cacher)
            runs[f"DeepCache N={n} fp32 @{point}"] = lambda m=dc: ddim(m, noise, steps=steps, spacing="linspace")
            for sym in (False, True):
                model = fitted(unet, "w8a8", n, steps, symmetric=sym, point=point, backend="int8")
                name = f"CacheQuant N={n} W8A8 int8{' sym-w' if sym else ''} @{point}"
                runs[name] = lambda m=model: ddim(m, noise, steps=steps, spacing="linspace")
    t = interleaved_medians(runs, repeats, warmup=1)
    rows = [[name, f"{sec:.2f}", f"{t['fp32 full'] / sec:.2f}x"] for name, sec in t.items()]
    print_table(
        ["run", "seconds", "speedup vs fp32 full"],
        rows,
        title=f"end-to-end DDIM, {steps} steps, batch {batch}, {torch.get_num_threads()} threads, median of {repeats}",
    )


def sizes(unet) -> None:
    from safetensors.torch import save_file

    rows = []
    with tempfile.TemporaryDirectory() as d:
        fp32 = Path(d) / "fp32.safetensors"
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(fp32))
        base = fp32.stat().st_size
        rows.append(["fp32 state dict", f"{base / 2**20:.1f}", "1.000"])
        for bits in ("w8a8", "w4a8"):
            path = cq.save(fitted(unet, bits, 10, steps=20), Path(d) / f"{bits}.cq")
            rows.append(
                [
                    f"CacheQuant {bits.upper()} (N=10, 20 steps)",
                    f"{path.stat().st_size / 2**20:.1f}",
                    f"{path.stat().st_size / base:.3f}",
                ]
            )
    print_table(["checkpoint", "MiB", "ratio"], rows, title="checkpoint sizes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "layers", "whole", "e2e", "sizes"], default="all")
    ap.add_argument("--model", default="cifar10")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--e2e-batch", type=int, default=4)
    ap.add_argument("--intervals", default="5,10")
    ap.add_argument(
        "--points", default="default,shallowest", help="cache points for the end-to-end runs (names or these two)"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    batches = [int(b) for b in args.batches.split(",")]
    unet = cq.models.build(args.model, seed=0)
    with torch.no_grad():
        if args.part in ("all", "layers"):
            layers(batches, args.repeats)
        if args.part in ("all", "whole"):
            whole(unet, batches, args.repeats)
        if args.part in ("all", "e2e"):
            named = {"default": unet.default_cache_point(), "shallowest": unet.cache_points()[-1]}
            points = [named.get(p, p) for p in args.points.split(",")]
            intervals = [int(n) for n in args.intervals.split(",")]
            end_to_end(unet, args.steps, args.e2e_batch, intervals, points, max(3, args.repeats // 2))
        if args.part in ("all", "sizes"):
            sizes(unet)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - start:.0f} s)")
