"""`compare`: is model A better than model B on the same held-out seeds, or is the difference noise?

Two `Evaluation`s of the same seeds (`cq.evaluate` with the same ``seeds`` and sampler) are paired sample by
sample: every seed's PSNR against full precision comes from the same initial noise under both models, so their
per-seed differences cancel what the seeds share (a seed that is hard for one model is mostly hard for the other).
`compare` states each difference with a paired percentile bootstrap interval (the same resampled seeds for A and
B, Efron & Tibshirani 1993, ch. 13): mean and 5th-percentile PSNR, the worst sample (how often A's worst beats
B's over resamples: the worst of 256 samples is one seed, and a single seed decides it), seeds won and lost, and
-- given per-sample features and data statistics, e.g. `cq.metrics.digits.DigitsScorer` -- the Fréchet distance.
A difference whose interval excludes 0 is *decided* at that sample size; one whose interval straddles 0 is not,
whatever its sign. When the evaluations carry full precision's stability (``cq.evaluate(..., stability=1e-2)``),
the comparison is also stated on the stable seeds only (`PairedComparison.stable`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import ConfigError, InputValueError, ReferenceMismatchError
from .evaluate import Evaluation
from .frechet import GaussianStats, frechet_distance, gaussian_stats


__all__ = ["Difference", "PairedComparison", "compare"]

#: ``[N, D]`` features of ``[N, ...]`` samples (the space a Fréchet distance is measured in)
Features = Callable[[Tensor], Tensor]
#: most bootstrap resamples `compare` draws
MAX_RESAMPLES = 1_000_000
#: indices drawn at once (the resampled PSNRs of a chunk take ~3 x 8 bytes each: ~100 MB)
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Difference:
    """``a - b`` of one statistic (higher is better for A) with its paired percentile-bootstrap interval
    ``[low, high]`` (for a skewed statistic such as the worst sample it need not contain ``value``)."""

    value: float
    low: float
    high: float

    @property
    def decided(self) -> bool:
        """True when the interval excludes 0: the sign holds at this sample size."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.value:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


@dataclass(frozen=True)
class PairedComparison:
    """A against B on the same seeds (see `compare`); every `Difference` is oriented so that > 0 favours A.

    Attributes:
        seeds: the seeds both evaluations share, in order.
        mean_db, p5_db: A minus B of the mean and 5th-percentile per-sample PSNR.
        worst_db: A's worst sample minus B's (its interval: the same over resamples).
        worst_beats: fraction of resamples in which A's worst sample is above B's (ties count one half).
        wins, losses: seeds where A's PSNR is above / below B's by more than ``tie_db``.
        fid: B's Fréchet distance minus A's (lower distance is better), or None without features.
        confidence: the two-sided level of the intervals; resamples: bootstrap resamples drawn.
        stable: the same comparison on the seeds where full precision is stable (evaluations with a stability
            record; the unstable seeds of either are left out), or None (no record, or fewer than 2 stable seeds).
        unstable_seeds: the seeds ``stable`` leaves out (empty without a stability record).
    """

    seeds: tuple[int, ...]
    mean_db: Difference
    p5_db: Difference
    worst_db: Difference
    worst_beats: float
    wins: int
    losses: int
    fid: Difference | None
    confidence: float
    resamples: int
    stable: PairedComparison | None = None
    unstable_seeds: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"samples": len(self.seeds), "wins": self.wins, "losses": self.losses}
        for name in ("mean_db", "p5_db", "worst_db", "fid"):
            d = getattr(self, name)
            if d is not None:
                out[name] = {"value": d.value, "low": d.low, "high": d.high, "decided": d.decided}
        out |= {"worst_beats": self.worst_beats, "confidence": self.confidence, "resamples": self.resamples}
        if self.stable is not None:
            out["stable"] = self.stable.as_dict() | {"unstable_seeds": list(self.unstable_seeds)}
        return out

    def summary(self) -> str:
        level = f"{100 * self.confidence:g}%"
        parts = [
            f"mean {self.mean_db} dB",
            f"p5 {self.p5_db} dB",
            f"worst {self.worst_db.value:+.2f} dB (A's worst above B's in {100 * self.worst_beats:.0f}% of resamples)",
            f"seeds won / lost {self.wins} / {self.losses}",
        ]
        if self.fid is not None:
            parts.append(f"FID {self.fid} (B - A)")
        text = f"A - B on {len(self.seeds)} paired seeds, {level} paired bootstrap: " + "; ".join(parts)
        if self.stable is not None:
            text += (
                f"\n  on the {len(self.stable.seeds)} seeds where full precision is stable (without "
                f"{len(self.unstable_seeds)} unstable): " + self.stable.summary().split(": ", 1)[1]
            )
        return text


