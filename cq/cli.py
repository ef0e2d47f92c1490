"""The ``cq`` command: ``cq demo``, ``cq train``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch


__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .models import load
    from .sampling import FullPrecision, ddim
    from .trace import seeded_noise
    from .viz import save_grid

    torch.set_num_threads(args.threads) if args.threads else None
    unet = load(args.model)
    steps = args.steps or unet.preset.sampling.get("steps", 50)
    spacing = unet.preset.sampling.get("spacing", "uniform")
    noise = seeded_noise(unet.sample_shape, range(args.seed, args.seed + args.num))
    print(
        f"cq demo: model={args.model} ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params), "
        f"DDIM {steps} steps ({spacing}), {args.num} samples, {torch.get_num_threads()} threads"
    )
    start = time.perf_counter()
    x0 = ddim(FullPrecision(unet), noise, steps=steps, spacing=spacing, progress=True)
    seconds = time.perf_counter() - start
    out = save_grid(x0, args.out, nrow=int(args.num**0.5 + 0.999), scale=args.scale)
    print(f"full precision: {seconds:.2f} s total, {1000 * seconds / args.num:.1f} ms per image")
    print(f"wrote {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    config = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    out = train(config, args.out)
    print(f"wrote {out} (resumable state: {Path(args.out).with_suffix('.state.pt')})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cq", description="Cache + quantize diffusion UNets (CacheQuant).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="sample the embedded demo model and write a grid")
    demo.add_argument("--model", default="demo", help="preset with embedded weights (default: demo)")
    demo.add_argument("--num", type=int, default=64, help="number of samples")
    demo.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the preset's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scale", type=int, default=4, help="upscale factor of the PNG")
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("-o", "--out", default="cq_demo.png")
    demo.set_defaults(func=_demo)

    from .train import TrainConfig

    d = TrainConfig()
    tr = sub.add_parser("train", help="train the demo model on scikit-learn digits (resumable)")
    tr.add_argument("--preset", default=d.preset)
    tr.add_argument("--steps", type=int, default=d.steps)
    tr.add_argument("--batch-size", type=int, default=d.batch_size)
    tr.add_argument("--lr", type=float, default=d.lr)
    tr.add_argument("--seed", type=int, default=d.seed)
    tr.add_argument("-o", "--out", default="demo.safetensors")
    tr.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
