"""How far the full-precision demo model's own samples move when the initial noise is nudged.

    python bench/sensitivity.py [--seeds 1137,1247,1000,1001,1002] [--eps 1e-3,3e-3,1e-2]

For each seed: x0 PSNR of the full-precision sample from ``noise + eps * N(0, 1)`` against the one from ``noise``
(DDIM 50, the preset's sampler). A seed whose trajectory is unstable in full precision (a sample near the boundary
between two digits) loses as much to this nudge as to any compression of similar error, so its per-sample PSNR
under a compressed model says little about the compression (README, "Quality on held-out seeds").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, print_table  # noqa: E402

import cq  # noqa: E402
from cq.metrics.evaluate import per_sample_psnr  # noqa: E402
from cq.models.presets import sampling_defaults  # noqa: E402
from cq.sampling import FullPrecision, ddim  # noqa: E402
from cq.trace import seeded_noise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1137,1247,1000,1001,1002")
    ap.add_argument("--eps", default="1e-3,3e-3,1e-2")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(machine_line())
    unet = cq.models.load("demo")
    steps, sampler = sampling_defaults(unet)
    noise = seeded_noise(unet.sample_shape, seeds)
    model = FullPrecision(unet)
    reference = ddim(model, noise, steps=steps, **sampler)
    rows = []
    for eps in (float(e) for e in args.eps.split(",")):
        nudge = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0))
        out = ddim(model, noise + eps * nudge, steps=steps, **sampler)
        rows.append([f"{eps:g}", *(f"{float(v):.1f}" for v in per_sample_psnr(out, reference))])
    print_table(["nudge eps", *(f"seed {s} dB" for s in seeds)], rows)


if __name__ == "__main__":
    with torch.no_grad():
        main()
