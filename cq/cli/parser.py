"""The ``cq`` command's parser and dispatch: ``demo``, ``fit``, ``sample``, ``report``, ``eval``, ``reproduce``,
``train``, ``train-classifier``, ``strategies``; each sub-command runs in its own module of `cq.cli`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..quant.backend import Backend
from ..sampling.samplers import SAMPLERS
from .args import (
    NON_NEGATIVE,
    POSITIVE,
    SPACINGS,
    _add_model_args,
    _positive_float,
    _recipe_arg,
    _stability_eps,
    add_num_samples,
    example,
)
from .demo import _demo
from .fit import _fit
from .report import _report
from .sample import _sample
from .train import _train, _train_classifier


__all__ = ["main", "build_parser"]


def _strategies(args: argparse.Namespace) -> int:
    from ..models.families import MODEL_FAMILIES
    from ..plugins import load_entry_points
    from ..registry import CACHERS, CORRECTORS, QUANTIZERS, RECIPES, SCHEDULES

    installed = load_entry_points()
    for reg in (SCHEDULES, CACHERS, QUANTIZERS, CORRECTORS, RECIPES):
        print(
            f"{reg.kind}s: "
            + ", ".join(
                f"{n} ({c.__module__}.{c.__qualname__})" for n, c in zip(reg.names(), reg.classes(), strict=True)
            )
        )
    families = (MODEL_FAMILIES.get(n) for n in MODEL_FAMILIES.names())
    print("model families: " + ", ".join(f"{f.name} ({f.unet.__module__}.{f.unet.__qualname__})" for f in families))
    print("plugins from entry points: " + (", ".join(installed) or "none"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="cq", description="Cache + quantize diffusion UNets (CacheQuant).")
    parser.add_argument("--version", action="version", version=f"cq {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first: the strategies it registers can be fitted, saved, loaded (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="compress the embedded demo model with each recipe; table + grid",
        **example("cq demo -n 64 --steps 100 -o cq_demo.png"),
    )
    demo.add_argument("--model", default="demo", help="preset with embedded weights (default: demo)")
    add_num_samples(demo, dest="num", former="--num", type=POSITIVE, default=64, help="number of samples")
    demo.add_argument("--steps", type=POSITIVE, default=None, help="DDIM steps (default: the preset's)")
    demo.add_argument("--spacing", choices=SPACINGS, default=None, help="timestep spacing (default: the preset's)")
    demo.add_argument("--interval", type=POSITIVE, default=5, help="cache interval N")
    demo.add_argument("--calib", type=POSITIVE, default=32, help="calibration trajectories")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scale", type=POSITIVE, default=3, help="upscale factor of the PNG")
    demo.add_argument("--threads", type=POSITIVE, default=None)
    demo.add_argument("--fp-only", action="store_true", help="only sample the full-precision model")
    demo.add_argument("-o", "--out", default="cq_demo.png")
    demo.set_defaults(func=_demo)

    fit = sub.add_parser(
        "fit",
        help="fit a recipe on a model and save it",
        **example("cq fit --model demo --recipe cachequant --interval 5 --bits w8a8 -n 32 -o demo.cq"),
    )
    fit.add_argument("--model", default="demo", help="model preset or diffusers folder")
    _add_model_args(fit, fit=True)
    fit.add_argument(
        "--recipe",
        default="cachequant",
        type=_recipe_arg,
        help="cachequant, deepcache, quant_only, naive, or a recipe .json file (cq.registry.to_dict of a Recipe)",
    )
    fit.add_argument(
        "--schedule", default=None, help="registered schedule name replacing the recipe's (plugins included)"
    )
    fit.add_argument("--interval", type=POSITIVE, default=5)
    fit.add_argument(
        "--budget",
        default=None,
        help="speedup to meet, e.g. 5x (MACs) or '2.5x wall' (seconds measured on this machine): picks the "
        "refreshes, DPS schedule and cache point with the least calibration error (cachequant only; replaces "
        "--interval)",
    )
    fit.add_argument("--bits", default="w8a8")
    fit.add_argument(
        "--backend",
        default="fake",
        choices=[b.value for b in Backend],
        help="fake quantization, or integer kernels (saved with the recipe: `cq sample` runs them)",
    )
    fit.add_argument("--steps", type=POSITIVE, default=None)
    fit.add_argument("--spacing", choices=SPACINGS, default=None, help="timestep spacing (default: the preset's)")
    fit.add_argument(
        "--sampler", choices=sorted(SAMPLERS), default=None, help="default: the preset's (SD: plms, else ddim)"
    )
    add_num_samples(
        fit, dest="samples", former="--samples", type=POSITIVE, default=32, help="calibration trajectories"
    )
    fit.add_argument(
        "--keep", type=POSITIVE, default=None, help="trajectories stored at every step (default: all; bounds memory)"
    )
    fit.add_argument(
        "--trace-dir",
        default=None,
        help="keep the calibration trace in this new folder, memory-mapped, instead of memory (every trajectory "
        "can then be kept: the fit's memory does not grow with --keep or the steps); it is left there for reuse",
    )
    fit.add_argument("--seed", type=int, default=10_000)
    fit.add_argument("--threads", type=POSITIVE, default=None)
    fit.add_argument("-o", "--out", required=True, help="output file (.cq)")
    fit.set_defaults(func=_fit)

    sample = sub.add_parser(
        "sample",
        help="sample a saved model into a grid, or into a resumable folder of shards",
        **example("cq sample demo.cq -n 64 --seed 0 -o samples.png", "cq sample demo.cq -n 50000 --out samples/"),
    )
    sample.add_argument("path")
    add_num_samples(
        sample,
        dest="num",
        former="--num",
        type=POSITIVE,
        default=None,
        help="samples (default: one per prompt / label, 64 unconditional); under torchrun write -n N (torchrun's "
        "own parser reads --num as an abbreviation of its --numa-binding)",
    )
    _add_model_args(sample, fit=False)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--spacing", choices=SPACINGS, default=None, help="must be the spacing the model was fitted with"
    )
    sample.add_argument("--int8", action="store_true", help="run quantized layers on int8 kernels")
    sample.add_argument(
        "--scale", type=POSITIVE, default=None, help="upscale factor of the PNG (default: 3 up to 64 px, else 1)"
    )
    sample.add_argument("--threads", type=POSITIVE, default=None)
    sample.add_argument(
        "-o",
        "--grid",
        dest="grid",
        default=None,
        help="PNG grid of the samples (default cq_samples.png; not with --out)",
    )
    sample.add_argument("--npz", default=None, help="also write the images (uint8 NHWC arr_0; labels arr_1) here")
    sample.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write the samples into this folder in npz shards + manifest.json instead of a grid; resumable (the "
        "same command continues a killed run); torchrun --nproc-per-node K -m cq sample splits the shards",
    )
    sample.add_argument("--shard-size", type=POSITIVE, default=None, help="samples per shard with --out (default 256)")
    sample.add_argument(
        "--format",
        choices=("npz", "png"),
        default="npz",
        help="--out shards: shard-00000.npz (uint8 NHWC arr_0, seeds, labels arr_1 / prompts), or folders "
        "shard-00000/ of one PNG per seed + shard.json",
    )
    sample.set_defaults(func=_sample)

    rep = sub.add_parser(
        "report",
        help="per-step schedule, MACs, size; given the base model (--model / --weights): teacher-forced SQNR and "
        "held-out quality",
        **example("cq report demo.cq --model demo -n 8 --eval 64 --steps-table"),
    )
    rep.add_argument("path")
    _add_model_args(rep, fit=False)
    add_num_samples(
        rep,
        dest="samples",
        former="--samples",
        type=POSITIVE,
        default=8,
        help="trajectories of the teacher-forced per-step SQNR",
    )
    rep.add_argument(
        "--eval",
        type=NON_NEGATIVE,
        default=64,
        help="held-out samples of the end-to-end evaluation (0: skip; needs the base: --model / --weights)",
    )
    rep.add_argument("--eval-seed", type=int, default=30_000, help="first held-out seed of the evaluation")
    rep.add_argument(
        "--stability",
        type=_stability_eps,
        default=1e-2,
        metavar="EPS",
        help="also sample full precision from each seed's noise nudged by EPS x N(0, 1): seeds where that moves "
        "its sample below 35 dB are unstable, and the evaluation is stated on all and on the stable seeds "
        "(0: skip; one more full-precision sampling)",
    )
    rep.add_argument("--steps-table", action="store_true")
    rep.add_argument("--plot", default=None, help="write the schedule / error plot here (PNG)")
    rep.set_defaults(func=_report)

    from ..models.train import TrainConfig

    d = TrainConfig()
    tr = sub.add_parser(
        "train",
        help="train the demo model on scikit-learn digits (resumable)",
        **example("cq train --steps 5000 --seed 0 -o demo.safetensors"),
    )
    tr.add_argument("--preset", default=d.preset)
    tr.add_argument("--steps", type=POSITIVE, default=d.steps)
    tr.add_argument("--batch-size", type=POSITIVE, default=d.batch_size)
    tr.add_argument("--lr", type=_positive_float, default=d.lr)
    tr.add_argument("--seed", type=int, default=d.seed)
    tr.add_argument("--warmup", type=NON_NEGATIVE, default=d.warmup)
    tr.add_argument("--x0-weight-cap", type=_positive_float, default=d.x0_weight_cap, help="1: plain eps loss")
    tr.add_argument("--init", default=d.init, help="weights to fine-tune from (default: random init)")
    tr.add_argument("-o", "--out", default="demo.safetensors")
    tr.set_defaults(func=_train)

    tc = sub.add_parser(
        "train-classifier",
        help="train the digits classifier behind the demo's digits FID",
        **example("cq train-classifier --epochs 30 -o digits_classifier.safetensors"),
    )
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--epochs", type=POSITIVE, default=30)
    tc.add_argument("-o", "--out", default="digits_classifier.safetensors")
    tc.set_defaults(func=_train_classifier)

    from .eval import add_eval_parser

    add_eval_parser(sub, POSITIVE, NON_NEGATIVE)
    from .reproduce import add_reproduce_parser

    add_reproduce_parser(sub, POSITIVE)

    st = sub.add_parser(
        "strategies",
        help="list the registered strategies (plugins and entry points included)",
        **example("cq --plugin my_package.strategies strategies"),
    )
    st.set_defaults(func=_strategies)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``cq`` command. A `CqError` is printed as one line (``cq <command>: error: ...``) and exits 2;
    ``--debug`` shows the traceback instead."""
    from ..errors import CqError

    args = build_parser().parse_args(argv)
    try:
        from ..plugins import load_plugin

        for module in args.plugin:
            load_plugin(module)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CqError as e:
        if args.debug:
            raise
        print(f"cq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
