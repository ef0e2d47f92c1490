"""`Cacher`: a caching strategy (which point, which schedule) and `FeatureCache`, its run-time state.

The strategy is a frozen value (fitting returns a new one); the cached tensor lives in a `FeatureCache` owned
by the `CompressedUNet` (one per model: `Recipe.fit` calibrates and fits corrections through the same one),
written at refresh steps and read at the others. Reading checks that the stored
feature is the one the schedule says this step reuses, so out-of-order or mismatched calls fail loudly instead
of silently reusing a stale tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ..core.view import CacheView
from ..errors import CacheEmptyError
from .schedule import check_mask


if TYPE_CHECKING:
    from ..calib.trace import Trace

__all__ = ["Cacher", "FeatureCache"]


class Cacher(ABC):
    """Base class of caching strategies (register subclasses with ``@CACHERS.register(name)``)."""

    registry_kind: ClassVar[str] = "cacher"  # the registry its subclasses register in
    VERSION: ClassVar[int] = 1

    @abstractmethod
    def points(self, unet: nn.Module) -> tuple[str, ...]:
        """Cache points whose features a trace must record for `fit`."""

    @property
    def needs_rollout(self) -> bool:
        """True when `fit` needs ``rollout=`` (its schedule searches on the compressed model's own error):
        `Recipe.fit` then calls ``fit(unet, trace, rollout=r)`` with ``r(candidate_cacher, trajectories)`` ->
        per-trajectory x0 MSE of the compressed model built with that cacher (`cq.fit.rollout.CalibrationRollout`)."""
        return False

    @property
    def quantized_rollout(self) -> bool:
        """Whether that rollout samples the candidates with the recipe's quantizer (calibrated once; else in full
        precision). `DeepCache` forwards its schedule's `Schedule.quantized_rollout`."""
        return True

    @abstractmethod
    def fit(self, unet: nn.Module, trace: Trace | None) -> Cacher:
        """Return a cacher whose schedule is fitted (data-free schedules accept ``trace=None``)."""

    @abstractmethod
    def build(self, unet: nn.Module, num_steps: int) -> FeatureCache:
        """Run-time cache for sampling with ``num_steps`` steps."""

    def label(self) -> str:
        """Short description for reports; override to show more."""
        return type(self).__name__


class FeatureCache(nn.Module):
    """The one run-time cache: the cached feature of one point, the refresh mask deciding, per step, full vs
    shallow forward, and the correction applied to the cached feature before every shallow call.

    Sampling (`run`), calibration and DEC fitting (`cq.calib.replay`) all make shallow calls through `shallow`, so
    they see exactly the same corrected feature.

    Args:
        point: the cache point (see ``unet.cache_points()``).
        mask: ``mask[i]`` is True when step i refreshes.
        correction: optional module ``correction(feature, step) -> feature`` (DEC cache correction,
            `cq.correct.CacheErrorCorrector`); owned by the cache, so its tensors are in the model's state dict.
    """

    def __init__(self, point: str, mask: tuple[bool, ...], correction: nn.Module | None = None):
        super().__init__()
        self.point = point
        self.mask = check_mask(tuple(mask), len(mask), f"FeatureCache({point})")
        self.correction = correction
        # source[i]: the refresh step whose feature step i reuses
        self.source: list[int] = []
        last = 0
        for i, refresh in enumerate(self.mask):
            last = i if refresh else last
            self.source.append(last)
        self._feature: Tensor | None = None
        self._written_at: int | None = None

    @property
    def num_steps(self) -> int:
        return len(self.mask)

    def run(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Any, step: int) -> Tensor:
        """One UNet call at ``step`` while sampling: full (storing the feature) or shallow (reading it)."""
        if self.mask[step]:
            return self.full(unet, x, t, cond, step)
        return self.shallow(unet, x, t, cond, step, self.read(step, x.shape[0]))

    def full(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Any, step: int) -> Tensor:
        """A full call; the feature entering the point is stored as the one of refresh step ``step``."""
        view = CacheView.full(record=[self.point])
        out = unet(x, t, cond, cache=view)
        self._feature, self._written_at = view.features[self.point], step
        return out

    def shallow(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Any, step: int, feature: Tensor) -> Tensor:
        """A shallow call at ``step`` on the uncorrected cached ``feature`` (the correction is applied here)."""
        return unet(x, t, cond, cache=CacheView.shallow(self.point, self.corrected(feature, step)))

    def corrected(self, feature: Tensor, step: int) -> Tensor:
        """``feature`` as a shallow call at ``step`` reads it: through the correction, if any."""
        return feature if self.correction is None else self.correction(feature, step)

    def read(self, step: int, batch: int) -> Tensor:
        """The stored (uncorrected) feature step ``step`` reuses; raises `CacheEmptyError` if it is not held."""
        need = self.source[step]
        if self._feature is None or self._written_at != need:
            held = "nothing" if self._written_at is None else f"the feature of step {self._written_at}"
            raise CacheEmptyError(
                f"step {step} reuses the feature of refresh step {need}, but the cache holds {held}; "
                "run the sampler's steps in order from step 0"
            )
        if self._feature.shape[0] != batch:
            raise CacheEmptyError(
                f"cached feature has batch {self._feature.shape[0]} but step {step} got batch {batch}; "
                "the batch must stay the same across one sampling run"
            )
        return self._feature

    def clear(self) -> None:
        self._feature, self._written_at = None, None

    def extra_repr(self) -> str:
        return f"point={self.point!r}, refreshes={sum(self.mask)}/{len(self.mask)}"