def _check_pair(a: Evaluation, b: Evaluation) -> None:
    for name, e in (("a", a), ("b", b)):
        if not isinstance(e, Evaluation):
            raise ConfigError(f"compare takes two cq.Evaluation results; {name} is a {type(e).__name__}")
    if tuple(a.seeds) != tuple(b.seeds):
        raise ReferenceMismatchError(
            f"compare pairs samples seed by seed, but the evaluations cover different seeds ({len(a.seeds)} from "
            f"{a.seeds[:1]} vs {len(b.seeds)} from {b.seeds[:1]}); evaluate both with the same seeds="
        )
    if len(a.seeds) < 2:
        raise ConfigError(f"compare needs at least 2 paired seeds, got {len(a.seeds)}")
    for name, e in (("a", a), ("b", b)):
        lost = [s for s, p in zip(e.seeds, e.psnr_db.tolist(), strict=True) if math.isnan(p)]
        if lost:
            raise InputValueError(
                f"compare: {name}'s samples are not finite at seeds {lost[:5]} (PSNR NaN); a model that diverges "
                "has no paired difference to estimate -- fix the divergence first (its max |x0| and summary() show it)"
            )


def _interval(samples: Tensor, value: float, confidence: float) -> Difference:
    tail = (1 - confidence) / 2
    low, high = torch.quantile(samples, torch.tensor([tail, 1 - tail], dtype=samples.dtype)).tolist()
    return Difference(value=value, low=low, high=high)


def _fid_gain(a: Evaluation, b: Evaluation, features: Features, data: GaussianStats) -> Callable[[Tensor], float]:
    """``gain(rows)``: B's Fréchet distance to ``data`` minus A's, on those sample rows (a resample repeats rows:
    biased as an FID, fine as the spread of a difference)."""
    if a.samples is None or b.samples is None:
        raise ConfigError(
            "a Fréchet distance needs the samples: evaluate both models with keep_samples=True (the default)"
        )
    fa, fb = (features(e.samples).detach().double().cpu() for e in (a, b))
    if fa.ndim != 2 or fa.shape != fb.shape or fa.shape[0] != len(a.seeds):
        raise ConfigError(
            f"features must map N samples to [N, D]; got {tuple(fa.shape)} and {tuple(fb.shape)} for "
            f"{len(a.seeds)} samples"
        )

    def gain(rows: Tensor) -> float:
        return frechet_distance(gaussian_stats(fb[rows]), data) - frechet_distance(gaussian_stats(fa[rows]), data)

    return gain


