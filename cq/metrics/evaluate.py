"""`evaluate`: quality of a compressed model on held-out seeds, per sample, against its full-precision UNet.

Both models sample from the same per-seed noise (`cq.sampling.seeded_noise`) with the same sampler; every sample's
x0 is compared with its full-precision twin (PSNR, data range [-1, 1]). Nothing is teacher-forced: errors
accumulate along each trajectory as they do in use. What comes back is the distribution -- mean, median, 5th
percentile, worst sample, the fraction below a threshold, max |x0| -- never a mean alone, plus wall-clock, and
(given a `scorer`, e.g. `cq.metrics.digits.DigitsScorer`) distribution-level metrics against data.

Held-out is enforced: a model fitted by `Recipe.fit` carries its trace's seeds (`CompressedUNet.calibration_seeds`)
and `evaluate` refuses seeds that overlap them.

Full precision is not equally stable on every seed: on a few, a tiny change of the initial noise already changes
the sample, and no compressed model can be held to a bound there. `stability` measures it per seed (full precision
sampled from the noise nudged by ``eps * N(0, 1)`` against the unnudged sample); a seed is *unstable* when that
PSNR is below `STABLE_DB`. ``evaluate(..., stability=1e-2)`` records it, and the `Evaluation` then states its
worst-case fields both over all seeds and over the stable ones (`Evaluation.stable`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..compressed import CompressedUNet
from ..core.unet import CacheableUNet
from ..errors import CalibrationSeedsError, ConfigError, ReferenceMismatchError, StepCountMismatchError
from ..sampling.adapter import FullPrecision
from ..sampling.ddim import ddim
from ..sampling.guidance import check_guidance, guided
from ..sampling.model import check_sampler, fields_of
from ..sampling.samplers import model_calls, sampler_of, settings_of_call
from .error import per_sample_psnr
from .seed_stability import (
    STABLE_DB,
    Stability,
    _check_seeds,
    _generator,
    check_eps,
    stability,
)


__all__ = [
    "evaluate",
    "Evaluation",
    "Scorer",
    "Stability",
    "stability",
    "per_sample_psnr",
    "check_reference",
    "STABLE_DB",
]


class Scorer(Protocol):
    """Distribution-level metrics of sample sets (see `cq.metrics.digits.DigitsScorer`)."""

    def score(self, samples: Tensor, reference: Tensor) -> dict[str, float]: ...


_measure = stability  # `evaluate`'s ``stability`` argument shadows the name


@dataclass(frozen=True)
class Evaluation:
    """Per-sample quality of a compressed model on held-out seeds (see `evaluate`).

    Attributes:
        seeds: the seeds evaluated, in order.
        psnr_db: ``[N]`` x0 PSNR of each sample against full precision from the same seed.
        max_abs: ``[N]`` max |x0| of each compressed sample (data lives in [-1, 1]).
        reference_max_abs: ``[N]`` the same for the full-precision samples.
        threshold_db: what counts as a wrecked sample.
        seconds, reference_seconds: wall-clock of sampling the compressed / full-precision model (the latter None
            when ``reference_samples`` were passed in).
        samples, reference_samples: the x0 of both (None with ``keep_samples=False``).
        distribution: metrics from the `Scorer`, if one was given (e.g. digits FID).
        stability: full precision's own stability on these seeds (``evaluate(..., stability=eps)``), or None;
            with it, `stable` is this evaluation on the stable seeds and `summary` states both.
    """

    seeds: tuple[int, ...]
    psnr_db: Tensor
    max_abs: Tensor
    reference_max_abs: Tensor
    threshold_db: float
    seconds: float
    reference_seconds: float | None
    samples: Tensor | None = None
    reference_samples: Tensor | None = None
    distribution: dict[str, float] = field(default_factory=dict)
    stability: Stability | None = None

    def __post_init__(self) -> None:
        if self.stability is not None and tuple(self.stability.seeds) != tuple(self.seeds):
            raise ReferenceMismatchError(
                f"the stability record covers other seeds ({len(self.stability.seeds)} from "
                f"{self.stability.seeds[:1]}) than the evaluation ({len(self.seeds)} from {self.seeds[:1]}); "
                "measure it on the same seeds="
            )

    @property
    def unstable_seeds(self) -> tuple[int, ...]:
        """Seeds where full precision itself is unstable (`ConfigError` without a stability record)."""
        return self._stability().unstable_seeds

    @property
    def stable_seeds(self) -> tuple[int, ...]:
        return self._stability().stable_seeds

    def _stability(self) -> Stability:
        if self.stability is None:
            raise ConfigError(
                "this evaluation has no stability record: evaluate with stability=1e-2 (or a cq.metrics.stability "
                "result of the same seeds)"
            )
        return self.stability

    def stable(self) -> Evaluation:
        """This evaluation on the seeds where full precision is stable (`excluding` the unstable ones); its
        worst-case fields (`min_db`, `p5_db`, `below`) are the bound's. `ConfigError` without a stability
        record or when every seed is unstable."""
        return self.excluding(self.unstable_seeds)

    @property
    def num_samples(self) -> int:
        return len(self.seeds)

    def _finite(self) -> Tensor:
        return self.psnr_db.clamp(max=200.0).double()  # identical samples are inf dB; 200 dB stands for them

    @property
    def mean_db(self) -> float:
        return float(self._finite().mean())

    @property
    def median_db(self) -> float:
        return float(self._finite().median())

    @property
    def p5_db(self) -> float:
        """5th percentile of the per-sample PSNR (linear interpolation)."""
        return float(torch.quantile(self._finite(), 0.05))

    @property
    def min_db(self) -> float:
        return float(self.psnr_db.min())

    @property
    def worst_seed(self) -> int:
        return self.seeds[int(self.psnr_db.argmin())]

    @property
    def fraction_below(self) -> float:
        """Fraction of samples under ``threshold_db``."""
        return float((self.psnr_db < self.threshold_db).double().mean())

    @property
    def max_abs_x0(self) -> float:
        return float(self.max_abs.max())

    def below(self, threshold_db: float | None = None) -> list[int]:
        """Seeds whose sample is under ``threshold_db`` (default: the evaluation's threshold)."""
        limit = self.threshold_db if threshold_db is None else threshold_db
        return [s for s, p in zip(self.seeds, self.psnr_db.tolist(), strict=True) if p < limit]

    def as_dict(self) -> dict[str, Any]:
        out = {
            "samples": self.num_samples,
            "mean_db": self.mean_db,
            "median_db": self.median_db,
            "p5_db": self.p5_db,
            "min_db": self.min_db,
            "worst_seed": self.worst_seed,
            f"below_{self.threshold_db:g}db": self.fraction_below,
            "max_abs_x0": self.max_abs_x0,
            "reference_max_abs_x0": float(self.reference_max_abs.max()),
            "seconds": self.seconds,
            "reference_seconds": self.reference_seconds,
        }
        if self.stability is not None:
            out["stability"] = self.stability.as_dict()
            if self.stability.stable_seeds:
                s = self.stable()
                out["stable"] = {
                    "samples": s.num_samples,
                    "mean_db": s.mean_db,
                    "p5_db": s.p5_db,
                    "min_db": s.min_db,
                    "worst_seed": s.worst_seed,
                    f"below_{s.threshold_db:g}db": s.fraction_below,
                    "max_abs_x0": s.max_abs_x0,
                }
        return out | self.distribution

    def summary(self) -> str:
        n = self.num_samples
        below = round(self.fraction_below * n)
        lines = [
            f"held-out evaluation: {n} seeds ({self.seeds[0]}..{self.seeds[-1]}), x0 PSNR vs full precision, "
            "end to end (errors accumulate; not teacher-forced)",
            f"  PSNR dB: mean {self.mean_db:.2f}, median {self.median_db:.2f}, 5th pct {self.p5_db:.2f}, "
            f"worst {self.min_db:.2f} (seed {self.worst_seed})",
            f"  below {self.threshold_db:g} dB: {below} of {n} ({100 * self.fraction_below:.1f}%); "
            f"max |x0| {self.max_abs_x0:.2f} (full precision {float(self.reference_max_abs.max()):.2f})",
            f"  wall-clock: {self.seconds:.2f} s"
            + (
                f" vs full precision {self.reference_seconds:.2f} s "
                f"({self.reference_seconds / max(self.seconds, 1e-9):.2f}x)"
                if self.reference_seconds is not None
                else ""
            ),
        ]
        if self.distribution:
            lines.append("  " + ", ".join(f"{k} {v:.3f}" for k, v in self.distribution.items()))
        if self.stability is not None:
            lines.append("  " + self.stability.describe())
            if self.stability.stable_seeds:
                s = self.stable()
                m = s.num_samples
                lines.append(
                    f"  on the {m} stable seeds: mean {s.mean_db:.2f}, 5th pct {s.p5_db:.2f}, worst {s.min_db:.2f} "
                    f"(seed {s.worst_seed}); below {s.threshold_db:g} dB: {len(s.below())} of {m}; "
                    f"max |x0| {s.max_abs_x0:.2f}"
                )
            else:
                lines.append("  no stable seed: every bound on stable seeds is vacuous here")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def excluding(self, seeds: Iterable[int]) -> Evaluation:
        """This evaluation without ``seeds`` (`stable` drops those where full precision itself is unstable, whose
        PSNR compares against a sample that a nudge already changes): per-sample fields, samples and the stability
        record keep the other rows, in order; the ``distribution`` metrics, computed on every sample, are dropped.
        `ConfigError` for a seed not evaluated or when no sample would be left."""
        drop = set(seeds)
        unknown = sorted(drop - set(self.seeds))
        if unknown:
            raise ConfigError(
                f"excluding: seeds {unknown[:5]} were not evaluated (this evaluation holds {self.seeds[:1]}..)"
            )
        keep = [i for i, s in enumerate(self.seeds) if s not in drop]
        if not keep:
            raise ConfigError("excluding every evaluated seed leaves nothing to state")
        rows = torch.tensor(keep, dtype=torch.long)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows.to(t.device)]

        return replace(
            self,
            seeds=tuple(self.seeds[i] for i in keep),
            psnr_db=pick(self.psnr_db),
            max_abs=pick(self.max_abs),
            reference_max_abs=pick(self.reference_max_abs),
            samples=pick(self.samples),
            reference_samples=pick(self.reference_samples),
            distribution={},
            stability=None if self.stability is None else self.stability.excluding(drop),
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    reference: nn.Module,
    sampler: Callable[..., Tensor] | None = None,
    *,
    seeds: Sequence[int],
    steps: int | None = None,
    batch_size: int = 64,
    threshold_db: float = 25.0,
    cond: Tensor | None = None,
    scorer: Scorer | None = None,
    keep_samples: bool = True,
    reference_samples: Tensor | None = None,
    guidance_scale: float = 1.0,
    uncond: Tensor | None = None,
    progress: bool = True,
    stability: float | Stability | None = None,
    **sampler_kwargs: Any,
) -> Evaluation:
    """Sample ``seeds`` with ``model`` and with its full-precision ``reference``; compare them sample by sample.

    Args:
        model: a step-aware model, typically a fitted `CompressedUNet` (its calibration seeds are refused).
        reference: the full-precision cq UNet the model was fitted on (same architecture, same weights).
        sampler: a cq sampler (`cq.sampling.ddim`, `cq.sampling.plms`); ``sampler_kwargs`` go to it. Default:
            the one the model was fitted with (its ``sampler_settings``), else ``ddim``.
        seeds: held-out initial-noise seeds, one sample each (`cq.sampling.seeded_noise`).
        steps: sampler steps. With ``sampler``, ``steps`` and ``sampler_kwargs`` all omitted, a model that states
            its ``sampler_settings`` is evaluated with exactly those; otherwise the default is the step count the
            model was fitted for. Settings other than the fitted ones are refused before anything is sampled.
        batch_size: samples drawn together (a sample depends only on its seed; with ``eta > 0`` the ancestral
            noise is drawn per batch).
        threshold_db: samples below it count as wrecked (`Evaluation.fraction_below`).
        cond: ``[len(seeds), ...]`` conditioning, or None.
        scorer: distribution-level metrics of the compressed and reference sample sets.
        keep_samples: keep both sample sets in the result.
        reference_samples: the full-precision x0 of exactly these seeds with this sampler, from an earlier
            `Evaluation.reference_samples`, to compare several models without sampling the reference again.
        guidance_scale, uncond: classifier-free guidance for both models (`ClassifierFreeGuidance` around the
            compressed model and around the full-precision reference), e.g. ``7.5, pipe.unconditional(1)``.
        progress: a progress bar over batches.
        stability: also measure full precision's own stability on these seeds: a nudge ``eps`` (e.g. ``1e-2``:
            see `stability`; one more full-precision sampling), or an earlier `Evaluation.stability` /
            `cq.metrics.stability` result of the same seeds. The result then states its worst-case fields over
            all seeds and over the stable ones (`Evaluation.stable`).

    Raises:
        ConfigError: no seeds, repeated seeds, a bad batch size or threshold, a nudge that is not a number > 0.
        CalibrationSeedsError: seeds that the model was calibrated on.
        StepCountMismatchError: ``steps`` that do not match the model's fitted step count
            (`SamplerMismatchError`: any sampler setting that differs from the fitted ones).
        ReferenceMismatchError: a reference of another architecture or other weights than the model's base.
    """
    seeds = _check_seeds(seeds, batch_size, "evaluate")
    if isinstance(stability, Stability):
        if tuple(stability.seeds) != seeds:
            raise ReferenceMismatchError(
                f"stability= covers other seeds ({len(stability.seeds)} from {stability.seeds[:1]}) than the "
                f"evaluation ({len(seeds)} from {seeds[:1]}); measure it on the same seeds="
            )
    elif stability is not None:
        stability = check_eps(stability)
    if not math.isfinite(threshold_db):
        raise ConfigError(f"threshold_db must be a finite number of dB, got {threshold_db!r}")
    compressed = model if isinstance(model, CompressedUNet) else None
    calibrated = set(compressed.calibration_seeds) if compressed is not None else set()
    overlap = sorted(calibrated.intersection(seeds))
    if overlap:
        raise CalibrationSeedsError(
            f"{len(overlap)} of the {len(seeds)} seeds were used to calibrate this model (e.g. {overlap[:5]}); "
            f"quality is only measured on held-out seeds: pick seeds outside "
            f"{min(calibrated)}..{max(calibrated)}"
        )
    fitted_settings = fields_of(model).sampler_settings
    if sampler is None and steps is None and not sampler_kwargs and fitted_settings is not None:
        sampler = sampler_of(fitted_settings)
        sampler_kwargs = fitted_settings.call_kwargs()
        steps = sampler_kwargs.pop("steps")
    sampler = ddim if sampler is None else sampler
    steps = _resolve_steps(model, sampler, steps)
    check_reference(model, reference)
    schedule = sampler_kwargs.get("noise") or reference.noise_schedule
    planned = settings_of_call(sampler, steps, schedule.num_timesteps, sampler_kwargs) if schedule else None
    if planned is not None:
        check_sampler(model, planned)
    if cond is not None and (not isinstance(cond, Tensor) or cond.shape[0] != len(seeds)):
        raise ConfigError(f"cond must be a tensor with first dimension len(seeds)={len(seeds)}")

    if reference_samples is not None and (
        not isinstance(reference_samples, Tensor) or reference_samples.shape[0] != len(seeds)
    ):
        raise ConfigError(f"reference_samples must be a tensor with one row per seed ({len(seeds)})")

    from ..sampling.seeded import seeded_noise

    shape = tuple(reference.sample_shape)
    device = next(reference.parameters()).device
    fp = FullPrecision(reference)
    check_guidance(guidance_scale, uncond, cond)

    outs, refs, seconds, ref_seconds = [], [], 0.0, 0.0
    starts = range(0, len(seeds), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        batch = seeds[start : start + batch_size]
        noise = seeded_noise(shape, batch).to(device)
        c = cond[start : start + len(batch)].to(device) if cond is not None else None
        t0 = time.perf_counter()
        if reference_samples is None:
            ref_model = guided(fp, guidance_scale, uncond, slice(start, start + len(batch)))
            refs.append(
                sampler(ref_model, noise, steps=steps, cond=c, generator=_generator(batch), **sampler_kwargs).cpu()
            )
        else:
            refs.append(reference_samples[start : start + len(batch)].cpu())
        t1 = time.perf_counter()
        test_model = guided(model, guidance_scale, uncond, slice(start, start + len(batch)))
        outs.append(
            sampler(test_model, noise, steps=steps, cond=c, generator=_generator(batch), **sampler_kwargs).cpu()
        )
        seconds += time.perf_counter() - t1
        ref_seconds += t1 - t0
    out, ref = torch.cat(outs).float(), torch.cat(refs).float()
    distribution = scorer.score(out, ref) if scorer is not None else {}
    if stability is not None and not isinstance(stability, Stability):
        stability = _measure(
            reference,
            sampler,
            seeds=seeds,
            steps=steps,
            eps=stability,
            batch_size=batch_size,
            cond=cond,
            guidance_scale=guidance_scale,
            uncond=uncond,
            reference_samples=ref,
            progress=progress,
            **sampler_kwargs,
        )
    return Evaluation(
        seeds=seeds,
        psnr_db=per_sample_psnr(out, ref),
        max_abs=out.abs().flatten(1).amax(1),
        reference_max_abs=ref.abs().flatten(1).amax(1),
        threshold_db=float(threshold_db),
        seconds=seconds,
        reference_seconds=ref_seconds if reference_samples is None else None,
        samples=out if keep_samples else None,
        reference_samples=ref if keep_samples else None,
        distribution=distribution,
        stability=stability,
    )


def _resolve_steps(model: nn.Module, sampler: Callable[..., Tensor], steps: int | None) -> int:
    """The sampler step count, checked against the model's fitted step count before anything is sampled."""
    fitted = fields_of(model).num_steps
    calls = functools.partial(model_calls, sampler)
    if steps is None:
        if fitted is None:
            raise ConfigError("steps is required for a model that does not state its fitted step count")
        candidates = [s for s in range(1, fitted + 1) if calls(s) == fitted]
        if not candidates:
            raise StepCountMismatchError(
                f"no step count of {getattr(sampler, '__name__', sampler)} makes {fitted} model calls"
            )
        steps = candidates[0]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    if fitted is not None and calls(steps) != fitted:
        raise StepCountMismatchError(
            f"the model was fitted for {fitted} model calls, but {getattr(sampler, '__name__', 'the sampler')} "
            f"with steps={steps} makes {calls(steps)}; evaluate with the sampler and steps it was fitted for"
        )
    return steps


def check_reference(model: nn.Module, reference: nn.Module) -> None:
    """Raise `ReferenceMismatchError` unless ``reference`` is the full-precision cq UNet ``model`` was fitted on
    (same architecture and, when the model knows it, the same weights fingerprint)."""
    from ..io import fingerprint
    from ..models.loading import describe_model

    if not isinstance(reference, CacheableUNet):
        raise ReferenceMismatchError(
            f"the reference must be the full-precision cq UNet the model was fitted on, got {type(reference).__name__}"
        )
    if isinstance(model, CompressedUNet):
        base = model.unet
        got, want = describe_model(reference), describe_model(base)
        if got["family"] != want["family"] or got["config"] != want["config"]:
            raise ReferenceMismatchError(
                f"the reference is a {type(reference).__name__} with config {got['config']}, but the model was "
                f"fitted on a {type(base).__name__} with config {want['config']}; pass the UNet it was fitted on"
            )
    known = model.base_fingerprint if isinstance(model, CompressedUNet) else ""
    if known and fingerprint(reference) != known:
        raise ReferenceMismatchError(
            "the reference has other weights than the model's base (weights fingerprint differs); pass the "
            "full-precision UNet the model was fitted on"
        )
