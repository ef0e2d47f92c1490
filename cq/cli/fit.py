"""``cq fit``: fit a recipe on a model (a preset, a checkpoint or a diffusers folder) and save it; the work is
`cq.fit.plan.fit_plan` and `cq.calib.calibration.Calibration`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .args import _check_writable
from .models import _LATENT_NOTE


def _fit(args: argparse.Namespace) -> int:
    from ..artifact import save
    from ..calib.calibration import Calibration
    from ..fit.plan import fit_plan
    from ..report.summary import report
    from .models import device_of, load_base, read_conditions

    _check_writable(args.out)
    if args.trace_dir is not None and Path(args.trace_dir).exists():
        from ..errors import TraceStorageError

        raise TraceStorageError(f"--trace-dir {args.trace_dir} exists already: the trace is written to a new folder")
    device = device_of(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    conditions = read_conditions(args.prompt, args.prompts, args.class_labels)
    plan = fit_plan(
        args.recipe,
        interval=args.interval,
        bits=args.bits,
        backend=args.backend,
        schedule=args.schedule,
        budget=args.budget,
    )
    base = load_base(args.model, args.weights, tokenizer=args.tokenizer).to(device)
    calibration = Calibration.of(
        base,
        steps=args.steps,
        spacing=args.spacing,
        sampler=args.sampler,
        num_samples=args.samples,
        seed=args.seed,
        conditions=conditions,
        guidance=args.guidance,
        batch_size=args.batch_size,
    )
    print(f"cq fit: {plan.described} on {args.model}, {calibration.describe()}, device {device}")
    trace = calibration.record(plan.points(base.unet), keep=args.keep, storage=args.trace_dir)
    where = f" on disk in {args.trace_dir}" if args.trace_dir else ""
    print(
        f"trace: {trace.nbytes / 2**20:.1f} MiB stored{where} ({trace.x.shape[1]} rows per call, {trace.steps} calls)"
    )
    model, choice = plan.fit(base.unet, trace)
    if choice is not None:
        print(f"cache points measured on calibration trajectories (* chosen):\n{choice.table()}")
    path = save(model, args.out)
    print(report(model, reference=base.unet, trace=trace).summary())
    if base.pipe is not None:
        print(_LATENT_NOTE)
    print(f"wrote {path}")
    return 0
