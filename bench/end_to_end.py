"""End to end, side by side in one run: DDIM 50 steps on the demo model, batch 4, 2 threads,
interleaved repeats, medians; held-out quality of every compressed row beside its speed.

Rows: fp32 eager, the peers (torch.compile fp32, bf16 autocast + compile, PT2E static int8 + compile when this
torch can lower it), the best peer with cq's DeepCache schedule, and cq's paths (CacheQuant W8A8: fake-quant
compiled, integer kernels eager and compiled). Quality: x0 PSNR against eager fp32 on held-out seeds (never
calibration seeds).

    python bench/end_to_end.py [--interval 10] [--seeds 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine_line, print_table  # noqa: E402

import cq  # noqa: E402
from cq.metrics.evaluate import per_sample_psnr  # noqa: E402
from cq.sampling import FullPrecision, ddim, seeded_noise  # noqa: E402


STEPS, BATCH = 50, 4


class _Plain(torch.nn.Module):
    """A float network as a sampler model (compiled peers wrap `torch.compile(unet)`)."""

    def __init__(self, net, noise_schedule, autocast: torch.dtype | None = None):
        super().__init__()
        self.net, self.noise_schedule, self.autocast = net, noise_schedule, autocast

    def forward(self, x, t, cond=None, *, step):
        if self.autocast is None:
            return self.net(x, t)
        with torch.autocast("cpu", dtype=self.autocast):
            return self.net(x, t).float()


def _pt2e(unet, example):
    """PT2E static int8 (X86InductorQuantizer) + compile, calibrated on ``example``; None with the reason."""
    try:
        from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torch.ao.quantization.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as e:
        return None, f"PT2E unavailable ({e})"
    try:
        exported = torch.export.export(copy.deepcopy(unet), example).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        prepared(*example)
        return torch.compile(convert_pt2e(prepared)), ""
    except Exception as e:  # report, do not hide: the row says why it is missing
        return None, f"PT2E failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=32, help="held-out seeds for the quality column")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), f"| DDIM {STEPS} steps, batch {BATCH}, CacheQuant / DeepCache N={args.interval}")

    unet = cq.models.load("demo").eval()
    schedule = unet.noise_schedule
    recipe = cq.cachequant(interval=args.interval)
    trace = cq.trace(unet, steps=STEPS, num_samples=32, seed=10_000, points=recipe.points(unet), progress=False)
    fitted = recipe.fit(unet, trace, progress=False)
    deep = cq.deepcache(interval=args.interval).fit(unet, trace, progress=False)

    models: dict[str, torch.nn.Module] = {"fp32 eager": FullPrecision(unet)}
    notes: list[str] = []
    compile_s: dict[str, float] = {}
    models["fp32 + compile (peer)"] = _Plain(torch.compile(copy.deepcopy(unet)), schedule)
    models["bf16 autocast + compile (peer)"] = _Plain(torch.compile(copy.deepcopy(unet)), schedule, torch.bfloat16)
    example = (torch.randn(BATCH, *unet.sample_shape), torch.full((BATCH,), 500))
    pt2e, why = _pt2e(unet, example)
    if pt2e is not None:
        models["PT2E int8 + compile (peer)"] = _Plain(pt2e, schedule)
    else:
        notes.append(why)
    deep_compiled = copy.deepcopy(deep)
    deep_compiled.compile()
    models[f"DeepCache N={args.interval} fp32 + compile (peer + cq cache)"] = deep_compiled
    fake = copy.deepcopy(fitted)
    fake.compile()
    models[f"cq CacheQuant N={args.interval} W8A8 fake-quant + compile"] = fake
    int8 = copy.deepcopy(fitted)
    kernels = sorted(set(int8.to_int8().values()))
    models[f"cq CacheQuant N={args.interval} W8A8 int8 ({', '.join(kernels)})"] = int8
    int8_compiled = copy.deepcopy(fitted)
    int8_compiled.to_int8("int_mm")  # Inductor cannot lower oneDNN int8 modules (CompressedUNet.compile says why)
    int8_compiled.compile()  # no graph break since the integer modules read their scales as tensors
    models[f"cq CacheQuant N={args.interval} W8A8 int8 (torch._int_mm) + compile"] = int8_compiled

    noise = seeded_noise(unet.sample_shape, range(5000, 5000 + BATCH))
    runs = {name: (lambda m=m: ddim(m, noise, steps=STEPS)) for name, m in models.items()}
    for name, run in runs.items():  # first call compiles; timed apart
        start = time.perf_counter()
        run()
        compile_s[name] = time.perf_counter() - start
    medians = interleaved_medians(runs, repeats=args.repeats, warmup=0)

    seeds = list(range(1000, 1000 + args.seeds))  # held out: the trace used 10000..10031
    held = seeded_noise(unet.sample_shape, seeds)
    reference = ddim(FullPrecision(unet), held, steps=STEPS)
    rows = []
    base = medians["fp32 eager"]
    for name, model in models.items():
        psnr = per_sample_psnr(ddim(model, held, steps=STEPS), reference)
        quality = "reference" if name == "fp32 eager" else f"{psnr.mean():.1f} / {psnr.min():.1f}"
        rows.append(
            [name, f"{1000 * medians[name]:.0f}", f"{base / medians[name]:.2f}x", f"{compile_s[name]:.0f}", quality]
        )
    print_table(
        [
            "path",
            "ms / sample run",
            "vs fp32 eager",
            "first run s (compile)",
            f"x0 PSNR mean / worst, {len(seeds)} seeds",
        ],
        rows,
    )
    best_peer = min((v, k) for k, v in medians.items() if "(peer" in k)
    print(f"\nbest peer: {best_peer[1]} ({1000 * best_peer[0]:.0f} ms)")
    for name, v in medians.items():
        if name.startswith("cq "):
            print(f"{name}: {best_peer[0] / v:.2f}x the best peer, {base / v:.2f}x fp32 eager")
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    main()
