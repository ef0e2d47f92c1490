"""cq's int8 against the runtimes CPU users deploy with, side by side in one run, quality beside speed.

Whole-UNet forward at t=500 (interleaved repeats, medians, ratios to fp32 eager) for each batch size, on a
preset with random weights (``--model cifar10``: the DDPM CIFAR-10 UNet, 35.7 M parameters) or the embedded demo
model; every path that quantizes is also sampled end to end on held-out seeds of the demo model (DDIM 50, x0
PSNR against full precision: mean, 5th percentile, worst stable seed -- a seed is unstable when full precision
itself moves below 35 dB under a 1e-2 nudge of its initial noise) and checked for saturation (the largest
relative error of one forward against the exact quantized function, which an int16-saturating kernel breaks).

Peers (each skipped with a line when its package is missing): fp32 ``torch.compile``; torchao PT2E static int8
(X86InductorQuantizer) + compile; OpenVINO fp32 and int8 (NNCF post-training quantization); ONNX Runtime fp32 and
int8 (static QDQ, per-channel weights). cq: W8A8 fake quantization (the accuracy reference), W8A8 through
``to_int8()`` (the dispatcher's pick) and on OpenVINO (asymmetric 8-bit weights: shifted int8 codes where the CPU
sums them exactly, float weights elsewhere), and W7A8 (symmetric 7-bit weights, exact on every x86 int8 kernel) on
OpenVINO; the "signed attention" rows quantize q, k, v on signed grids (``attention_symmetric=True``), which
OpenVINO runs on int8 matmul kernels.

    python bench/peers.py --model cifar10 --batches 1,8,16
    python bench/peers.py --model demo --batches 16 --seeds 64
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import math
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine_line  # noqa: E402

import cq  # noqa: E402
from cq.fit.recipe import Recipe  # noqa: E402
from cq.quant import UniformQuantizer  # noqa: E402
from cq.runtime import cpu_line  # noqa: E402


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Plain(torch.nn.Module):
    """``unet(x, t)`` as a two-input module, for the exporters."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t)


def _onnx_fp32(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Plain(unet).eval(),
            (x, t),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x", "t"],
            output_names=["out"],
            dynamic_axes={"x": {0: "b"}, "t": {0: "b"}, "out": {0: "b"}},
        )
    unet.eval()  # the exporter restores the wrapper's training flag on every submodule
    return buffer.getvalue()


