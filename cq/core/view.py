"""`CacheView`: the explicit slot through which a cq UNet reads and writes cached features.

A cq UNet takes ``forward(x, t, cond=None, *, cache=None)``. With ``cache=None`` it is numerically the original
model. Otherwise the view says what this one call does (gpt-fast's explicit ``kv_cache`` slot, not hooks):

* ``CacheView.full(record=("up.1.block.2",))`` runs the whole network and stores the feature *entering* each
  recorded point into ``view.features[point]``;
* ``CacheView.shallow("up.1.block.2", feature)`` runs only the head (the encoder blocks whose skips the tail
  needs) and the tail (the decoder blocks from the point on), with ``feature`` replacing the deep part
  (DeepCache, Ma et al. 2024, Sec. 3.2).

The view is created per call by whoever owns the time (the cacher); the UNet keeps nothing between calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import Tensor

from ..errors import CacheEmptyError


__all__ = ["CacheView"]


@dataclass(eq=False)
class CacheView:
    """What one UNet call does with cached features.

    Args:
        read: point whose cached feature replaces the deep path (a shallow call), or None for a full call.
        record: points whose features a full call stores into ``features``.
        features: point name -> feature tensor; the input of a shallow call, the output of a full one.
    """

    read: str | None = None
    record: frozenset[str] = frozenset()
    features: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def full(cls, record: Iterable[str] = ()) -> CacheView:
        return cls(read=None, record=frozenset(record))

    @classmethod
    def shallow(cls, point: str, feature: Tensor) -> CacheView:
        return cls(read=point, features={point: feature})

    @property
    def is_shallow(self) -> bool:
        return self.read is not None

    def cached(self) -> Tensor:
        """The feature a shallow call reads; raises `CacheEmptyError` if it was never stored."""
        feature = self.features.get(self.read) if self.read is not None else None
        if feature is None:
            raise CacheEmptyError(
                f"shallow forward at cache point {self.read!r} but no feature is stored for it; "
                "run a full forward with CacheView.full(record=[point]) first"
            )
        return feature

    def store(self, point: str, h: Tensor) -> None:
        if point in self.record:
            self.features[point] = h
