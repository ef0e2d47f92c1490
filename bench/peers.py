"""Side by side, one run: the demo UNet's forward (batch 16, 2 threads, interleaved, medians of 15) under eager
fp32, torch.compile fp32, bf16 autocast + compile, W8A8 fake quantization (split weights per half, as fitted;
and one weight scale, before issue H 1) and W8A8 on integer kernels (`to_int8("auto")`).

    python bench/peers.py
"""

import copy
import sys
from collections import Counter
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine_line  # noqa: E402

import cq  # noqa: E402
from cq.quant import UniformQuantizer  # noqa: E402
from cq.recipe import Recipe  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    print(machine_line())
    unet = cq.models.load("demo").eval()
    trace = cq.trace(unet, steps=50, num_samples=8, points=[unet.default_cache_point()], seed=10_000, progress=False)
    split = Recipe(quantizer=UniformQuantizer(refresh_samples=8, cached_samples=4)).fit(unet, trace, progress=False)
    single = Recipe(quantizer=UniformQuantizer(split_weights=False, refresh_samples=8, cached_samples=4)).fit(
        unet, trace, progress=False
    )
    int8 = copy.deepcopy(split)
    ex = int8.to_int8()
    x = torch.randn(16, *unet.sample_shape)
    t = torch.full((16,), 500)
    comp = torch.compile(unet)
    comp_bf = torch.compile(copy.deepcopy(unet))
    with torch.no_grad():
        comp(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            comp_bf(x, t)

    def bf():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            comp_bf(x, t)

    runs = {
        "fp32 eager": lambda: unet(x, t),
        "fp32 compile": lambda: comp(x, t),
        "bf16 autocast+compile": bf,
        "W8A8 fake-quant, split weights": lambda: split(x, t, step=10),
        "W8A8 fake-quant, one scale": lambda: single(x, t, step=10),
        "W8A8 int8 auto": lambda: int8(x, t, step=10),
    }
    with torch.no_grad():
        med = interleaved_medians(runs, repeats=15, warmup=2)
    base = med["fp32 eager"]
    for k, v in med.items():
        print(f"| {k} | {1000 * v:.1f} ms | {base / v:.2f}x vs eager fp32 |")
    print(Counter(m.split(" (")[0] for m in ex.values()))


if __name__ == "__main__":
    main()
