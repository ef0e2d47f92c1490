"""`SamplerSettings`: how a fitted model must be sampled.

A fitted model's per-step tables (cache schedule, activation ranges, corrections) were calibrated on one sampler's
trajectory: its kind, step count, timestep spacing, ``eta`` and x0 clipping, which together fix the timestep of
every model call. Sampling it any other way feeds each step inputs its tables never saw and runs at a silently
lower quality (a 10-step DDIM fit sampled with ``plms(steps=9)``: 8 dB). So a `Trace` records the settings it was
sampled with, `Recipe.fit` hands them to the `CompressedUNet`, the artifact stores them, and every sampler compares
its own settings with them before the first model call (`check_sampler`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .noise import ddim_timesteps, dpm_solver_timesteps


__all__ = ["SamplerSettings", "planned_settings"]


@dataclass(frozen=True)
class SamplerSettings:
    """What a sampler run is, as far as a fitted model is concerned.

    Attributes:
        sampler: ``"ddim"``, ``"plms"`` or ``"dpm_solver"`` (the sampler function's name; `cq.diffusers` records
            ``"diffusers:<scheduler class> <config JSON>"`` for a run of a diffusers pipeline's own loop).
        steps: sampler steps (PLMS makes ``steps + 1`` model calls).
        spacing: timestep convention (`cq.sampling.ddim_timesteps`).
        eta: DDIM's noise scale (0 = deterministic).
        clip_x0: whether the predicted x0 is clipped to [-1, 1].
        timesteps: the model timestep of every model call, in call order (call 0 = noisiest).
    """

    sampler: str
    steps: int
    spacing: str
    eta: float
    clip_x0: bool
    timesteps: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        object.__setattr__(self, "eta", float(self.eta))
        object.__setattr__(self, "clip_x0", bool(self.clip_x0))

    @property
    def calls(self) -> int:
        """Model calls of one run (= a fitted model's ``num_steps``)."""
        return len(self.timesteps)

    def calls_at(self, t: int) -> tuple[int, ...]:
        """The model-call indices (``step=`` values) at timestep ``t``: one for DDIM and DPM-Solver, two for the
        second timestep of PLMS, none for a timestep the run never visits. A pure lookup."""
        return tuple(i for i, ti in enumerate(self.timesteps) if ti == t)

    def describe(self) -> str:
        """``sampler(steps=..., spacing=...)`` and every fitted timestep, for error messages."""
        name = self.sampler.split(" ")[0]
        return f"{name}(steps={self.steps}, spacing={self.spacing!r}), timesteps {list(self.timesteps)}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["timesteps"] = list(self.timesteps)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> SamplerSettings:
        """Inverse of `to_dict`; raises ValueError / TypeError on malformed data (the artifact loader turns them
        into `CheckpointFormatError`)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"sampler settings must be an object with keys {sorted(names)}, got {data!r}")
        types = {"sampler": str, "steps": int, "spacing": str, "eta": (int, float), "clip_x0": bool}
        for key, kind in types.items():
            if not isinstance(data[key], kind) or (key != "clip_x0" and isinstance(data[key], bool)):
                raise TypeError(f"sampler settings: {key} has the wrong type ({data[key]!r})")
        timesteps = data["timesteps"]
        if not isinstance(timesteps, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in timesteps
        ):
            raise TypeError("sampler settings: timesteps must be a list of integers")
        return cls(**data)

    def differences(self, other: SamplerSettings) -> list[str]:
        """``"field: fitted X, asked Y"`` for every field that differs."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                if f.name == "timesteps":
                    out.append(f"timesteps: fitted {_short(mine)}, asked {_short(theirs)}")
                else:
                    out.append(f"{f.name}: fitted {mine!r}, asked {theirs!r}")
        return out

    def call_kwargs(self) -> dict[str, Any]:
        """The keyword arguments that reproduce this run: ``sampler(model, x, **settings.call_kwargs())``."""
        kwargs: dict[str, Any] = {"steps": self.steps, "spacing": self.spacing, "eta": self.eta}
        if self.sampler == "ddim":
            kwargs["clip_x0"] = self.clip_x0
        return kwargs


def planned_settings(
    sampler: str, steps: int, num_timesteps: int, *, spacing: str, eta: float = 0.0, clip_x0: bool = False
) -> SamplerSettings:
    """The settings of a ``ddim`` / ``plms`` / ``dpm_solver`` run before it starts: the timestep of every model call
    in call order (DDIM, DPM-Solver: one call per step, noisiest first; PLMS: step 0 calls at t_0 and t_1, then one
    call per step)."""
    if sampler == "dpm_solver":
        calls = dpm_solver_timesteps(num_timesteps, steps, spacing)[::-1]
        return SamplerSettings(sampler, steps, spacing, eta, clip_x0, timesteps=calls)
    seq = ddim_timesteps(num_timesteps, steps, spacing)  # increasing
    if sampler == "ddim":
        calls = seq[::-1]
    elif sampler == "plms":
        calls = [seq[-1], seq[max(steps - 2, 0)], *(seq[steps - 1 - i] for i in range(1, steps))]
    else:
        raise ValueError(f"unknown sampler {sampler!r}")
    return SamplerSettings(sampler, steps, spacing, eta, clip_x0, timesteps=calls)


def _short(timesteps: tuple[int, ...]) -> str:
    if len(timesteps) <= 6:
        return str(list(timesteps))
    return (
        f"[{', '.join(map(str, timesteps[:3]))}, ..., {', '.join(map(str, timesteps[-2:]))}] ({len(timesteps)} calls)"
    )
