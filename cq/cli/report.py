"""``cq report``: a saved model's per-step schedule, MACs and size; given the base model, the teacher-forced
per-step SQNR and the held-out evaluation."""

from __future__ import annotations

import argparse

from .models import _LATENT_NOTE, _base_for, _default_batch, _fitted_sampler, _guidance, _refuse_conditions


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
    """``(Report, base or None)`` of ``cq report``'s arguments (``cq reproduce`` reads its figures)."""
    from ..artifact import load
    from ..errors import ConfigError
    from ..models.openai_unet import LDMUNet
    from ..report.summary import report
    from .models import conditioning, device_of, read_conditions

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
    reference = trace = evaluation = None
    if base is not None:
        from ..calib.trace import trace as record

        reference = base.unet
        guidance = _guidance(args, model)
        calibration = conditioning(base, conditions, args.samples, guidance)
        model.to(device)
        base.to(device)
        sample_fn, steps, sampler = _fitted_sampler(model, None)
        batch = args.batch_size or _default_batch(reference)
        trace = record(
            reference,
            sample_fn,
            steps=steps,
            num_samples=args.samples,
            seed=20_000,
            **sampler,
            cond=calibration.cond,
            guidance_scale=calibration.scale,
            uncond=calibration.uncond,
            batch_size=min(batch, args.samples),
            points=[model.cache.point] if model.cache is not None else [],
            progress=False,
        )
        if args.eval > 0:
            from ..metrics.evaluate import evaluate

            held_out = conditioning(base, conditions, args.eval, guidance)
            seeds = range(args.eval_seed, args.eval_seed + args.eval)
            evaluation = evaluate(
                model,
                reference,
                sample_fn,
                seeds=seeds,
                steps=steps,
                cond=held_out.cond,
                guidance_scale=held_out.scale,
                uncond=held_out.uncond,
                batch_size=batch,
                progress=True,
                stability=args.stability or None,
                **sampler,
            )
        print(f"compared with {base.name}: {calibration.describe()}")
    return report(model, reference=reference, trace=trace, evaluation=evaluation), base
