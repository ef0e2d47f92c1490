"""The sampling step as scoped context: set by `CompressedUNet.forward(..., step=i)`, read by per-step modules.

A `contextvars.ContextVar`, restored in ``finally`` (k-diffusion ``flags.checkpointing`` style). Nothing counts
calls: outside a scope `current_step` raises `StepNotSetError`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from .errors import StepNotSetError


__all__ = ["step_scope", "current_step"]

_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar("cq_step", default=None)


@contextlib.contextmanager
def step_scope(step: int) -> Iterator[int]:
    """Run the enclosed model call as sampling step ``step``."""
    token = _STEP.set(int(step))
    try:
        yield int(step)
    finally:
        _STEP.reset(token)


def current_step() -> int:
    """The step of the enclosing `step_scope`; raises `StepNotSetError` outside one."""
    step = _STEP.get()
    if step is None:
        raise StepNotSetError(
            "no sampling step is set: per-step modules must run inside CompressedUNet.forward(x, t, cond, step=i) "
            "or an explicit `with cq.step.step_scope(i):`"
        )
    return step
