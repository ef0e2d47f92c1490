"""``cq report``: a saved model's per-step schedule, MACs and size; given the base model, the teacher-forced
per-step SQNR and the held-out evaluation. The work is `cq.report.build.build_report`."""

from __future__ import annotations

import argparse

from .models import _LATENT_NOTE, _base_for, _note_guidance, _refuse_conditions


__all__ = ["build_report"]


def _report(args: argparse.Namespace) -> int:
    rep, base = build_report(args)
    print(rep.summary())
    if base is not None and base.pipe is not None:
        print(_LATENT_NOTE)
    if args.steps_table:
        print(rep.table())
    if args.plot:
        print(f"wrote {rep.plot(args.plot)}")
    return 0


def build_report(args: argparse.Namespace):
    """``(Report, base or None)`` of ``cq report``'s arguments; from Python, call `cq.report.build.build_report`
    with a loaded model and its base."""
    from ..artifact import load
    from ..errors import ConfigError
    from ..models.openai_unet import LDMUNet
    from ..report.build import build_report as build
    from .models import device_of, read_conditions

    device = device_of(args.device)
    conditions = read_conditions(args.prompt, args.prompts, args.class_labels)
    model = load(args.path)
    if not isinstance(model.unet, LDMUNet):
        _refuse_conditions(args, conditions)
    base = _base_for(model, args, required=False)
    if base is None and (conditions or args.guidance is not None):
        raise ConfigError(
            "--prompt / --class-labels / --guidance condition the comparison with the base model: pass --weights "
            "(and --model PRESET for a checkpoint file)"
        )
    if base is not None:
        _note_guidance(args, model)
    rep = build(
        model,
        base,
        conditions=conditions,
        guidance=args.guidance,
        samples=args.samples,
        eval_samples=args.eval,
        eval_seed=args.eval_seed,
        stability=args.stability,
        batch_size=args.batch_size,
        device=device,
        log=print,
    )
    return rep, base
