"""`Cacher`: a caching strategy (which point, which schedule) and `FeatureCache`, its run-time state.

The strategy is a frozen value (fitting returns a new one); the cached tensor lives in a `FeatureCache` owned
by the `CompressedUNet`, written at refresh steps and read at the others. Reading checks that the stored
feature is the one the schedule says this step reuses, so out-of-order or mismatched calls fail loudly instead
of silently reusing a stale tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ..errors import CacheEmptyError
from .schedule import check_mask
from .view import CacheView


if TYPE_CHECKING:
    from ..trace import Trace

__all__ = ["Cacher", "FeatureCache"]


class Cacher(ABC):
    """Base class of caching strategies (register subclasses with ``@CACHERS.register(name)``)."""

    VERSION: ClassVar[int] = 1

    @abstractmethod
    def points(self, unet: nn.Module) -> tuple[str, ...]:
        """Cache points whose features a trace must record for `fit`."""

    @abstractmethod
    def fit(self, unet: nn.Module, trace: Trace | None) -> Cacher:
        """Return a cacher whose schedule is fitted (data-free schedules accept ``trace=None``)."""

    @abstractmethod
    def build(self, unet: nn.Module, num_steps: int) -> FeatureCache:
        """Run-time cache for sampling with ``num_steps`` steps."""


class FeatureCache:
    """The cached feature of one point and the refresh mask deciding, per step, full vs shallow forward.

    Args:
        point: the cache point (see ``unet.cache_points()``).
        mask: ``mask[i]`` is True when step i refreshes.
        transform: optional ``fn(feature, step) -> feature`` applied before a shallow call (DEC cache correction).
    """

    def __init__(self, point: str, mask: tuple[bool, ...], transform: Any = None):
        self.point = point
        self.mask = check_mask(tuple(mask), len(mask), f"FeatureCache({point})")
        self.transform = transform
        # source[i]: the refresh step whose feature step i reuses
        self.source = []
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
        """One UNet call at ``step``: full (and store the feature) or shallow (read it)."""
        if self.mask[step]:
            view = CacheView.full(record=[self.point])
            out = unet(x, t, cond, cache=view)
            self._feature, self._written_at = view.features[self.point], step
            return out
        return unet(x, t, cond, cache=CacheView.shallow(self.point, self.read(step, x.shape[0])))

    def read(self, step: int, batch: int) -> Tensor:
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
        return self._feature if self.transform is None else self.transform(self._feature, step)

    def clear(self) -> None:
        self._feature, self._written_at = None, None
