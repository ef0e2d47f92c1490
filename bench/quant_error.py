"""Quantization on the demo model: x0 error against full precision (same noise) and calibration time.

    python bench/quant_error.py [--steps 50] [--interval 5] [--num 64]

Calibration uses a trace of other seeds than the evaluated samples. Rows: caching alone, W8A8 and W4A8
(CacheQuant-style per-step tables), W8A8 on the cached model (uniform and DPS schedules), and PTQ4DM
against the Uniform quantizer with shared and with per-step tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, print_table  # noqa: E402

import cq  # noqa: E402
from cq.cache import DPS  # noqa: E402
from cq.cache import Uniform as UniformSchedule  # noqa: E402
from cq.cache.deepcache import DeepCache  # noqa: E402
from cq.compressed import CompressedUNet  # noqa: E402
from cq.metrics import sample_error  # noqa: E402
from cq.models.presets import sampling_defaults  # noqa: E402
from cq.quant import PTQ4DM, Uniform  # noqa: E402
from cq.sampling import FullPrecision, ddim  # noqa: E402
from cq.trace import seeded_noise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--num", type=int, default=64, help="evaluated samples")
    ap.add_argument("--calib", type=int, default=32, help="calibration trajectories")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    unet = cq.models.load("demo")
    sampler = sampling_defaults(unet, args.steps)[1]
    point = unet.default_cache_point()
    T, n = args.steps, args.interval
    trace = cq.trace(unet, steps=T, num_samples=args.calib, points=[point], seed=10_000, progress=False, **sampler)
    noise = seeded_noise(unet.sample_shape, range(args.num))
    reference = ddim(FullPrecision(unet), noise, steps=T, **sampler)
    uniform_cache = DeepCache(schedule=UniformSchedule(interval=n), point=point).fit(unet, trace)
    dps_cache = DeepCache(schedule=DPS(interval=n), point=point).fit(unet, trace)

    settings = [
        (f"FP + cache uniform N={n}", None, uniform_cache),
        (f"FP + cache DPS N={n}", None, dps_cache),
        ("W8A8 (uniform, per-step)", Uniform(), None),
        ("W4A8 (uniform, per-step)", Uniform(weight_bits=4), None),
        (f"W8A8 + cache uniform N={n}", Uniform(), uniform_cache),
        (f"W8A8 + cache DPS N={n}", Uniform(), dps_cache),
        ("W8A8 uniform, shared range", Uniform(per_step=False), None),
        ("W8A8 PTQ4DM (NDTC, shared)", PTQ4DM(), None),
        ("W4A8 PTQ4DM (NDTC, shared)", PTQ4DM(weight_bits=4), None),
    ]
    rows = []
    for label, quantizer, cacher in settings:
        start = time.perf_counter()
        unet_q = quantizer.quantize(unet, trace, cacher=cacher, progress=False) if quantizer else unet
        calib = time.perf_counter() - start
        model = CompressedUNet(unet_q, num_steps=T, cacher=cacher)
        err = sample_error(ddim(model, noise, steps=T, **sampler), reference)
        rows.append(
            [
                label,
                sum(model.refresh_mask()),
                f"{err['mse']:.2e}",
                f"{err['psnr']:.2f}",
                f"{calib:.1f}" if quantizer else "-",
            ]
        )
    print_table(
        ["setting", "refreshes", "x0 MSE", "x0 PSNR dB", "calibration s"],
        rows,
        title=f"demo model, DDIM {T} steps {sampler}, {args.num} samples vs full precision; "
        f"calibration on {args.calib} other trajectories, cache point {point}",
    )


if __name__ == "__main__":
    with torch.no_grad():
        main()
