"""DeepCache's non-uniform schedules: refreshes dense near one end (LDM) or around a centre step (SD/DDPM).

LDM ``sample_from_quad`` (DeepCache ``ldm/models/diffusion/ddpm.py``): with ``n = ceil(T/N)``,
``steps = unique(int(linspace(0, T**(1/p), n+1) ** p))[:-1]`` -- dense at the start (high noise).

SD ``sample_from_quad_center``: the original evaluates ``linspace((-c)**(1/p), (T-c)**(1/p), n+1) ** p`` in Python,
where ``(-c)**(1/p)`` is a *complex* number and numpy's int cast silently drops the imaginary part, so the
negative side is scaled by ``cos(pi*p)`` (about -0.31 for p=1.4) by accident. cq implements the intended real
math, a signed power around the centre: ``c + sign(u)*|u|**p`` for ``u`` evenly spaced in
``[-c**(1/p), (T-c)**(1/p)]``. Like the original, the power is lowered by 0.02 until ``n`` distinct steps come out
(or it reaches 1). Either variant may yield fewer than ``n`` refreshes when ``unique`` merges steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..registry import SCHEDULES
from .schedule import Schedule, check_mask, positive_int


__all__ = ["Power"]


@SCHEDULES.register("power")
@dataclass(frozen=True, kw_only=True)
class Power(Schedule):
    """Power-law refresh steps (DeepCache ``--nonuniform --pow``), optionally centred (SD ``center``).

    Args:
        interval: N; about ``ceil(T/N)`` refreshes.
        power: p > 0; larger packs refreshes tighter near step 0 (or near ``center``).
        center: None for the LDM form; a step index for the centred SD/DDPM form (DeepCache SD: 15 of 50).
    """

    interval: int
    power: float = 1.5
    center: int | None = None

    def __post_init__(self) -> None:
        positive_int("Power", "interval", self.interval)
        if not (isinstance(self.power, int | float) and self.power > 0):
            raise ConfigError(f"Power.power must be a number > 0, got {self.power!r}")
        if self.center is not None:
            positive_int("Power", "center", self.center, minimum=0)

    def refresh_mask(self, num_steps: int) -> tuple[bool, ...]:
        n = math.ceil(num_steps / self.interval)
        if n >= num_steps:  # as many refreshes as steps: every step (int truncation would merge early ones)
            return check_mask((True,) * num_steps, num_steps, self)
        steps = self._centered(num_steps, n) if self.center is not None else self._front(num_steps, n)
        hits = {0} | {s for s in steps if 0 <= s < num_steps}
        return check_mask(tuple(i in hits for i in range(num_steps)), num_steps, self)

    def _front(self, T: int, n: int) -> list[int]:
        grid = np.linspace(0, T ** (1 / self.power), n + 1) ** self.power
        return sorted(set(grid.astype(np.int64).tolist()))[:-1] if n else []

    def _centered(self, T: int, n: int) -> list[int]:
        c = min(self.center, T)
        p = float(self.power)
        while True:
            u = np.linspace(-(c ** (1 / p)), (T - c) ** (1 / p), n + 1)
            v = np.sign(u) * np.abs(u) ** p + c
            steps = [0] + sorted(set(np.clip(v, 0, T).astype(np.int64).tolist()))[1:-1]
            if len(steps) >= n or p <= 1:
                return steps
            p -= 0.02
