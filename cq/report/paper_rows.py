"""The CacheQuant paper's rows as data: `PaperRow`s (`ROWS`), each with the paper's numbers (`PaperNumbers`).

Each `PaperRow` holds the settings of one configuration of CacheQuant (Liu et al., CVPR 2025) as its released
code runs it (``/work/shared/reference/algorithms.md`` §1.3, §4.3, §7; ``ecosystem.md`` §A3): model, sampler,
steps, eta, guidance, cache interval, schedule, bits, calibration trajectories and sample count, plus the paper's
numbers. The paper's tables were not retrievable when these rows were written: a number is filled in only where
a source states it (``PaperNumbers.source``), every other one is None and printed as "not known" -- never guessed.
`cq.report.reproduce.run_row` runs a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


__all__ = ["PaperNumbers", "PaperRow", "ROWS", "LIST_HEADERS", "row_named", "list_rows"]

METRIC_KINDS = ("digits", "inception", "clip")
CONDITION_KINDS = (None, "imagenet-classes", "prompts")


@dataclass(frozen=True, kw_only=True)
class PaperNumbers:
    """What the paper reports for a row (None: not known here) and where the numbers come from."""

    speedup: float | None = None
    fid: float | None = None
    sfid: float | None = None
    inception_score: float | None = None
    clip_delta: float | None = None  # CLIP score change against full precision
    source: str = "not retrievable: the paper's tables were not available when this row was written"


@dataclass(frozen=True, kw_only=True)
class PaperRow:
    """One reproducible configuration: what to fit, how to sample, what to measure, what the paper says."""

    name: str
    title: str
    preset: str
    recipe: str = "cachequant"  # a `cq.fit.recipe.PRESET_RECIPES` name
    schedule: str | None = None  # a registered schedule replacing the recipe's (None: the recipe's)
    sampler: str = "ddim"
    steps: int
    spacing: str | None = None  # None: the preset's
    eta: float = 0.0
    guidance: float | None = None  # None: unconditional (or the preset's)
    interval: int
    bits: str = "w8a8"
    calibration: int  # calibration trajectories
    num_samples: int | None  # None: the paper's count is not known; pass --num-samples
    metric: str  # "digits" | "inception" | "clip"
    conditions: str | None = None  # None | "imagenet-classes" (uniform over classes) | "prompts" (--prompts)
    paper: PaperNumbers = PaperNumbers()
    note: str = ""

    def __post_init__(self) -> None:
        from ..fit.recipe import PRESET_RECIPES, parse_bits
        from ..models.presets import PRESETS
        from ..registry import SCHEDULES
        from ..sampling.samplers import SAMPLERS

        where = f"paper row {self.name!r}"
        if self.preset not in PRESETS:
            raise ConfigError(f"{where}: unknown preset {self.preset!r}")
        if self.recipe not in PRESET_RECIPES:
            raise ConfigError(f"{where}: recipe must be one of {sorted(PRESET_RECIPES)}, got {self.recipe!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES.names():
            raise ConfigError(f"{where}: unknown schedule {self.schedule!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"{where}: sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        parse_bits(self.bits)
        for field, value, low in (("steps", self.steps, 1), ("interval", self.interval, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{where}: {field} must be an int >= {low}, got {value!r}")
        if self.interval > self.steps:
            raise ConfigError(f"{where}: interval {self.interval} exceeds the {self.steps} steps")
        if self.calibration < 2 or (self.num_samples is not None and self.num_samples < 2):
            raise ConfigError(f"{where}: calibration and sample counts must be >= 2")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ConfigError(f"{where}: eta must be >= 0, got {self.eta}")
        from ..sampling.noise import ddim_timesteps

        preset = PRESETS[self.preset]
        try:
            ddim_timesteps(preset.noise.num_timesteps, self.steps, self.spacing or preset.sampling.get("spacing"))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        preset_eta = preset.sampling.get("eta", 0.0)
        if self.eta != preset_eta:  # cq fit samples with the preset's eta
            raise ConfigError(f"{where}: eta {self.eta} differs from preset {self.preset}'s {preset_eta}")
        if self.metric not in METRIC_KINDS:
            raise ConfigError(f"{where}: metric must be one of {METRIC_KINDS}, got {self.metric!r}")
        if self.conditions not in CONDITION_KINDS:
            raise ConfigError(f"{where}: conditions must be one of {CONDITION_KINDS}, got {self.conditions!r}")
        if (self.metric == "clip") != (self.conditions == "prompts"):
            raise ConfigError(f"{where}: the CLIP score is measured on prompted samples, and only there")

    @property
    def embedded(self) -> bool:
        """True when the preset's weights ship with cq (no --weights needed)."""
        from ..models.presets import PRESETS

        return PRESETS[self.preset].embedded is not None


_ABLATION = "ablation on LDM-4 ImageNet, 250 steps, N=20, W8A8"
_PAPER_SOURCE = "CacheQuant paper, as quoted to cq (not cross-checked against the paper's tables)"
# the settings rows share: CacheQuant's CIFAR-10 / LSUN scripts (uniform schedule), and LDM-4 ImageNet
_UNIFORM_100 = {"schedule": "uniform", "steps": 100, "num_samples": 50_000, "metric": "inception"}
_IMAGENET = {"preset": "ldm-cin256-v2", "steps": 250, "guidance": 1.5, "calibration": 64, "num_samples": 50_000}
_IMAGENET |= {"metric": "inception", "conditions": "imagenet-classes"}

