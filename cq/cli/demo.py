"""``cq demo``: the embedded demo model compressed with each recipe, a table and a grid of samples."""

from __future__ import annotations

import argparse
import copy
import time

import torch

from ..models.presets import sampling_defaults
from ..report.summary import print_table, tensor_bytes


def _load_base(name: str, path: str | None):
    from ..models import load

    return load(name, path=path)


def _trace_for(unet, recipe, steps: int, samples: int, seed: int, sampler: dict, progress: bool = True):
    from ..calib.trace import trace

    return trace(
        unet,
        steps=steps,
        num_samples=samples,
        points=recipe.points(unet),
        seed=seed,
        **sampler,
        batch_size=min(samples, 64),
        progress=progress,
    )


def _on_fastest_path(model) -> tuple[object, str]:
    """``(model to time, what runs it)``: a quantized model on the fastest exact int8 path this machine has
    (`CompressedUNet.to_int8`: the OpenVINO runtime where installed, else oneDNN where its kernels are exact), or
    the fake-quant model itself, saying why, where there is none; float models as they are."""
    from ..errors import BackendUnavailableError
    from ..quant.int8 import int8_layers

    layers = int8_layers(model.unet)
    if model.runtime is not None or not layers["fake-quant"]:
        return model, "OpenVINO int8" if model.runtime is not None else "PyTorch int8" if layers[
            "int8"
        ] else "PyTorch fp32"
    fast = copy.deepcopy(model)
    try:
        modes = fast.to_int8()
    except BackendUnavailableError:
        return model, "fake-quant (pip install 'cq[openvino]' for int8)"
    if fast.runtime is not None:
        return fast, "OpenVINO int8"
    kernels = sorted({m.split("(")[-1].rstrip(")") for m in modes.values() if m.startswith("int8")})
    return fast, f"PyTorch int8 ({'/'.join(kernels)})"


# ----------------------------------------------------------------------------------------------------------------
# cq demo


def _demo(args: argparse.Namespace) -> int:
    from ..fit.recipe import cachequant, deepcache, naive, quant_only
    from ..metrics import predicted_speedup, unet_macs
    from ..metrics.digits import DigitsScorer
    from ..metrics.evaluate import evaluate
    from ..report.viz import save_grid
    from ..sampling import FullPrecision, ddim
    from ..sampling.seeded import seeded_noise

    if args.threads:
        torch.set_num_threads(args.threads)
    unet = _load_base(args.model, None)
    steps, sampler = sampling_defaults(unet, args.steps, args.spacing)
    n = args.interval
    seeds = range(args.seed, args.seed + args.num)
    print(
        f"cq demo: model={args.model} ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params), "
        f"DDIM {steps} steps {sampler}, {args.num} held-out samples (seeds {seeds.start}..{seeds.stop - 1}), "
        f"interval {n}, {torch.get_num_threads()} threads"
    )
    recipes = {
        "DeepCache": deepcache(n),
        "W8A8": quant_only("w8a8"),
        "DeepCache+W8A8 (naive)": naive(n, "w8a8"),
        "CacheQuant": cachequant(n, "w8a8"),
    }
    if args.fp_only:
        recipes = {}
    scorer = DigitsScorer.embedded() if args.model == "demo" else None

    start = time.perf_counter()
    reference = ddim(FullPrecision(unet), seeded_noise(unet.sample_shape, seeds), steps=steps, **sampler)
    fp_seconds = time.perf_counter() - start
    print(f"full precision: {fp_seconds:.2f} s, {1000 * fp_seconds / args.num:.1f} ms per image")

    trace = None
    if recipes:
        fit_start = time.perf_counter()
        calib_seed = 10_000
        trace = _trace_for(unet, cachequant(n), steps, args.calib, seed=calib_seed, sampler=sampler, progress=False)
        print(
            f"trace: {args.calib} full-precision trajectories (seeds {calib_seed}..{calib_seed + args.calib - 1}, "
            f"not the evaluated ones), {time.perf_counter() - fit_start:.1f} s"
        )
    macs = unet_macs(unet)
    fid_fp = f"{scorer.fid(reference):.2f}" if scorer else "-"
    fp_mib = f"{tensor_bytes(unet) / 2**20:.2f}"
    rows = [
        [
            "full precision",
            "PyTorch fp32",
            steps,
            "1.00x",
            "1.00x",
            "-",
            "-",
            "-",
            f"{reference.abs().max():.2f}",
            fid_fp,
            fp_mib,
        ]
    ]
    panels, labels = [reference], ["full precision"]
    compile_notes: list[str] = []
    for label, recipe in recipes.items():
        model, runs_on = _on_fastest_path(recipe.fit(unet, trace, progress=False))
        if model.runtime is not None:  # compile every graph it samples with before the clock runs
            warm = time.perf_counter()
            evaluate(model, unet, seeds=seeds, steps=steps, reference_samples=reference, progress=False, **sampler)
            compile_notes.append(
                f"{label}: {model.runtime.compiled_graphs} OpenVINO graphs compiled in "
                f"{time.perf_counter() - warm:.1f} s (once per model and batch size, not in wall-clock)"
            )
        result = evaluate(
            model, unet, seeds=seeds, steps=steps, reference_samples=reference, progress=False, **sampler
        )
        point = model.cache.point if model.cache is not None else None
        mask = model.refresh_mask()
        mac = predicted_speedup(macs["full"], macs[point], mask) if point else 1.0
        rows.append(
            [
                label,
                runs_on,
                sum(mask),
                f"{mac:.2f}x",
                f"{fp_seconds / result.seconds:.2f}x",
                f"{result.mean_db:.1f}",
                f"{result.min_db:.1f}",
                f"{len(result.below())}",
                f"{result.max_abs_x0:.2f}",
                f"{scorer.fid(result.samples):.2f}" if scorer else "-",
                f"{tensor_bytes(model) / 2**20:.2f}",
            ]
        )
        panels.append(result.samples)
        labels.append(label)
    print_table(
        [
            "setting",
            "runs on",
            "full calls",
            "MAC speedup",
            "wall-clock",
            "mean PSNR dB",
            "worst PSNR dB",
            "< 25 dB",
            "max |x0|",
            "digits FID",
            "MiB",
        ],
        rows,
    )
    if recipes:
        print(
            f"PSNR: x0 of each held-out sample vs full precision from the same seed, end to end ({args.num} samples; "
            "`cq.evaluate`). digits FID: vs the 1797 real digits (the embedded classifier's features; noisy at "
            "small --num). wall-clock: sampling time vs full precision, each row on the path named in 'runs on' "
            "(quality measured on that same path); MiB counts tensors as stored (uint8 weights + fp32 scales)."
        )
        for note in compile_notes:
            print(note)
    out = save_grid(panels, args.out, nrow=int(args.num**0.5 + 0.999), scale=args.scale, labels=labels)
    print(f"wrote {out}")
    return 0
