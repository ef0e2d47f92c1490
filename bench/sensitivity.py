"""How far the full-precision demo model's own samples move when the initial noise is nudged.

    python bench/sensitivity.py [--seeds 1137,1247,1000,1001,1002] [--eps 1e-3,3e-3,1e-2]
    python bench/sensitivity.py --seeds 1000-1255 --eps 3e-3,1e-2 --summary   # counts + nearest training digits

For each seed: x0 PSNR of the full-precision sample from ``noise + eps * N(0, 1)`` against the one from ``noise``
(DDIM 50, the preset's sampler). A seed whose trajectory is unstable in full precision (a sample near the boundary
between two digits) loses as much to this nudge as to any compression of similar error, so its per-sample PSNR
under a compressed model says little about the compression (README, "Quality on held-out seeds").

``--summary`` prints, per nudge, the count of seeds below 25 / 35 dB and the worst seeds instead of one column per
seed, and checks memorization: each full-precision sample's mean squared distance to its nearest training digit
against the training digits' own nearest-neighbour distance (a model that copies its 1797 training digits has
samples much closer to one digit than the digits are to each other).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, print_table  # noqa: E402

import cq  # noqa: E402
from cq.calib.trace import seeded_noise  # noqa: E402
from cq.metrics.evaluate import per_sample_psnr  # noqa: E402
from cq.models.presets import sampling_defaults  # noqa: E402
from cq.sampling import FullPrecision, ddim  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1137,1247,1000,1001,1002")
    ap.add_argument("--eps", default="1e-3,3e-3,1e-2")
    ap.add_argument("--summary", action="store_true", help="counts and worst seeds, and a memorization check")
    args = ap.parse_args()
    seeds = [int(s) for part in args.seeds.split(",") for s in _seed_range(part)]
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
        psnr = per_sample_psnr(out, reference)
        if args.summary:
            worst = psnr.argsort()[:5].tolist()
            rows.append(
                [
                    f"{eps:g}",
                    f"{float(psnr.mean()):.1f}",
                    int((psnr < 25).sum()),
                    int((psnr < 35).sum()),
                    ", ".join(f"{seeds[i]}: {float(psnr[i]):.1f}" for i in worst),
                ]
            )
        else:
            rows.append([f"{eps:g}", *(f"{float(v):.1f}" for v in psnr)])
    if not args.summary:
        print_table(["nudge eps", *(f"seed {s} dB" for s in seeds)], rows)
        return
    print_table(
        ["nudge eps", "mean dB", "< 25 dB", "< 35 dB", "worst seeds (dB)"],
        rows,
        title=f"full precision under a nudge of the initial noise, {len(seeds)} seeds",
    )
    from cq.models.train import digits_dataset

    data = digits_dataset(unet.sample_shape[-1]).flatten(1)
    to_data = torch.cdist(reference.flatten(1), data).square().sort(dim=1).values / data.shape[1]
    between = torch.cdist(data, data).square().fill_diagonal_(float("inf")).min(dim=1).values / data.shape[1]
    print_table(
        ["median MSE", "value"],
        [
            ["sample -> nearest training digit", f"{float(to_data[:, 0].median()):.4f}"],
            ["sample: nearest / second nearest digit", f"{float((to_data[:, 0] / to_data[:, 1]).median()):.3f}"],
            ["training digit -> nearest other digit", f"{float(between.median()):.4f}"],
        ],
        title="memorization check (MSE per pixel, data in [-1, 1])",
    )


def _seed_range(part: str) -> range:
    """``"1137"`` or ``"1000-1255"`` (inclusive)."""
    lo, _, hi = part.partition("-")
    return range(int(lo), int(hi or lo) + 1)


if __name__ == "__main__":
    with torch.no_grad():
        main()
