"""CacheQuant's component ablation on the demo model: x0 error against full precision at equal refresh counts.

    python bench/ablation.py [--intervals 3,5,10] [--num 32]

Rows add one component at a time: DeepCache (uniform) + W8A8 ("naive"), + DPS, + DEC cache correction,
+ DEC quantization correction (= CacheQuant), and full-precision caching for reference. The cache point is
the model's default (DeepCache branch 2, CacheQuant's DDPM setting). Calibration and DPS use a trace of other
seeds than the evaluated samples.
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
from cq.correct import CacheErrorCorrector, QuantErrorCorrector  # noqa: E402
from cq.metrics import sample_error  # noqa: E402
from cq.models.presets import sampling_defaults  # noqa: E402
from cq.quant import Uniform as UniformQuantizer  # noqa: E402
from cq.recipe import Recipe  # noqa: E402
from cq.sampling import FullPrecision, ddim  # noqa: E402
from cq.trace import seeded_noise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--intervals", default="3,5,10")
    ap.add_argument("--num", type=int, default=32, help="evaluated samples (seeds 0..num-1)")
    ap.add_argument("--calib", type=int, default=32, help="calibration trajectories (seeds 10000+)")
    ap.add_argument("--bits", default="w8a8")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    unet = cq.models.load("demo")
    steps, sampler = sampling_defaults(unet)
    trace = cq.trace(
        unet,
        steps=steps,
        num_samples=args.calib,
        points=[unet.default_cache_point()],
        seed=10_000,
        progress=False,
        **sampler,
    )
    noise = seeded_noise(unet.sample_shape, range(args.num))
    reference = ddim(FullPrecision(unet), noise, steps=steps, **sampler)
    weight_bits, act_bits = cq.recipe.parse_bits(args.bits)
    quantizer = UniformQuantizer(weight_bits=weight_bits, act_bits=act_bits)
    rows = []
    for n in (int(v) for v in args.intervals.split(",")):
        both = (CacheErrorCorrector(), QuantErrorCorrector())
        cases = [
            ("FP, DeepCache uniform", Recipe(cacher=DeepCache(schedule=UniformSchedule(interval=n)))),
            ("FP, DPS", Recipe(cacher=DeepCache(schedule=DPS(interval=n)))),
            (
                f"naive: uniform + {args.bits}",
                Recipe(cacher=DeepCache(schedule=UniformSchedule(interval=n)), quantizer=quantizer),
            ),
            ("+ DPS", Recipe(cacher=DeepCache(schedule=DPS(interval=n)), quantizer=quantizer)),
            (
                "+ DPS + DEC cache",
                Recipe(cacher=DeepCache(schedule=DPS(interval=n)), quantizer=quantizer, correctors=both[:1]),
            ),
            (
                "+ DPS + DEC cache + quant = CacheQuant",
                Recipe(cacher=DeepCache(schedule=DPS(interval=n)), quantizer=quantizer, correctors=both),
            ),
            (
                "uniform + DEC (no DPS)",
                Recipe(cacher=DeepCache(schedule=UniformSchedule(interval=n)), quantizer=quantizer, correctors=both),
            ),
        ]
        for label, recipe in cases:
            start = time.perf_counter()
            model = recipe.fit(unet, trace, progress=False)
            fit = time.perf_counter() - start
            err = sample_error(ddim(model, noise, steps=steps, **sampler), reference)
            rows.append([n, label, sum(model.refresh_mask()), f"{err['mse']:.3e}", f"{err['psnr']:.2f}", f"{fit:.1f}"])
    print_table(
        ["N", "recipe", "full calls", "x0 MSE", "x0 PSNR dB", "fit s"],
        rows,
        title=f"demo model, DDIM {steps} steps {sampler}, {args.num} samples vs full precision, "
        f"cache point {unet.default_cache_point()}",
    )


if __name__ == "__main__":
    with torch.no_grad():
        main()
