"""What OpenVINO compiles cq's int8 graph and NNCF's into: ops counted by kind, runtime precision and output
precision, read from each compiled model's runtime graph (no timing: it holds on a busy machine too).

The table shows where the two int8 graphs differ: which convolutions write int8 (NNCF quantizes layer outputs, so
its reorders, GroupNorms and eltwise chains move 1-byte tensors) and which write float32 (cq quantizes layer
inputs, as CacheQuant and Q-Diffusion do). Random weights, a trace of two trajectories; cq's W7A8 with signed
attention operands (the OpenVINO path of `bench/peers.py`).

    python bench/openvino_graph.py                 # a small DDPM (16 px, 2 levels), seconds
    python bench/openvino_graph.py --model cifar10 # the DDPM CIFAR-10 UNet
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402
from peers import _calibration, _onnx_fp32  # noqa: E402

import cq  # noqa: E402
from cq.fit.recipe import Recipe  # noqa: E402
from cq.models.ddpm import DDPMConfig  # noqa: E402
from cq.models.presets import Preset  # noqa: E402
from cq.quant import UniformQuantizer  # noqa: E402
from cq.runtime import cpu_line  # noqa: E402
from cq.sampling.noise import NoiseSchedule  # noqa: E402


SMALL = Preset(
    name="small", config=DDPMConfig(resolution=16, ch=32, ch_mult=(1, 2), attn_resolutions=(8,)), noise=NoiseSchedule()
)


def runtime_ops(compiled) -> collections.Counter:
    """(layer type, runtime precision, output precisions) -> count, constants left out."""
    counts: collections.Counter = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind not in ("Const", "Constant"):
            counts[(kind, info["runtimePrecision"].astype(str), info["outputPrecisions"].astype(str))] += 1
    return counts


def main() -> None:
    import nncf
    import openvino as ov

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="'small' or a preset name (random weights)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(machine_line())
    print("CPU:", cpu_line())
    unet = cq.models.build(SMALL if args.model == "small" else args.model, seed=0)
    trace = cq.trace(unet, steps=10, num_samples=2, points=[unet.default_cache_point()], seed=1, progress=False)
    quantizer = UniformQuantizer(
        weight_bits=7, weight_symmetric=True, attention_symmetric=True, weight_rounding="nearest"
    )
    model = Recipe(quantizer=quantizer).fit(unet, trace, progress=False)
    model.to_runtime("openvino")
    x, t = torch.randn(args.batch, *unet.sample_shape), torch.full((args.batch,), 500)
    with torch.no_grad(), cq.core.step.step_scope(0):
        model.runtime(x, t)  # compiles the full call's graph of step 0
    cq_ops = runtime_ops(model.runtime.compiled_models()[0])
    core = ov.Core()
    fp32 = core.read_model(_onnx_fp32(unet, x[:1], t[:1]), b"")
    nncf.set_log_level(40)
    calib = _calibration(trace, 8)
    int8 = nncf.quantize(fp32, nncf.Dataset(calib, lambda item: {"x": item[0], "t": item[1]}), subset_size=len(calib))
    int8.reshape({"x": [args.batch, *unet.sample_shape], "t": [args.batch]})
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": ov.Type.f32}
    nncf_ops = runtime_ops(core.compile_model(int8, "CPU", config))
    print(f"\n## OpenVINO runtime graphs, {args.model}, batch {args.batch}\n")
    print("| op | runtime precision | output precision | cq W7A8 | OpenVINO int8 (NNCF) |")
    print("|---|---|---|---|---|")
    for key in sorted(set(cq_ops) | set(nncf_ops)):
        print(f"| {' | '.join(key)} | {cq_ops.get(key, 0)} | {nncf_ops.get(key, 0)} |")


if __name__ == "__main__":
    main()
