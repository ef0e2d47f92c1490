"""`Corrector`: fits corrections on a `CompressedUNet` under construction (`Recipe.fit` owns the model).

A corrector declares *when* it is fitted (`Stage`) and what the recipe must hold for it (``needs_cacher``,
``needs_quantizer``); `Recipe` validates and orders correctors by these declarations only, never by class, so a
user's corrector takes part exactly like the built-in ones.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from torch import nn


if TYPE_CHECKING:
    from ..calib.trace import Trace
    from ..compressed import CompressedUNet

__all__ = ["Corrector", "Stage"]


class Stage(enum.Enum):
    """When `Recipe.fit` fits a corrector (CacheQuant's pipeline order)."""

    #: on the full-precision cached model, before quantization; the quantizer then calibrates with this
    #: correction active (CacheQuant's "aftercacheadd" calibration). The DEC cache correction.
    BEFORE_QUANTIZATION = "before_quantization"
    #: on the quantized cached model, after calibration. The DEC quantization correction.
    AFTER_QUANTIZATION = "after_quantization"


class Corrector(ABC):
    """Base class of error correctors (register subclasses with ``@CORRECTORS.register(name)``).

    `fit` measures the error of ``model`` against the full-precision ``reference`` on ``trace`` and installs its
    corrections in ``model`` (the one `Recipe.fit` is building; nothing else is modified).

    Declarations (class attributes; override in subclasses):
        stage: when `Recipe.fit` calls `fit` (`Stage`).
        needs_cacher: the recipe must cache (the correction acts on the cached feature or its consumers).
        needs_quantizer: the recipe must quantize (the correction removes quantization error).
        slot: where the correction is installed (e.g. ``"cache.correction"``); two correctors of one recipe may
            not share a slot (the second would overwrite the first). Empty: no exclusive slot.
    """

    registry_kind: ClassVar[str] = "corrector"  # the registry its subclasses register in
    VERSION: ClassVar[int] = 1
    stage: ClassVar[Stage] = Stage.AFTER_QUANTIZATION
    needs_cacher: ClassVar[bool] = True
    needs_quantizer: ClassVar[bool] = False
    slot: ClassVar[str] = ""

    @abstractmethod
    def attach(self, model: CompressedUNet) -> None:
        """Install identity corrections of the right shapes (`fit` fills them; loading a saved model too)."""

    @abstractmethod
    def fit(self, model: CompressedUNet, reference: nn.Module, trace: Trace, *, progress: bool = False) -> None:
        """Fit this corrector's corrections and install them in ``model``."""
