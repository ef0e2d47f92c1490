"""The layer table: one row per layer kind cq quantizes and counts -- its float, fake-quant and integer classes
and its MAC rule. The only list of layer classes in cq.

Read by `Quantizer.prepare` (float -> fake-quant, `FLOAT_TO_FAKE`), `cq.quant.int8.to_int8` (fake-quant ->
integer kernels), `cq.metrics.macs` (the MACs of every class of a row are the same) and `cq.report` (float,
fake-quant and integer layers). Every fake-quant class takes ``(float module, weight spec, activation spec,
num_steps, split=, split_weights=)`` (only `QConv2d` has concat inputs to split; the others ignore it); every
``torch._int_mm`` class has ``refusal(module, device)``: why it cannot take a layer, "" when it can.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
from torch import nn

from ..models.layers import MatMul
from .int_mm import Int8MatMul, IntMMConv1x1, IntMMLinear
from .modules import QConv1d, QConv2d, QLinear, QMatMul
from .onednn import Int8Conv2d, Int8Linear


__all__ = [
    "LayerKind",
    "LAYERS",
    "FLOAT_TO_FAKE",
    "kind_of",
    "float_classes",
    "fake_quant_classes",
    "integer_classes",
    "conv_macs",
    "linear_macs",
    "matmul_macs",
]

#: MACs of one call from the module, its (first) input's shape and its output's shape
MacRule = Callable[[nn.Module, torch.Size, torch.Size], int]


def conv_macs(module: nn.Module, x: torch.Size, y: torch.Size) -> int:
    """Output elements x input channels per group x kernel size."""
    return y.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def linear_macs(module: nn.Module, x: torch.Size, y: torch.Size) -> int:
    """Output elements x input features."""
    return y.numel() * module.in_features


def matmul_macs(module: nn.Module, x: torch.Size, y: torch.Size) -> int:
    """Output elements x inner dimension (the first operand's last)."""
    return y.numel() * x[-1]


@dataclass(frozen=True)
class LayerKind:
    """One layer kind: the classes a layer of it can be, and how its MACs are counted.

    ``op``: the `cq.metrics.MacCount` field its MACs add to. ``weighted``: it has a weight (`MatMul` has none).
    """

    name: str
    float_cls: type[nn.Module]
    fake_cls: type[nn.Module]
    onednn_cls: type[nn.Module] | None  # on oneDNN's u8 x s8 kernels (`cq.quant.onednn`)
    int_mm_cls: type[nn.Module] | None  # on torch._int_mm (`cq.quant.int_mm`)
    op: Literal["conv", "linear", "matmul"]
    macs: MacRule
    weighted: bool = True

    @property
    def integer_classes(self) -> tuple[type[nn.Module], ...]:
        return tuple(c for c in (self.onednn_cls, self.int_mm_cls) if c is not None)

    @property
    def classes(self) -> tuple[type[nn.Module], ...]:
        """Float, fake-quant and integer classes: a layer is one of them at each stage of compression."""
        return (self.float_cls, self.fake_cls, *self.integer_classes)


LAYERS: tuple[LayerKind, ...] = (
    LayerKind("conv2d", nn.Conv2d, QConv2d, Int8Conv2d, IntMMConv1x1, "conv", conv_macs),
    LayerKind("conv1d", nn.Conv1d, QConv1d, None, None, "conv", conv_macs),
    LayerKind("linear", nn.Linear, QLinear, Int8Linear, IntMMLinear, "linear", linear_macs),
    LayerKind("matmul", MatMul, QMatMul, None, Int8MatMul, "matmul", matmul_macs, weighted=False),
)

#: the fake-quant class `Quantizer.prepare` builds for a float class (exact class, not subclasses)
FLOAT_TO_FAKE: Mapping[type[nn.Module], type[nn.Module]] = MappingProxyType(
    {row.float_cls: row.fake_cls for row in LAYERS}
)
_BY_CLASS: Mapping[type[nn.Module], LayerKind] = MappingProxyType({cls: row for row in LAYERS for cls in row.classes})


def kind_of(module: nn.Module) -> LayerKind | None:
    """The row of ``module``'s class (or of its nearest base class in the table); None if it has none."""
    return next((_BY_CLASS[c] for c in type(module).__mro__ if c in _BY_CLASS), None)


def float_classes() -> tuple[type[nn.Module], ...]:
    return tuple(row.float_cls for row in LAYERS)


def fake_quant_classes() -> tuple[type[nn.Module], ...]:
    return tuple(row.fake_cls for row in LAYERS)


def integer_classes() -> tuple[type[nn.Module], ...]:
    return tuple(c for row in LAYERS for c in row.integer_classes)
