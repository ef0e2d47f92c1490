"""The sampling step as scoped context: set by `CompressedUNet.forward(..., step=i)`, read by per-step modules.

A `contextvars.ContextVar`, restored in ``finally`` (k-diffusion ``flags.checkpointing`` style). Nothing counts
calls: outside a scope `current_step` raises `StepNotSetError`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

from ..errors import StepNotSetError


__all__ = ["step_scope", "current_step", "current_step_index", "table_step", "step_row"]

_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar("cq_step", default=None)
# the same step as a 0-d int64 tensor: per-step tables indexed with it are one compiled graph for every step
# (`torch.compile` specializes on a Python int and would recompile at each step)
_STEP_INDEX: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("cq_step_index", default=None)


@contextlib.contextmanager
def step_scope(step: int) -> Iterator[int]:
    """Run the enclosed model call as sampling step ``step``."""
    token = _STEP.set(int(step))
    index = _STEP_INDEX.set(torch.tensor(int(step)))
    try:
        yield int(step)
    finally:
        _STEP_INDEX.reset(index)
        _STEP.reset(token)


def current_step_index() -> Tensor:
    """`current_step` as a 0-d int64 tensor, for indexing per-step tables inside compiled graphs."""
    index = _STEP_INDEX.get()
    if index is None:
        current_step()  # raises the explanation
    return index


def current_step() -> int:
    """The step of the enclosing `step_scope`; raises `StepNotSetError` outside one."""
    step = _STEP.get()
    if step is None:
        raise StepNotSetError(
            "no sampling step is set: per-step modules must run inside CompressedUNet.forward(x, t, cond, step=i) "
            "or an explicit `with cq.core.step.step_scope(i):`"
        )
    return step


def table_step() -> int | Tensor:
    """The step per-step tables are read with: the int `current_step` in eager mode (plain indexing, ~2 us), the
    tensor `current_step_index` while `torch.compile` traces (one graph for every step)."""
    return current_step_index() if torch.compiler.is_compiling() else current_step()


def step_row(table: Tensor, step: int | Tensor) -> Tensor:
    """Row ``step`` of a per-step table ``[T, ...]``; a tensor step is gathered (``index_select``), never read back
    as a Python number, so a compiled graph serves every step."""
    if isinstance(step, Tensor):
        return table.index_select(0, step.reshape(1).to(table.device)).reshape(table.shape[1:])
    return table[step]
