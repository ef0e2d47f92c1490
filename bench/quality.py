"""Held-out quality tables of the demo model: every figure from `cq.evaluate`, end to end, per sample.

    python bench/quality.py --table demo      [--seeds 1024]   # cq demo's settings + digits FID
    python bench/quality.py --table ablation  [--seeds 256] [--intervals 3,5,10]
    python bench/quality.py --table quant     [--seeds 256]
    python bench/quality.py --table schedules [--seeds 256] [--intervals 2,3,5,10]   # CacheQuant W8A8 + DEC
    python bench/quality.py --table points    [--seeds 64] [--intervals 5,10] [--min-speedup 2]  # cache point,
                                              # DEC affine vs low-rank correction, cq.choose_point
    python bench/quality.py --table tables    [--seeds 64] [--intervals 5,10]   # per-step vs per-group act tables

All settings are fitted on one trace of 32 full-precision trajectories (seeds 10000..10031) and evaluated on
held-out seeds 1000.. (`cq.evaluate` refuses overlaps), with the preset's sampler (DDIM 50, no x0 clipping).
Columns: x0 PSNR vs full precision from the same seed -- mean, median, 5th percentile, worst -- the samples
below 25 dB and 15 dB, max |x0|, and the digits FID against the 1797 real digits (only meaningful from ~1000
samples; full precision's own figure is the first row). Each worst-case column is stated over all seeds and over
the seeds where full precision is stable (`cq.metrics.stability`, nudge 1e-2: a seed is unstable when full
precision's sample from its nudged noise is below 35 dB against the unnudged one). The schedules table adds the
speedup by MACs and each row's `Recipe.fit` time, and pairs the rows on the stable seeds (`cq.compare`).
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
from cq.cache import (
    DPS,  # noqa: E402
    UniformSchedule,  # noqa: E402
)
from cq.cache.deepcache import DeepCache  # noqa: E402
from cq.calib.trace import seeded_noise  # noqa: E402
from cq.correct import CacheErrorCorrector, CacheErrorLowRank, QuantErrorCorrector  # noqa: E402
from cq.fit.recipe import Recipe  # noqa: E402
from cq.metrics.digits import DigitsScorer  # noqa: E402
from cq.metrics.macs import unet_macs  # noqa: E402
from cq.models.presets import sampling_defaults  # noqa: E402
from cq.quant import PTQ4DM, UniformQuantizer  # noqa: E402
from cq.sampling import FullPrecision, ddim  # noqa: E402


def demo_cases(n: int) -> list[tuple[str, Recipe]]:
    return [
        (f"DeepCache N={n}", cq.deepcache(n)),
        ("W8A8", cq.quant_only("w8a8")),
        (f"DeepCache+W8A8 (naive) N={n}", cq.naive(n, "w8a8")),
        (f"CacheQuant N={n}", cq.cachequant(n, "w8a8")),
    ]


def ablation_cases(n: int) -> list[tuple[str, Recipe]]:
    q = UniformQuantizer()
    both = (CacheErrorCorrector(), QuantErrorCorrector())

    def cached(schedule, quantizer=None, correctors=()):
        return Recipe(cacher=DeepCache(schedule=schedule), quantizer=quantizer, correctors=correctors)

    uniform, dps = UniformSchedule(interval=n), DPS(interval=n)
    return [
        (f"N={n} FP, DeepCache uniform", cached(uniform)),
        (f"N={n} FP, DPS", cached(dps)),
        (f"N={n} naive: uniform + W8A8", cached(uniform, q)),
        (f"N={n} + DPS", cached(dps, q)),
        (f"N={n} + DPS + DEC cache", cached(dps, q, both[:1])),
        (f"N={n} + DPS + DEC cache + quant = CacheQuant", cached(dps, q, both)),
        (f"N={n} uniform + DEC (no DPS)", cached(uniform, q, both)),
        (
            f"N={n} CacheQuant, quant DEC fitted on quantized deep features (before H 4)",
            cached(dps, q, (both[0], QuantErrorCorrector(deep_features="quantized"))),
        ),
    ]


def schedule_cases(n: int) -> list[tuple[str, Recipe]]:
    """CacheQuant W8A8 with both DEC corrections; only the schedule differs."""
    from cq.cache.power import Power
    from cq.cache.search import TrajectorySearch
    from cq.cache.sensitivity_dp import SensitivityDP

    def cachequant(schedule):
        correctors = (CacheErrorCorrector(), QuantErrorCorrector())
        return Recipe(cacher=DeepCache(schedule=schedule), quantizer=UniformQuantizer(), correctors=correctors)

    return [
        (f"N={n} uniform", cachequant(UniformSchedule(interval=n))),
        (f"N={n} power 1.5", cachequant(Power(interval=n))),
        (f"N={n} DPS (CacheQuant)", cachequant(DPS(interval=n))),
        (f"N={n} search (cq)", cachequant(TrajectorySearch(interval=n))),
        (f"N={n} sensitivity DP (cq)", cachequant(SensitivityDP(interval=n))),
    ]


SHALLOW_POINT = "up.0.block.2"


def cachequant_at(n: int, point: str | None, cache_corrector=None, quantizer=None) -> Recipe:
    """CacheQuant W8A8 (DPS, quantization on the cached model, both DEC corrections) with another cache correction
    or quantizer."""
    return Recipe(
        cacher=DeepCache(schedule=DPS(interval=n), point=point),
        quantizer=quantizer or UniformQuantizer(),
        correctors=(cache_corrector or CacheErrorCorrector(), QuantErrorCorrector()),
    )


def point_cases(n: int, unet, trace, min_speedup: float) -> list[tuple[str, Recipe]]:
    """Cache points x cache corrections, and the point `cq.choose_point` picks on the calibration trace."""
    default = unet.default_cache_point()
    macs = unet_macs(unet)
    cases = []
    for point in (default, SHALLOW_POINT):
        share = f"shallow call {100 * macs[point] / macs['full']:.0f}% of the MACs"
        cases.append((f"N={n} {point} ({share}), DEC affine = CacheQuant", cachequant_at(n, point)))
        cases.append((f"N={n} {point}, low-rank DEC (full rank)", cachequant_at(n, point, CacheErrorLowRank())))
        cases.append((f"N={n} {point}, low-rank DEC (rank 8)", cachequant_at(n, point, CacheErrorLowRank(rank=8))))
    start = time.perf_counter()
    choice = cq.choose_point(  # chosen on the calibration trace, with the full-precision cache + correction
        unet,
        trace,
        lambda p: Recipe(cacher=DeepCache(schedule=DPS(interval=n), point=p), correctors=(CacheErrorLowRank(),)),
        min_speedup=min_speedup,
        progress=False,
    )
    print(f"choose_point N={n} ({time.perf_counter() - start:.0f} s):\n{choice.table()}", file=sys.stderr)
    cases.append(
        (
            f"N={n} choose_point(min_speedup={min_speedup:g}) -> {choice.point}, low-rank DEC",
            cachequant_at(n, choice.point, CacheErrorLowRank()),
        )
    )
    return cases


def table_cases(n: int) -> list[tuple[str, Recipe]]:
    return [
        (f"N={n} CacheQuant, per-step activation tables", cachequant_at(n, None)),
        (
            f"N={n} CacheQuant, per-group activation tables",
            cachequant_at(n, None, quantizer=UniformQuantizer(activation_tables="per_group")),
        ),
    ]


def quant_cases() -> list[tuple[str, Recipe]]:
    return [
        ("W8A8 (per-step tables)", Recipe(quantizer=UniformQuantizer())),
        (
            "W4A8 (per-step tables, GPTQ weights: the default below 8 bits)",
            Recipe(quantizer=UniformQuantizer(weight_bits=4)),
        ),
        (
            "W4A8 round-to-nearest weights (CacheQuant's, before G)",
            Recipe(quantizer=UniformQuantizer(weight_bits=4, weight_rounding="nearest")),
        ),
        (
            "W4A8 AdaRound weights (per layer)",
            Recipe(quantizer=UniformQuantizer(weight_bits=4, weight_rounding="adaround")),
        ),
        ("W8A8 GPTQ weights", Recipe(quantizer=UniformQuantizer(weight_rounding="gptq"))),
        ("W8A8, one shared range", Recipe(quantizer=UniformQuantizer(per_step=False))),
        ("W8A8 PTQ4DM (NDTC, shared)", Recipe(quantizer=PTQ4DM())),
        ("W4A8 PTQ4DM (NDTC, shared)", Recipe(quantizer=PTQ4DM(weight_bits=4))),
        ("W8A8, io layers quantized (CacheQuant's choice)", Recipe(quantizer=UniformQuantizer(float_io=False))),
        (
            "W8A8, one weight scale across split halves (before H 1)",
            Recipe(quantizer=UniformQuantizer(split_weights=False)),
        ),
    ]


SCHEDULE_BASELINES = ("uniform", "DPS (CacheQuant)")


def paired_table(evaluations: dict, scorer: DigitsScorer, per_sample: dict, path: str | None) -> None:
    """Every other schedule of the schedules table against uniform and DPS at the same N (`cq.compare`: paired
    bootstrap on the same seeds): which differences the sample size decides, on the seeds where full precision
    is stable (`PairedComparison.stable`; an unstable seed's PSNR compares against a sample a nudge changes)."""
    if not evaluations:
        return
    first = next(iter(evaluations.values()))
    paired, unstable = len(first.stable_seeds), list(first.unstable_seeds)
    rows = []
    for label, r in evaluations.items():
        n, name = label.split(" ", 1)
        if name in SCHEDULE_BASELINES:
            continue
        for base in SCHEDULE_BASELINES:
            other = evaluations.get(f"{n} {base}")
            if other is None:
                continue
            c = cq.compare(r, other, features=scorer.features, data=scorer.data_stats)
            per_sample[label][f"vs {base}"] = c.as_dict()
            c = c.stable
            rows.append(
                [
                    f"{n} {name} vs {base}",
                    str(c.mean_db),
                    str(c.p5_db),
                    f"{c.worst_db.value:+.2f} ({100 * c.worst_beats:.0f}%)",
                    f"{c.wins} / {c.losses}",
                    str(c.fid),
                ]
            )
    if not rows:
        return
    if path:
        write_json(path, per_sample)
    print_table(
        [
            "A vs B",
            "mean dB A-B",
            "p5 dB A-B",
            "worst dB A-B (A above in % of resamples)",
            "seeds won / lost",
            "digits FID B-A",
        ],
        rows,
        title=f"paired on the same {paired} held-out seeds where full precision is stable (without the "
        f"{len(unstable)} unstable: {unstable[:12]}), 95% percentile bootstrap (1000 resamples); > 0 favours A; "
        "an interval that excludes 0 is decided at this sample size",
    )


def write_json(path: str, data: dict) -> None:
    import json

    from cq.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", choices=["demo", "ablation", "quant", "schedules", "points", "tables"], default="demo")
    ap.add_argument("--seeds", type=int, default=256, help="held-out samples (seeds 1000..)")
    ap.add_argument("--interval", type=int, default=5, help="cache interval of the demo table")
    ap.add_argument("--intervals", default="3,5,10", help="cache intervals of the ablation / schedules tables")
    ap.add_argument("--min-speedup", type=float, default=2.0, help="MAC budget of choose_point (points table)")
    ap.add_argument("--calib", type=int, default=32, help="calibration trajectories (seeds 10000..)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default="", help="run only the rows whose label contains this text ('a|b': either)")
    ap.add_argument("--per-sample", default=None, help="also write each row's per-seed PSNR and max |x0| (JSON)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    unet = cq.models.load("demo")
    steps, sampler = sampling_defaults(unet)
    seeds = range(1000, 1000 + args.seeds)
    points = unet.cache_points() if args.table == "points" else [unet.default_cache_point()]
    trace = cq.trace(unet, steps=steps, num_samples=args.calib, points=points, seed=10_000, **sampler)
    scorer = DigitsScorer.embedded()
    start = time.perf_counter()
    reference = ddim(FullPrecision(unet), seeded_noise(unet.sample_shape, seeds), steps=steps, **sampler)
    fp_seconds = time.perf_counter() - start
    fp_max = float(reference.abs().max())
    reference_max = reference.abs().flatten(1).amax(1).tolist()
    start = time.perf_counter()
    stability = cq.metrics.stability(
        unet, ddim, seeds=seeds, steps=steps, eps=1e-2, reference_samples=reference, progress=False, **sampler
    )
    stability_seconds = time.perf_counter() - start
    rows = [
        ["full precision", steps, "-", "-", "-", "-", "-", "-", "-", f"{fp_max:.2f}", f"{scorer.fid(reference):.2f}"]
    ]
    if args.table == "demo":
        cases = demo_cases(args.interval)
    elif args.table == "ablation":
        cases = [c for n in args.intervals.split(",") for c in ablation_cases(int(n))]
    elif args.table == "points":
        cases = [c for n in args.intervals.split(",") for c in point_cases(int(n), unet, trace, args.min_speedup)]
    elif args.table == "tables":
        cases = [c for n in args.intervals.split(",") for c in table_cases(int(n))]
    elif args.table == "schedules":
        cases = [c for n in args.intervals.split(",") for c in schedule_cases(int(n))]
    else:
        cases = quant_cases()
    per_sample = {
        "seeds": list(seeds),
        "full precision max |x0|": reference_max,
        "stability": stability.as_dict(),
    }
    extra = args.table == "schedules"
    evaluations = {}
    if extra:
        from cq.metrics.macs import predicted_speedup, unet_macs

        macs = unet_macs(unet, points=[unet.default_cache_point()])
        rows[0] += ["1.00x", "-"]
    for label, recipe in [c for c in cases if any(part in c[0] for part in args.only.split("|"))]:
        start = time.perf_counter()
        model = recipe.fit(unet, trace, progress=False)
        fit_seconds = time.perf_counter() - start
        r = cq.evaluate(
            model,
            unet,
            seeds=seeds,
            steps=steps,
            reference_samples=reference,
            stability=stability,
            progress=False,
            **sampler,
        )
        s = r.stable()
        if extra:
            evaluations[label] = r
        per_sample[label] = {
            "psnr_db": r.psnr_db.tolist(),
            "max_abs": r.max_abs.tolist(),
            "refresh_steps": [i for i, m in enumerate(model.refresh_mask()) if m],
        }
        row = [
            label,
            sum(model.refresh_mask()),
            f"{r.mean_db:.2f}",
            f"{r.median_db:.2f}",
            f"{r.p5_db:.2f} / {s.p5_db:.2f}",
            f"{r.min_db:.2f} ({r.worst_seed})",
            f"{s.min_db:.2f} ({s.worst_seed})",
            f"{len(r.below(25))} / {len(s.below(25))}",
            f"{len(r.below(15))} / {len(s.below(15))}",
            f"{r.max_abs_x0:.2f}",
            f"{scorer.fid(r.samples):.2f}",
        ]
        if extra:
            shallow = macs[unet.default_cache_point()]
            row += [f"{predicted_speedup(macs['full'], shallow, model.refresh_mask()):.2f}x", f"{fit_seconds:.0f}"]
        rows.append(row)
        print(f"  {label}: done ({fit_seconds:.0f} s fit, {r.seconds:.0f} s sampling)", file=sys.stderr, flush=True)
        print("  | " + " | ".join(str(v) for v in row) + " |", file=sys.stderr, flush=True)
        if args.per_sample:  # after every row, atomically: an interrupted run keeps the rows it finished
            per_sample[label]["table_row"] = [str(v) for v in row]
            write_json(args.per_sample, per_sample)
    print_table(
        [
            "setting",
            "full calls",
            "mean dB",
            "median dB",
            "p5 dB all / stable",
            "worst dB (seed)",
            "worst stable dB (seed)",
            "< 25 dB all / stable",
            "< 15 dB all / stable",
            "max |x0|",
            "digits FID",
        ]
        + (["MAC speedup", "fit s"] if extra else []),
        rows,
        title=f"demo model, DDIM {steps} steps {sampler}, {args.seeds} held-out seeds "
        f"({seeds.start}..{seeds.stop - 1}), calibration on {args.calib} other trajectories, "
        f"cache point {unet.default_cache_point()}",
    )
    if extra:
        paired_table(evaluations, scorer, per_sample, args.per_sample)
    unstable = stability.unstable_seeds
    print(
        f"\nfull precision: {fp_seconds:.1f} s (its stability under a 1e-2 nudge: {stability_seconds:.1f} s); "
        f"{len(unstable)} of {args.seeds} seeds unstable (< 35 dB): {list(unstable)[:20]}"
    )


if __name__ == "__main__":
    with torch.no_grad():
        main()