def _calibration(trace: cq.Trace, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` single-sample (x_t, t) inputs spread over the trace's steps: what the peers calibrate on."""
    steps, samples = trace.x.shape[0], trace.x.shape[1]
    out = []
    for k in range(count):
        s, i = (k * 7) % steps, k % samples
        out.append((trace.x[s, i : i + 1].float().numpy(), np.asarray([int(trace.timesteps[s])], dtype=np.int64)))
    return out


def peers(unet, trace, calib_count: int) -> dict[str, Callable[[int], Forward]]:
    """name -> ``build(batch)`` -> forward, for every peer whose package imports."""
    builders: dict[str, Callable[[int], Forward]] = {}
    x1, t1 = torch.randn(1, *unet.sample_shape), torch.full((1,), 500)
    onnx_fp32 = _onnx_fp32(unet, x1, t1)
    calib = _calibration(trace, calib_count)
    compiled_fp32 = torch.compile(copy.deepcopy(unet))
    builders["fp32 torch.compile"] = lambda batch: compiled_fp32
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        def torchao_int8(batch: int) -> Forward:
            x, t = torch.randn(batch, *unet.sample_shape), torch.full((batch,), 500)
            graph = torch.export.export(_Plain(copy.deepcopy(unet)).eval(), (x, t)).module()
            quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(graph, quantizer)
            for xc, tc in calib:
                prepared(torch.from_numpy(xc).expand(batch, *xc.shape[1:]), torch.from_numpy(tc).expand(batch))
            compiled = torch.compile(convert_pt2e(prepared))
            return lambda x, t: compiled(x, t)

        builders["torchao PT2E int8 + compile"] = torchao_int8
    except ImportError as e:
        print(f"(torchao PT2E skipped: {e})")
    try:
        import openvino as ov

        core = ov.Core()

        def ov_compile(model, batch: int) -> Forward:
            model = model.clone()
            model.reshape({"x": [batch, *unet.sample_shape], "t": [batch]})
            config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": ov.Type.f32}
            request = core.compile_model(model, "CPU", config).create_infer_request()

            def run(x, t):
                request.infer({"x": x.numpy(), "t": t.numpy()})
                return torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))

            return run

        ov_fp32 = core.read_model(onnx_fp32, b"")
        builders["OpenVINO fp32"] = lambda b: ov_compile(ov_fp32, b)
        try:
            import nncf

            nncf.set_log_level(40)
            ov_int8 = nncf.quantize(
                ov_fp32,
                nncf.Dataset(calib, lambda item: {"x": item[0], "t": item[1]}),
                subset_size=len(calib),
            )
            builders["OpenVINO int8 (NNCF)"] = lambda b: ov_compile(ov_int8, b)
        except ImportError as e:
            print(f"(NNCF skipped: {e})")
    except ImportError as e:
        print(f"(OpenVINO skipped: {e})")
    try:
        import onnxruntime as ort
        from onnxruntime import quantization as oq

        def ort_session(model: bytes) -> Callable[[int], Forward]:
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            return lambda b: lambda x, t: torch.from_numpy(session.run(None, {"x": x.numpy(), "t": t.numpy()})[0])

        builders["ONNX Runtime fp32"] = ort_session(onnx_fp32)

        class Reader(oq.CalibrationDataReader):
            def __init__(self):
                self.items = iter(calib)

            def get_next(self):
                item = next(self.items, None)
                return None if item is None else {"x": item[0], "t": item[1]}

        logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs a line per GroupNorm
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(onnx_fp32)
            oq.quantize_static(
                str(src),
                str(dst),
                Reader(),
                quant_format=oq.QuantFormat.QDQ,
                per_channel=True,
                activation_type=oq.QuantType.QUInt8,
                weight_type=oq.QuantType.QInt8,
            )
            builders["ONNX Runtime int8 (static QDQ)"] = ort_session(dst.read_bytes())
    except ImportError as e:
        print(f"(ONNX Runtime skipped: {e})")
    return builders


def cq_models(unet, trace, runtime: bool) -> dict[str, cq.CompressedUNet]:
    """cq's W8A8 (CacheQuant's quantizer) and W7A8 (symmetric 7-bit weights), fitted on ``trace``."""
    samples = {"refresh_samples": 8, "cached_samples": 4}
    quantizers = {
        "W8A8": UniformQuantizer(**samples),
        "W8A8 signed attention": UniformQuantizer(attention_symmetric=True, **samples),
        "W7A8": UniformQuantizer(weight_bits=7, weight_symmetric=True, **samples),
        "W7A8 signed attention": UniformQuantizer(
            weight_bits=7, weight_symmetric=True, attention_symmetric=True, **samples
        ),
    }
    fitted = {name: Recipe(quantizer=q).fit(unet, trace, progress=False) for name, q in quantizers.items()}
    models = {"cq W8A8 fake-quant": fitted["W8A8"]}
    default = copy.deepcopy(fitted["W8A8"])
    modes = default.to_int8()  # the dispatcher's pick for this CPU
    kernels = sorted({m.split("(")[-1].rstrip(")") for m in modes.values() if m.startswith("int8")})
    picked = "OpenVINO" if default.runtime is not None else "/".join(kernels)
    models[f"cq W8A8 to_int8() -> {picked}"] = default
    if runtime:
        for name, model in fitted.items():
            fast = copy.deepcopy(model)
            modes = fast.to_runtime("openvino")
            int8 = sum(m.startswith("int8") for m in modes.values())
            models[f"cq {name} OpenVINO ({int8}/{len(modes)} layers int8)"] = fast
    return models


def speed_table(unet, builders, models, batches: list[int], repeats: int) -> None:
    print("\n## Whole-UNet forward, t=500 (interleaved, median of", repeats, "repeats)\n", flush=True)
    rows: dict[str, dict[int, float]] = {}
    for batch in batches:
        x, t = torch.randn(batch, *unet.sample_shape), torch.full((batch,), 500)
        runs = {"fp32 eager": lambda x=x, t=t: unet(x, t)}
        for name, build in builders.items():
            start = time.perf_counter()
            forward = build(batch)
            with torch.no_grad():
                forward(x, t)  # compiles / specializes for this batch
            print(
                f"  {name}: ready for batch {batch} in {time.perf_counter() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            runs[name] = lambda f=forward, x=x, t=t: f(x, t)
        for name, model in models.items():
            runs[name] = lambda m=model, x=x, t=t: m(x, t, step=10)
        with torch.no_grad():
            med = interleaved_medians(runs, repeats=repeats, warmup=2)
        for name, seconds in med.items():
            rows.setdefault(name, {})[batch] = seconds
    head = " | ".join(f"batch {b} ms | vs fp32 eager" for b in batches)
    print(f"| path | {head} |")
    print("|---|" + "---|---|" * len(batches))
    for name, per in rows.items():
        cells = " | ".join(f"{1000 * per[b]:.1f} | {rows['fp32 eager'][b] / per[b]:.2f}x" for b in batches)
        print(f"| {name} | {cells} |")


def cachequant_w7(unet, trace, interval: int) -> cq.CompressedUNet:
    """CacheQuant (DPS + both DEC corrections) with symmetric 7-bit weights, signed attention operands and one
    activation table per cache group, on the OpenVINO runtime: at most two compiled graphs per group."""
    from cq.cache import DPS, DeepCache
    from cq.correct import CacheErrorCorrector, QuantErrorCorrector

    recipe = Recipe(
        cacher=DeepCache(schedule=DPS(interval=interval)),
        quantizer=UniformQuantizer(
            weight_bits=7, weight_symmetric=True, attention_symmetric=True, activation_tables="per_group"
        ),
        correctors=(CacheErrorCorrector(), QuantErrorCorrector()),
    )
    model = recipe.fit(unet, trace, progress=False)
    model.to_runtime("openvino")
    return model


def e2e_table(unet, builders, trace, batch: int, repeats: int, intervals: list[int]) -> dict[str, Callable]:
    """DDIM 50 end to end: fp32 eager, the int8 peers without a cache, cq's CacheQuant on OpenVINO."""
    print(f"\n## End to end: DDIM 50, batch {batch} (interleaved, median of {repeats} repeats)\n", flush=True)
    noise = torch.randn(batch, *unet.sample_shape, generator=torch.Generator().manual_seed(0))
    fp = cq.sampling.FullPrecision(unet)
    samplers: dict[str, Callable] = {"fp32 eager": fp}
    for name, build in builders.items():
        if "int8" in name:
            forward = build(batch)
            samplers[name] = lambda x, t, cond=None, *, step, f=forward: f(x, t.expand(x.shape[0]).contiguous())
    for n in intervals:
        samplers[f"cq CacheQuant N={n} W7A8 signed attention OpenVINO"] = cachequant_w7(unet, trace, n)
    runs = {}
    for name, model in samplers.items():
        start = time.perf_counter()
        with torch.no_grad():
            cq.sampling.ddim(model, noise, steps=50, noise=unet.noise_schedule)  # compiles every graph it needs
        print(f"  {name}: first run (compiling) {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        runs[name] = lambda m=model: cq.sampling.ddim(m, noise, steps=50, noise=unet.noise_schedule)
    with torch.no_grad():
        med = interleaved_medians(runs, repeats=repeats, warmup=0)
    print("| path | seconds | vs fp32 eager |")
    print("|---|---|---|")
    for name, seconds in med.items():
        print(f"| {name} | {seconds:.2f} | {med['fp32 eager'] / seconds:.2f}x |")
    return {k: v for k, v in samplers.items() if k.startswith("cq CacheQuant")}


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) of images in [-1, 1] (peak-to-peak 2), capped at 100 dB."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(4e-10))).clamp(max=100.0)


def quality_table(unet, builders, models, seeds: list[int], batch: int) -> None:
    """x0 PSNR vs full precision on held-out seeds, DDIM 50 (each int8 path sampled end to end)."""
    print(f"\n## Held-out quality: DDIM 50, seeds {seeds[0]}..{seeds[-1]}, x0 PSNR vs full precision\n")
    noise = torch.stack([torch.randn(unet.sample_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    nudge = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2**31 - 1))
    fp = cq.sampling.FullPrecision(unet)

    def sample(fn, x) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], batch):
                outs.append(cq.sampling.ddim(fn, x[i : i + batch], steps=50, noise=unet.noise_schedule))
        return torch.cat(outs)

    reference = sample(fp, noise)
    stable = _psnr(sample(fp, noise + 1e-2 * nudge), reference) >= 35.0
    print(
        f"full precision: {int((~stable).sum())} of {len(seeds)} seeds unstable (moves below 35 dB under a 1e-2 "
        f"nudge): {[s for s, ok in zip(seeds, stable.tolist(), strict=True) if not ok]}\n"
    )
    print("| path | mean dB | p5 dB | worst stable dB | max abs x0 |")
    print("|---|---|---|---|---|")
    paths: dict[str, Callable] = {}
    for name, build in builders.items():
        if "int8" in name:
            forward = build(batch)
            paths[name] = lambda x, t, cond=None, *, step, f=forward: f(x, t.expand(x.shape[0]).contiguous())
    paths.update(models)
    for name, model in paths.items():
        start = time.perf_counter()
        x0 = sample(model, noise)
        print(f"  ({name}: sampled in {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        psnr = _psnr(x0, reference)
        worst = psnr[stable].min().item() if bool(stable.any()) else math.nan
        print(
            f"| {name} | {psnr.mean():.2f} | {torch.quantile(psnr, 0.05):.2f} | {worst:.2f} | {x0.abs().max():.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar10", help="a preset name (random weights) or 'demo' (embedded)")
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=64, help="held-out demo seeds for the quality table (0: none)")
    parser.add_argument("--calib", type=int, default=8, help="calibration trajectories (cq) and inputs (peers: x4)")
    parser.add_argument(
        "--speed-calib",
        type=int,
        default=2,
        help="calibration trajectories for a random-weight preset, whose rows measure speed only (quality: demo)",
    )
    parser.add_argument("--e2e", default="5,10", help="CacheQuant intervals timed end to end ('' for none)")
    parser.add_argument("--e2e-batch", type=int, default=8)
    parser.add_argument("--only", default="", help="regex: time only the peers whose names match (cq rows always)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    print("CPU:", cpu_line())
    unet = cq.models.load("demo") if args.model == "demo" else cq.models.build(args.model, seed=0)
    unet.eval()
    calib = args.calib if args.model == "demo" else args.speed_calib
    point = [unet.default_cache_point()]
    trace = cq.trace(unet, steps=50, num_samples=calib, points=point, seed=10_000, progress=False)
    builders = {k: v for k, v in peers(unet, trace, 4 * args.calib).items() if re.search(args.only, k)}
    models = cq_models(unet, trace, runtime=True)
    speed_table(unet, builders, models, [int(b) for b in args.batches.split(",")], args.repeats)
    intervals = [int(n) for n in args.e2e.split(",") if n]
    if intervals:
        e2e_table(unet, builders, trace, args.e2e_batch, max(3, args.repeats // 2), intervals)
    if args.seeds:
        demo = unet if args.model == "demo" else cq.models.load("demo").eval()
        if demo is not unet:
            trace = cq.trace(
                demo,
                steps=50,
                num_samples=args.calib,
                points=[demo.default_cache_point()],
                seed=10_000,
                progress=False,
            )
            builders = {k: v for k, v in peers(demo, trace, 4 * args.calib).items() if re.search(args.only, k)}
            models = cq_models(demo, trace, runtime=True)
        models.update(
            {f"cq CacheQuant N={n} W7A8 signed attention OpenVINO": cachequant_w7(demo, trace, n) for n in intervals}
        )
        quality_table(demo, builders, models, list(range(1000, 1000 + args.seeds)), batch=16)


if __name__ == "__main__":
    main()