def _resample_chunks(n: int, resamples: int, seed: int) -> Iterator[Tensor]:
    """``[rows, n]`` index draws (with replacement), ``resamples`` rows in all, at most `_CHUNK` indices at a time
    so that memory stays bounded for any number of seeds."""
    generator = torch.Generator().manual_seed(seed)
    per_chunk = max(1, _CHUNK // n)
    for start in range(0, resamples, per_chunk):
        yield torch.randint(0, n, (min(per_chunk, resamples - start), n), generator=generator)


def compare(
    a: Evaluation,
    b: Evaluation,
    *,
    features: Features | None = None,
    data: GaussianStats | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    tie_db: float = 0.0,
    seed: int = 0,
) -> PairedComparison:
    """Compare evaluation ``a`` with ``b`` of the same seeds (module docstring); > 0 favours A throughout.

    Args:
        a, b: `cq.evaluate` results on the same ``seeds`` (`ReferenceMismatchError` otherwise).
        features, data: per-sample features and the data's `GaussianStats` for a Fréchet-distance difference
            (the digits FID: ``features=scorer.features``, ``data=scorer.data_stats``); both or neither. Needs the
            evaluations' samples.
        resamples: bootstrap resamples (seeds drawn with replacement, the same draw for A and B), at most
            `MAX_RESAMPLES`; drawn in chunks, so memory stays bounded for any number of seeds.
        confidence: two-sided level of the intervals, in (0, 1).
        tie_db: per-seed differences within this many dB count as neither won nor lost.
        seed: seed of the resampling (the result is deterministic given it).
    """
    _check_pair(a, b)
    unstable = _unstable_of(a, b)
    kwargs = dict(features=features, data=data, resamples=resamples, confidence=confidence, tie_db=tie_db, seed=seed)
    whole = _compare(a, b, **kwargs)
    if unstable is None:
        return whole
    left = len(a.seeds) - len(set(unstable))
    stable = _compare(a.excluding(unstable), b.excluding(unstable), **kwargs) if left >= 2 else None
    return replace(whole, stable=stable, unstable_seeds=tuple(s for s in a.seeds if s in set(unstable)))


def _unstable_of(a: Evaluation, b: Evaluation) -> tuple[int, ...] | None:
    """The seeds unstable in either evaluation's stability record (None when neither has one); records of
    another nudge are refused (their stable seeds are not the same question)."""
    records = [e.stability for e in (a, b) if e.stability is not None]
    if not records:
        return None
    if len({(r.eps, r.threshold_db) for r in records}) > 1:
        raise ReferenceMismatchError(
            f"compare: the evaluations' stability records use other nudges ({records[0].eps:g} vs "
            f"{records[1].eps:g}); evaluate both with the same stability= (or pass one's record to the other)"
        )
    return tuple(sorted({s for r in records for s in r.unstable_seeds}))


def _compare(
    a: Evaluation,
    b: Evaluation,
    *,
    features: Features | None,
    data: GaussianStats | None,
    resamples: int,
    confidence: float,
    tie_db: float,
    seed: int,
) -> PairedComparison:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or not 1 <= resamples <= MAX_RESAMPLES:
        raise ConfigError(
            f"compare: resamples must be an int in [1, {MAX_RESAMPLES}] (1000 states a 95% interval to about "
            f"0.1 of its width), got {resamples!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"compare: seed (of the resampling) must be an int, got {seed!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 < confidence < 1:
        raise ConfigError(f"compare: confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    if isinstance(tie_db, bool) or not isinstance(tie_db, int | float) or not tie_db >= 0:
        raise ConfigError(f"compare: tie_db must be a number >= 0, got {tie_db!r}")
    if (features is None) != (data is None):
        raise ConfigError("compare: a Fréchet distance needs both features= and data= (e.g. a DigitsScorer's)")
    fid_gain = _fid_gain(a, b, features, data) if features is not None else None
    pa, pb = a._finite(), b._finite()  # [N] float64, identical samples capped at 200 dB
    diff = pa - pb

    def p5(x: Tensor) -> Tensor:  # of each resample, as `Evaluation.p5_db` of the whole
        return torch.quantile(x, 0.05, dim=-1)

    mean, fifth, worst_a, worst_b, fid = [], [], [], [], []
    for index in _resample_chunks(pa.shape[0], resamples, seed):
        ra, rb = pa[index], pb[index]  # [rows, N]
        mean.append(ra.mean(1) - rb.mean(1))
        fifth.append(p5(ra) - p5(rb))
        worst_a.append(ra.min(1).values)
        worst_b.append(rb.min(1).values)
        if fid_gain is not None:
            fid.extend(fid_gain(rows) for rows in index)
    wa, wb = torch.cat(worst_a), torch.cat(worst_b)
    beats = float(((wa > wb).double() + 0.5 * (wa == wb).double()).mean())
    return PairedComparison(
        seeds=tuple(a.seeds),
        mean_db=_interval(torch.cat(mean), a.mean_db - b.mean_db, confidence),
        p5_db=_interval(torch.cat(fifth), a.p5_db - b.p5_db, confidence),
        worst_db=_interval(wa - wb, float(pa.min() - pb.min()), confidence),  # capped: inf - inf is NaN
        worst_beats=beats,
        wins=int((diff > tie_db).sum()),
        losses=int((diff < -tie_db).sum()),
        fid=None
        if fid_gain is None
        else _interval(torch.tensor(fid, dtype=torch.float64), fid_gain(torch.arange(pa.shape[0])), confidence),
        confidence=float(confidence),
        resamples=resamples,
    )
