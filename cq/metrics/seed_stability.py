"""Full precision's own stability on each seed: its sample from the seed's noise nudged by ``eps x N(0, 1)``
(`nudge`, from a generator of its own, `nudge_seed`) against its sample from the noise itself; a seed whose sample
that moves below `STABLE_DB` is unstable, and `cq.evaluate` states its figures on all and on the stable seeds."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.unet import CacheableUNet
from ..errors import ConfigError
from ..sampling.adapter import FullPrecision
from ..sampling.ddim import ddim
from ..sampling.guidance import check_guidance, guided
from .error import per_sample_psnr


#: a seed is unstable when full precision's sample from the nudged noise is below this PSNR against the unnudged one
STABLE_DB = 35.0
#: salt of the nudge generators (`nudge_seed`)
_NUDGE_SALT = 0x6E75_6467_6521


def nudge_seed(seed: int) -> int:
    """The seed of seed ``seed``'s nudge generator: a splitmix64 hash of the salted seed, to 32 bits (torch's CPU
    generator keeps only the low 32 bits of a seed, so an offset such as ``seed + 2**48`` would replay the seed's
    own noise). Never ``seed`` itself: the nudge is independent of the noise it nudges."""
    z = (int(seed) + _NUDGE_SALT) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    out = (z ^ (z >> 31)) & (2**32 - 1)
    return out if out != int(seed) % 2**32 else (out + 1) % 2**32


@dataclass(frozen=True)
class Stability:
    """Full precision's own stability on each seed (see `stability`).

    Attributes:
        seeds: the seeds, in order.
        eps: the nudge: full precision sampled from ``noise + eps * N(0, 1)``.
        psnr_db: ``[N]`` PSNR of that sample against the unnudged one (``inf`` where equal).
        threshold_db: a seed below it is unstable (`STABLE_DB`).
    """

    seeds: tuple[int, ...]
    eps: float
    psnr_db: Tensor
    threshold_db: float = STABLE_DB

    @property
    def unstable_seeds(self) -> tuple[int, ...]:
        return tuple(s for s, p in zip(self.seeds, self.psnr_db.tolist(), strict=True) if not p >= self.threshold_db)

    @property
    def stable_seeds(self) -> tuple[int, ...]:
        unstable = set(self.unstable_seeds)
        return tuple(s for s in self.seeds if s not in unstable)

    def excluding(self, seeds: Iterable[int]) -> Stability:
        drop = set(seeds)
        keep = [i for i, s in enumerate(self.seeds) if s not in drop]
        return replace(
            self,
            seeds=tuple(self.seeds[i] for i in keep),
            psnr_db=self.psnr_db[torch.tensor(keep, dtype=torch.long)],
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "threshold_db": self.threshold_db,
            "unstable_seeds": list(self.unstable_seeds),
            "psnr_db": self.psnr_db.tolist(),
        }

    def describe(self) -> str:
        unstable = self.unstable_seeds
        shown = ", ".join(str(s) for s in unstable[:10]) + (", ..." if len(unstable) > 10 else "")
        return (
            f"full precision's stability (its sample from the noise nudged by {self.eps:g} x N(0, 1) vs the "
            f"unnudged one): {len(unstable)} of {len(self.seeds)} seeds unstable (< {self.threshold_db:g} dB)"
            + (f": {shown}" if unstable else "")
        )


def check_eps(eps: object) -> float:
    """``eps`` as a float, or `ConfigError` naming the fix (a positive, finite number such as 1e-2)."""
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or not eps > 0:
        raise ConfigError(
            f"stability: the nudge eps must be a finite number > 0 (the initial noise is nudged by eps * N(0, 1)); "
            f"got {eps!r}: pass e.g. stability=1e-2"
        )
    return float(eps)


def nudge(noise: Tensor, seeds: Sequence[int], eps: float) -> Tensor:
    """``noise + eps * N(0, 1)``, the ``N(0, 1)`` of each row drawn from its own fixed generator (not its seed's)."""
    from ..sampling.seeded import seeded_noise

    delta = seeded_noise(noise.shape[1:], [nudge_seed(s) for s in seeds], dtype=noise.dtype)
    return noise + eps * delta.to(noise.device)


@torch.no_grad()
def stability(
    unet: nn.Module,
    sampler: Callable[..., Tensor] | None = None,
    *,
    seeds: Sequence[int],
    steps: int,
    eps: float = 1e-2,
    batch_size: int = 64,
    cond: Tensor | None = None,
    guidance_scale: float = 1.0,
    uncond: Tensor | None = None,
    reference_samples: Tensor | None = None,
    progress: bool = True,
    **sampler_kwargs: Any,
) -> Stability:
    """How stable full precision is on each seed: its sample from the seed's noise nudged by ``eps * N(0, 1)``
    against its sample from the unnudged noise (PSNR per seed; below `STABLE_DB` the seed is unstable).

    Args:
        unet: the full-precision cq UNet.
        sampler, steps, sampler_kwargs, cond, guidance_scale, uncond, batch_size: as `evaluate` samples it
            (default sampler ``ddim``); the ancestral noise (``eta > 0``) is the same for both samples.
        seeds: initial-noise seeds (`cq.sampling.seeded_noise`).
        eps: the nudge, a finite number > 0 (`ConfigError` otherwise).
        reference_samples: full precision's samples of exactly these seeds (e.g. `Evaluation.reference_samples`),
            so that only the nudged ones are drawn.
    """
    eps = check_eps(eps)
    seeds = _check_seeds(seeds, batch_size, "stability")
    if not isinstance(unet, CacheableUNet):
        raise ConfigError(f"stability measures a full-precision cq UNet, got {type(unet).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"stability: steps must be an int >= 1, got {steps!r}")
    if reference_samples is not None and (
        not isinstance(reference_samples, Tensor) or reference_samples.shape[0] != len(seeds)
    ):
        raise ConfigError(f"reference_samples must be a tensor with one row per seed ({len(seeds)})")
    if cond is not None and (not isinstance(cond, Tensor) or cond.shape[0] != len(seeds)):
        raise ConfigError(f"cond must be a tensor with first dimension len(seeds)={len(seeds)}")
    check_guidance(guidance_scale, uncond, cond)
    from ..sampling.seeded import seeded_noise

    sampler = ddim if sampler is None else sampler
    device = next(unet.parameters()).device
    fp = FullPrecision(unet)
    psnr = []
    for start in tqdm(range(0, len(seeds), batch_size), desc="stability", unit="batch", disable=not progress):
        batch = seeds[start : start + batch_size]
        rows = slice(start, start + len(batch))
        noise = seeded_noise(tuple(unet.sample_shape), batch).to(device)
        c = cond[rows].to(device) if cond is not None else None
        model = guided(fp, guidance_scale, uncond, rows)

        def draw(x: Tensor, model=model, c=c, batch=batch) -> Tensor:
            return sampler(model, x, steps=steps, cond=c, generator=_generator(batch), **sampler_kwargs).cpu()

        ref = draw(noise) if reference_samples is None else reference_samples[rows].cpu()
        psnr.append(per_sample_psnr(draw(nudge(noise, batch, eps)).float(), ref.float()))
    return Stability(seeds=seeds, eps=eps, psnr_db=torch.cat(psnr))


def _check_seeds(seeds: Sequence[int], batch_size: int, name: str) -> tuple[int, ...]:
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ConfigError(f"{name} needs at least one seed, got none; pass e.g. seeds=range(1000, 1256)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{name} got repeated seeds; each seed is one sample")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return seeds


def _generator(batch: Sequence[int]) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * batch[0] + len(batch))