ROWS: tuple[PaperRow, ...] = (
    PaperRow(
        name="demo",
        title="demo digits DDPM (embedded), DDIM 50, N=5, W8A8, CacheQuant",
        preset="demo",
        steps=50,
        interval=5,
        calibration=32,
        num_samples=256,
        metric="digits",
        paper=PaperNumbers(source="no paper row: cq's own demo model (digits FID against the real digits)"),
    ),
    PaperRow(
        name="cifar10",
        title="DDPM CIFAR-10 32x32, DDIM 100 quad, N=10, W8A8",
        preset="cifar10",
        **_UNIFORM_100,
        spacing="quad",
        interval=10,
        calibration=512,
        note="CacheQuant's CIFAR script: uniform schedule (dps_steps=False), 512 calibration trajectories",
    ),
    PaperRow(
        name="lsun-church",
        title="LDM-8 LSUN-Church 256, DDIM 100, N=2, W8A8",
        preset="ldm-church",
        **_UNIFORM_100,
        interval=2,
        calibration=512,
        note="CacheQuant's church script: uniform schedule, 512 calibration trajectories",
    ),
    PaperRow(
        name="lsun-bedroom",
        title="LDM-4 LSUN-Bedroom 256, DDIM 100, N=2, W8A8",
        preset="ldm-bedroom",
        **_UNIFORM_100,
        interval=2,
        calibration=256,
        note="CacheQuant's bedroom script: uniform schedule, 256 calibration trajectories",
    ),
    PaperRow(
        name="imagenet-n5",
        title="LDM-4 ImageNet 256 (cin256-v2), DDIM 250, scale 1.5, N=5, W8A8, DPS + DEC",
        **_IMAGENET,
        interval=5,
        paper=PaperNumbers(speedup=7.87, fid=4.03, source=_PAPER_SOURCE),
        note="50 samples per class; the paper's speedup definition is not in the reference notes",
    ),
    PaperRow(
        name="sd-n5",
        title="Stable Diffusion v1.4 512, PLMS 50, scale 7.5, N=5, W8A8, DPS + DEC",
        preset="sd-v1",
        sampler="plms",
        steps=50,
        guidance=7.5,
        interval=5,
        calibration=256,
        num_samples=None,
        metric="clip",
        conditions="prompts",
        paper=PaperNumbers(speedup=5.18, clip_delta=-0.02, source="the paper's abstract (MS-COCO)"),
        note="prompts: --prompts FILE (the paper: MS-COCO captions; its sample count is not known here)",
    ),
    PaperRow(
        name="imagenet-n20-w8a8",
        title=f"{_ABLATION}: DeepCache (uniform) + W8A8, no DPS, no DEC",
        **_IMAGENET,
        recipe="naive",
        interval=20,
        paper=PaperNumbers(fid=15.36, source=_PAPER_SOURCE),
    ),
    PaperRow(
        name="imagenet-n20-dps",
        title=f"{_ABLATION}: + DPS schedule",
        **_IMAGENET,
        recipe="naive",
        schedule="dps",
        interval=20,
        paper=PaperNumbers(fid=8.47, source=_PAPER_SOURCE),
    ),
    PaperRow(
        name="imagenet-n20-dec",
        title=f"{_ABLATION}: + DEC (full CacheQuant)",
        **_IMAGENET,
        interval=20,
        paper=PaperNumbers(fid=7.21, source=_PAPER_SOURCE),
    ),
)


def row_named(name: str) -> PaperRow:
    for row in ROWS:
        if row.name == name:
            return row
    raise ConfigError(f"no paper row {name!r}; known rows: {', '.join(r.name for r in ROWS)} (cq reproduce --list)")


LIST_HEADERS = ["row", "preset", "sampler", "eta", "guidance", "N", "recipe", "bits", "calib", "samples", "metric"]
LIST_HEADERS = [*LIST_HEADERS, "paper"]


def list_rows() -> list[list[str]]:
    """``cq reproduce --list``'s table rows."""
    from ..models.presets import PRESETS

    out = []
    for r in ROWS:
        spacing = r.spacing or PRESETS[r.preset].sampling.get("spacing")
        schedule = r.schedule or ("dps" if r.recipe == "cachequant" else "uniform")
        p = r.paper
        paper = ", ".join(
            f"{k} {v}"
            for k, v in (("speedup", p.speedup), ("FID", p.fid), ("sFID", p.sfid), ("IS", p.inception_score))
            if v is not None
        )
        if p.clip_delta is not None:
            paper += (", " if paper else "") + f"CLIP {p.clip_delta:+.2f}"
        out.append(
            [
                r.name,
                r.preset,
                f"{r.sampler} {r.steps}" + (f" {spacing}" if spacing else ""),
                f"{r.eta:g}",
                "-" if r.guidance is None else f"{r.guidance:g}",
                str(r.interval),
                f"{r.recipe}/{schedule}",
                r.bits,
                str(r.calibration),
                "--num" if r.num_samples is None else str(r.num_samples),
                r.metric,
                paper or "not known",
            ]
        )
    return out
