"""Caching: predicted (MACs) vs measured speedup of whole DDIM runs, DPS planning time, cached-sampling error.

    python bench/cache_speed.py                      # everything (about 10 minutes on 2 cores)
    python bench/cache_speed.py --part speed --models cifar10 --intervals 5,10

Speed: for each model, cache point and interval, a DDIM run with DeepCache(UniformSchedule(N)) against the full model
with the same noise, runs interleaved, medians of ``--repeats``. Random weights are used for the presets
without embedded weights (speed does not depend on the weights).
Quality (demo model): x0 error against full precision, same noise, for UniformSchedule / Power / DPS at the same number
of refreshes; DPS is fitted on a trace of other seeds than the ones evaluated.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine_line, print_table  # noqa: E402

import cq  # noqa: E402
from cq.cache import DPS, Power, UniformSchedule  # noqa: E402
from cq.cache.deepcache import DeepCache  # noqa: E402
from cq.cache.dps import distance_table, dp_partition  # noqa: E402
from cq.calib.trace import seeded_noise  # noqa: E402
from cq.compressed import CompressedUNet  # noqa: E402
from cq.metrics import predicted_speedup, sample_error, unet_macs  # noqa: E402
from cq.models.presets import sampling_defaults  # noqa: E402
from cq.sampling import FullPrecision, ddim  # noqa: E402


def load_model(name: str) -> torch.nn.Module:
    preset = cq.models.get_preset(name)
    return cq.models.load(name) if preset.embedded else cq.models.build(name, seed=0)


SPACING = "linspace"  # works for any step count


def speed(
    models: list[str], intervals: list[int], points: list[str] | None, steps: int, batch: int, repeats: int
) -> None:
    for name in models:
        unet = load_model(name)
        chosen = points or _default_points(unet)
        macs = unet_macs(unet, points=chosen)
        noise = seeded_noise(unet.sample_shape, range(batch))
        runs = {"full": lambda u=unet, z=noise: ddim(FullPrecision(u), z, steps=steps, spacing=SPACING)}
        configs = {}
        for point in chosen:
            for n in intervals:
                model = CompressedUNet(
                    unet, num_steps=steps, cacher=DeepCache(schedule=UniformSchedule(interval=n), point=point)
                )
                configs[(point, n)] = model
                runs[f"{point} N={n}"] = lambda m=model, z=noise: ddim(m, z, steps=steps, spacing=SPACING)
        t = interleaved_medians(runs, repeats)
        rows = []
        for (point, n), model in configs.items():
            pred = predicted_speedup(macs["full"], macs[point], model.refresh_mask())
            meas = t["full"] / t[f"{point} N={n}"]
            rows.append(
                [
                    point,
                    n,
                    f"{macs[point] / macs['full']:.3f}",
                    f"{pred:.2f}x",
                    f"{meas:.2f}x",
                    f"{100 * meas / pred:.0f}%",
                    f"{t[f'{point} N={n}']:.2f}",
                ]
            )
        print_table(
            ["point", "N", "shallow/full MACs", "predicted", "measured", "meas/pred", "run s"],
            rows,
            title=f"{name}: DDIM {steps} steps, batch {batch}, full run {t['full']:.2f} s "
            f"({macs['full'] / 1e9:.3f} GMACs/call at batch 1), median of {repeats}",
        )


def _default_points(unet) -> list[str]:
    points = list(unet.cache_points())
    picks = {points[-1], points[len(points) // 2], points[-4] if len(points) >= 4 else points[0]}
    if "up.1.block.2" in points:
        picks.add("up.1.block.2")  # DeepCache's branch 2 for CIFAR
    return [p for p in points if p in picks]


def planning(sizes: list[int], feature_numel: int) -> None:
    rows = []
    for T in sizes:
        features = torch.randn(T, feature_numel).cumsum(0)
        schedule = DPS(interval=10)
        K, lo, hi, last_lo = schedule.plan(T)
        start = time.perf_counter()
        dist = distance_table(features, hi)
        mid = time.perf_counter()
        steps = dp_partition(dist, K, lo, hi, last_lo)
        end = time.perf_counter()
        rows.append(
            [
                T,
                K,
                len(steps),
                f"{1000 * (mid - start):.1f}",
                f"{1000 * (end - mid):.1f}",
                f"{1000 * (end - start):.1f}",
            ]
        )
    print_table(
        ["T", "K", "refreshes", "distance table ms", "DP ms", "total ms"],
        rows,
        title=f"DPS planning, N=10, features of {feature_numel} elements per step",
    )


def quality(steps: int, intervals: list[int], num: int, calib: int) -> None:
    unet = cq.models.load("demo")
    point = unet.default_cache_point()
    sampler = sampling_defaults(unet, steps)[1]
    trace = cq.trace(unet, steps=steps, num_samples=calib, points=[point], seed=10_000, progress=False, **sampler)
    noise = seeded_noise(unet.sample_shape, range(num))
    reference = ddim(FullPrecision(unet), noise, steps=steps, **sampler)
    rows = []
    for n in intervals:
        k = math.ceil(steps / n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            schedules = {
                "uniform": UniformSchedule(interval=n),
                "power 1.5": Power(interval=n, power=1.5),
                "DPS": DPS(refreshes=k, min_len=1, max_len=3 * n),
                "DPS [N/2,2N]": DPS(interval=n),
            }
        for label, schedule in schedules.items():
            cacher = DeepCache(schedule=schedule, point=point).fit(unet, trace)
            model = CompressedUNet(unet, num_steps=steps, cacher=cacher)
            err = sample_error(ddim(model, noise, steps=steps, **sampler), reference)
            rows.append([n, label, sum(model.refresh_mask()), f"{err['mse']:.5f}", f"{err['psnr']:.2f}"])
    print_table(
        ["N", "schedule", "refreshes", "x0 MSE", "x0 PSNR dB"],
        rows,
        title=f"demo model, cache point {point}, DDIM {steps} steps {sampler}, {num} samples; "
        f"DPS fitted on {calib} other trajectories",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "speed", "planning", "quality"], default="all")
    ap.add_argument("--models", default="cifar10,demo")
    ap.add_argument("--intervals", default="2,3,5,10")
    ap.add_argument("--points", default=None, help="comma-separated cache points (default: a spread)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line())
    intervals = [int(n) for n in args.intervals.split(",")]
    with torch.no_grad():
        if args.part in ("all", "speed"):
            speed(
                args.models.split(","),
                intervals,
                args.points.split(",") if args.points else None,
                args.steps,
                args.batch,
                args.repeats,
            )
        if args.part in ("all", "planning"):
            planning([50, 100, 250, 1000], feature_numel=8 * 32 * 16 * 16)
        if args.part in ("all", "quality"):
            quality(args.steps, intervals, num=64, calib=32)


if __name__ == "__main__":
    main()
