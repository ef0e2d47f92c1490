"""`build_report`: the `Report` of a saved model and, given its base, the figures that need full precision -- the
teacher-forced per-step SQNR on fresh trajectories and the end-to-end evaluation on held-out seeds."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .summary import Report, report


if TYPE_CHECKING:
    from ..models.base import Base
    from ..models.conditioning import Conditions

__all__ = ["build_report"]


def build_report(
    model,
    base: Base | None = None,
    *,
    conditions: Conditions | None = None,
    guidance: float | None = None,
    samples: int = 8,
    eval_samples: int = 64,
    eval_seed: int = 30_000,
    stability: float | None = 1e-2,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> Report:
    """The `Report` of the `CompressedUNet` ``model``; with its full-precision ``base``, also the per-step SQNR on
    ``samples`` trajectories (seeds 20000..) and `cq.evaluate` on ``eval_samples`` held-out seeds ``eval_seed..``
    (0: skip; ``stability``: the nudge of `cq.metrics.stability`, None or 0 to skip), both sampled as the model was
    fitted, conditioned on ``conditions`` (guidance default: the calibration scale). ``log`` gets what the
    comparison was conditioned on."""
    if base is None:
        return report(model)
    from ..calib.calibration import Calibration
    from ..metrics.evaluate import evaluate
    from ..models.base import default_batch
    from ..models.conditioning import Conditions, conditioning, fitted_guidance
    from ..sampling.resolve import fitted_sampler

    conditions = conditions or Conditions()
    guidance = fitted_guidance(model, guidance)
    reference = base.unet
    calibration = conditioning(base, conditions, samples, guidance)
    model.to(device)
    base.to(device)
    sampler = fitted_sampler(model)
    sample_fn, steps, kwargs = sampler
    batch = batch_size or default_batch(reference)
    fresh = Calibration(reference, sampler, calibration, samples, 20_000, min(batch, samples))
    trace = fresh.record([model.cache.point] if model.cache is not None else [], progress=False)
    evaluation = None
    if eval_samples > 0:
        held_out = conditioning(base, conditions, eval_samples, guidance)
        evaluation = evaluate(
            model,
            reference,
            sample_fn,
            seeds=range(eval_seed, eval_seed + eval_samples),
            steps=steps,
            cond=held_out.cond,
            guidance_scale=held_out.scale,
            uncond=held_out.uncond,
            batch_size=batch,
            progress=True,
            stability=stability or None,
            **kwargs,
        )
    if log is not None:
        log(f"compared with {base.name}: {calibration.describe()}")
    return report(model, reference=reference, trace=trace, evaluation=evaluation)
