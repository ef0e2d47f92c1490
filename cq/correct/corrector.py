"""`Corrector`: fits corrections on a `CompressedUNet` under construction (`Recipe.fit` owns the model)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from torch import nn


if TYPE_CHECKING:
    from ..compressed import CompressedUNet
    from ..trace import Trace

__all__ = ["Corrector"]


class Corrector(ABC):
    """Base class of error correctors (register subclasses with ``@CORRECTORS.register(name)``).

    `fit` measures the error of ``model`` against the full-precision ``reference`` on ``trace`` and attaches
    `ChannelAffine` corrections to ``model`` (the one `Recipe.fit` just built; nothing else is modified).
    """

    VERSION: ClassVar[int] = 1

    @abstractmethod
    def attach(self, model: CompressedUNet) -> None:
        """Install identity corrections of the right shapes (`fit` fills them; loading a saved model too)."""

    @abstractmethod
    def fit(self, model: CompressedUNet, reference: nn.Module, trace: Trace, *, progress: bool = False) -> None:
        """Fit and attach this corrector's corrections to ``model``."""
