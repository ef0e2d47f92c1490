"""The CacheQuant paper's rows as data, and ``cq reproduce ROW``: fit -> sample -> eval -> measured vs paper.

Each `PaperRow` holds the settings of one configuration of CacheQuant (Liu et al., CVPR 2025) as its released
code runs it (``/work/shared/reference/algorithms.md`` §1.3, §4.3, §7; ``ecosystem.md`` §A3): model, sampler,
steps, eta, guidance, cache interval, schedule, bits, calibration trajectories and sample count, plus the paper's
numbers. The paper's tables were not retrievable when these rows were written: a number is filled in only where
a source states it (``PaperNumbers.source``), every other one is None and printed as "not known" -- never guessed.

``cq reproduce ROW`` runs the existing commands in order, each resumable (a finished step's file is reused):
``cq fit`` (calibration seeds 10000..), ``cq sample`` (seeds 0.., written as a uint8 ``.npz``), `cq.metrics.
fidelity.measure` on those samples (digits FID for the demo, Inception FID / IS / precision-recall against
``--ref``, CLIP score for Stable Diffusion), and ``cq report --eval`` for the MAC speedup and the per-sample PSNR
against full precision on held-out seeds (30000..).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError
from .args import add_num_samples, example


__all__ = ["Commands", "PaperNumbers", "PaperRow", "ROWS", "RunPlan", "row_named", "plan", "run_row", "list_rows"]

METRIC_KINDS = ("digits", "inception", "clip")
CONDITION_KINDS = (None, "imagenet-classes", "prompts")
CALIBRATION_SEED, SAMPLE_SEED, HELD_OUT_SEED = 10_000, 0, 30_000


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
        schedule="uniform",
        steps=100,
        spacing="quad",
        interval=10,
        calibration=512,
        num_samples=50_000,
        metric="inception",
        note="CacheQuant's CIFAR script: uniform schedule (dps_steps=False), 512 calibration trajectories",
    ),
    PaperRow(
        name="lsun-church",
        title="LDM-8 LSUN-Church 256, DDIM 100, N=2, W8A8",
        preset="ldm-church",
        schedule="uniform",
        steps=100,
        interval=2,
        calibration=512,
        num_samples=50_000,
        metric="inception",
        note="CacheQuant's church script: uniform schedule, 512 calibration trajectories",
    ),
    PaperRow(
        name="lsun-bedroom",
        title="LDM-4 LSUN-Bedroom 256, DDIM 100, N=2, W8A8",
        preset="ldm-bedroom",
        schedule="uniform",
        steps=100,
        interval=2,
        calibration=256,
        num_samples=50_000,
        metric="inception",
        note="CacheQuant's bedroom script: uniform schedule, 256 calibration trajectories",
    ),
    PaperRow(
        name="imagenet-n5",
        title="LDM-4 ImageNet 256 (cin256-v2), DDIM 250, scale 1.5, N=5, W8A8, DPS + DEC",
        preset="ldm-cin256-v2",
        steps=250,
        guidance=1.5,
        interval=5,
        calibration=64,
        num_samples=50_000,
        metric="inception",
        conditions="imagenet-classes",
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
        preset="ldm-cin256-v2",
        recipe="naive",
        steps=250,
        guidance=1.5,
        interval=20,
        calibration=64,
        num_samples=50_000,
        metric="inception",
        conditions="imagenet-classes",
        paper=PaperNumbers(fid=15.36, source=_PAPER_SOURCE),
    ),
    PaperRow(
        name="imagenet-n20-dps",
        title=f"{_ABLATION}: + DPS schedule",
        preset="ldm-cin256-v2",
        recipe="naive",
        schedule="dps",
        steps=250,
        guidance=1.5,
        interval=20,
        calibration=64,
        num_samples=50_000,
        metric="inception",
        conditions="imagenet-classes",
        paper=PaperNumbers(fid=8.47, source=_PAPER_SOURCE),
    ),
    PaperRow(
        name="imagenet-n20-dec",
        title=f"{_ABLATION}: + DEC (full CacheQuant)",
        preset="ldm-cin256-v2",
        steps=250,
        guidance=1.5,
        interval=20,
        calibration=64,
        num_samples=50_000,
        metric="inception",
        conditions="imagenet-classes",
        paper=PaperNumbers(fid=7.21, source=_PAPER_SOURCE),
    ),
)


def row_named(name: str) -> PaperRow:
    for row in ROWS:
        if row.name == name:
            return row
    raise ConfigError(f"no paper row {name!r}; known rows: {', '.join(r.name for r in ROWS)} (cq reproduce --list)")


def _known(value: float | None, fmt: str = "{:.2f}") -> str:
    return "not known" if value is None else fmt.format(value)


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


LIST_HEADERS = ["row", "preset", "sampler", "eta", "guidance", "N", "recipe", "bits", "calib", "samples", "metric"]
LIST_HEADERS = [*LIST_HEADERS, "paper"]


# ----------------------------------------------------------------------------------------------------------------
# running a row


class Commands(Protocol):
    """How `run_row` runs ``cq`` sub-commands in-process (the CLI passes its own; their `CqError`s propagate)."""

    def run(self, argv: list[str]) -> int: ...

    def report(self, argv: list[str]) -> Any:
        """The `cq.report.Report` of ``cq report`` with ``argv`` (its figures go into the table)."""


@dataclass(frozen=True)
class RunPlan:
    """The ``cq`` command lines of one row's run under ``out`` (``fit``, ``sample``, ``report``)."""

    fit: list[str]
    sample: list[str]
    report: list[str]
    model: Path
    samples: Path


def plan(
    row: PaperRow,
    out: Path,
    *,
    num: int,
    calibration: int,
    psnr_samples: int,
    weights: str | None = None,
    conditions: list[str] = (),
    device: str = "cpu",
    batch_size: int | None = None,
) -> RunPlan:
    """The command lines `run_row` runs (also what the tests parse for every row)."""
    model, samples = out / "model.cq", out / "samples"
    weights_args = ["--weights", weights] if weights else []
    device_args = ["--device", device] + (["--batch-size", str(batch_size)] if batch_size else [])
    guidance = ["--guidance", f"{row.guidance:g}"] if row.guidance is not None else []
    fit = ["fit", "--model", row.preset, "--recipe", row.recipe, "--interval", str(row.interval)]
    fit += ["--steps", str(row.steps), "--sampler", row.sampler, "--samples", str(calibration)]
    fit += ["--seed", str(CALIBRATION_SEED), "-o", str(model)]
    fit += ["--bits", row.bits] if row.recipe != "deepcache" else []
    fit += ["--schedule", row.schedule] if row.schedule else []
    fit += ["--spacing", row.spacing] if row.spacing else []
    fit += weights_args + list(conditions) + guidance + device_args
    # a resumable folder of npz shards (cq.sampling.shards): a killed 50k run continues where it stopped
    sample = ["sample", str(model), "-n", str(num), "--seed", str(SAMPLE_SEED), "--out", str(samples)]
    sample += (["--model", row.preset, *weights_args] if weights else []) + list(conditions) + device_args
    report = ["report", str(model), "--eval", str(psnr_samples), "--eval-seed", str(HELD_OUT_SEED), "--samples", "4"]
    report += ["--model", row.preset, *weights_args] + list(conditions) + device_args
    return RunPlan(fit=fit, sample=sample, report=report, model=model, samples=samples)


def _conditions(row: PaperRow, out: Path, num: int, calibration: int, prompts: str | None) -> list[str]:
    if row.conditions == "imagenet-classes":
        labels = out / "labels.txt"
        from ..io import atomic_path

        with atomic_path(labels) as tmp:  # uniform over the 1000 classes: 50 each at 50k samples
            Path(tmp).write_text("\n".join(str(i % 1000) for i in range(max(num, calibration))) + "\n")
        return ["--class-labels", str(labels)]
    if row.conditions == "prompts":
        if prompts is None:
            raise ConfigError(f"row {row.name} samples from prompts: pass --prompts FILE (one prompt per line)")
        return ["--prompts", prompts]
    return []


def _claim_folder(out: Path, settings: dict) -> None:
    """Record the run's settings in ``out/run.json``; refuse a folder that holds a run with other settings (its
    model and samples would be reused)."""
    import json

    from ..io import atomic_path

    record = out / "run.json"
    if record.exists():
        try:
            previous = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != settings:
            raise ConfigError(
                f"{out} holds a run with other settings ({record}: {previous}); pass another --out or delete it"
            )
        return
    with atomic_path(record) as tmp:
        Path(tmp).write_text(json.dumps(settings, indent=1))


def run_row(
    row: PaperRow,
    *,
    out: str | Path,
    weights: str | None = None,
    num: int | None = None,
    calibration: int | None = None,
    psnr_samples: int = 64,
    ref: str | None = None,
    inception_weights: str | None = None,
    clip_weights: str | None = None,
    clip_arch: str = "ViT-L-14",
    prompts: str | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    commands: Commands,
) -> list[list[str]]:
    """Fit, sample, evaluate ``row`` under ``out`` (the ``cq`` sub-commands through ``commands``); returns the
    ``[quantity, measured, paper]`` table rows.

    ``num`` / ``calibration`` override the row's sample and calibration counts (fewer: a quick check, not the
    paper's setting -- the table says so). Finished steps (``model.cq``, the shards under ``samples/``) are reused when
    ``out/run.json`` records the same settings; a folder of another run is refused.
    """
    from ..metrics.clip_score import ClipScorer
    from ..metrics.extractors import DigitsExtractor, InceptionExtractor
    from ..metrics.fidelity import measure
    from ..metrics.image_set import read_image_set

    num = num or row.num_samples
    if num is None:
        raise ConfigError(f"row {row.name}: the paper's sample count is not known; pass --num-samples N")
    calibration = calibration or row.calibration
    if weights is None and not row.embedded:
        raise ConfigError(f"row {row.name} needs the {row.preset} checkpoint: pass --weights PATH")
    if row.metric == "inception" and ref is None:
        raise ConfigError(
            f"row {row.name} measures FID against real images: pass --ref REF.npz (cq eval --make-ref) or a folder "
            "of real images"
        )
    if row.metric == "clip" and clip_weights is None:
        raise ConfigError(f"row {row.name} measures the CLIP score: pass --clip-weights PATH (and --clip-arch)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.asdict(row) | {"num": num, "calibration": calibration, "weights": weights}
    settings |= {"prompts": prompts}
    _claim_folder(out, settings)
    conditions = _conditions(row, out, num, calibration, prompts)
    planned = plan(
        row,
        out,
        num=num,
        calibration=calibration,
        psnr_samples=psnr_samples,
        weights=weights,
        conditions=conditions,
        device=device,
        batch_size=batch_size,
    )
    if planned.model.exists():
        print(f"[1/4] fit: reusing {planned.model}")
    else:
        print(f"[1/4] fit: {row.title}, {calibration} calibration trajectories")
        commands.run(planned.fit)
    print(f"[2/4] sample: {num} samples, seeds {SAMPLE_SEED}..{SAMPLE_SEED + num - 1} (finished shards are kept)")
    commands.run(planned.sample)

    print(f"[3/4] eval: {row.metric} metrics of {planned.samples}")
    images = read_image_set(planned.samples)
    clip, extractor, reference = None, None, None
    if row.metric == "digits":
        extractor, metrics = DigitsExtractor.embedded(), ["fid", "is"]
    elif row.metric == "inception":
        extractor, metrics = InceptionExtractor.load(inception_weights, device=device), ["fid", "is"]
    else:
        metrics = ["clip"]
        clip = ClipScorer.from_open_clip(clip_arch, clip_weights, device=device)
    if extractor is not None:
        from .eval import read_reference

        reference = read_reference(ref, extractor, batch_size=64, keep_features=10_000)
        if row.metric == "inception" and reference.features is not None:
            metrics.append("pr")
        if row.metric == "inception" and reference.spatial is not None:
            metrics.append("sfid")
    fidelity = measure(images, extractor, reference, metrics=metrics, clip=clip)

    print(f"[4/4] report: MAC speedup and per-sample PSNR on {psnr_samples} held-out seeds")
    rep = commands.report(planned.report)
    return _table(row, fidelity, rep, num, calibration, psnr_samples)


def _table(row: PaperRow, fid, rep, num: int, calibration: int, psnr_samples: int) -> list[list[str]]:
    p = row.paper
    fid_name = "digits FID (vs real digits)" if row.metric == "digits" else "FID"
    rows = [["MAC speedup (caching; cq's count)", f"{rep.mac_speedup:.2f}x", _known(p.speedup, "{:.2f}x")]]
    if fid.fid is not None:
        rows.append([fid_name, f"{fid.fid:.3f}", _known(p.fid)])
    if row.metric == "inception":
        measured = f"{fid.sfid:.3f}" if fid.sfid is not None else "not measured (the reference has no mu_s / sigma_s)"
        rows.append(["sFID", measured, _known(p.sfid)])
    if fid.inception_score is not None:
        name = "IS analogue (digits classes)" if row.metric == "digits" else "IS"
        rows.append([name, f"{fid.inception_score:.2f} +- {fid.inception_score_std:.2f}", _known(p.inception_score)])
    if fid.precision is not None:
        rows += [["precision", f"{fid.precision:.3f}", "not known"], ["recall", f"{fid.recall:.3f}", "not known"]]
    if fid.clip_score is not None:
        rows.append(["CLIP score mean (worst sample)", f"{fid.clip_score:.2f} ({fid.clip_score_min:.2f})", "-"])
        rows.append(["CLIP change vs full precision", "not measured", _known(p.clip_delta, "{:+.2f}")])
    ev = rep.evaluation
    if ev is not None:
        rows.append([f"PSNR vs full precision, mean ({psnr_samples} held-out)", f"{ev.mean_db:.2f} dB", "-"])
        rows.append(["PSNR vs full precision, worst sample", f"{ev.min_db:.2f} dB", "-"])
    if num != row.num_samples or calibration != row.calibration:
        rows.append(
            ["settings", f"{num} samples, {calibration} calibration", f"{row.num_samples} / {row.calibration}"]
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# cq reproduce


def run_reproduce(args: argparse.Namespace, commands: Commands) -> int:
    """``cq reproduce`` (registered by `add_reproduce_parser`; the CLI passes ``commands``)."""
    from ..report.summary import print_table

    if args.list:
        if args.row is not None:
            raise ConfigError("cq reproduce --list lists the rows; run one with cq reproduce ROW (without --list)")
        print_table(LIST_HEADERS, list_rows(), title="CacheQuant paper rows (cq reproduce ROW)")
        for r in ROWS:
            print(f"- {r.name}: {r.title}. Paper numbers: {r.paper.source}." + (f" {r.note}." if r.note else ""))
        return 0
    if args.row is None:
        raise ConfigError("cq reproduce needs a ROW (see cq reproduce --list)")
    row = row_named(args.row)
    out = args.out or f"reproduce-{row.name}"
    table = run_row(
        row,
        out=out,
        weights=args.weights,
        num=args.num,
        calibration=args.calib,
        psnr_samples=args.psnr_samples or min(args.num or row.num_samples or 256, 256),
        ref=args.ref,
        inception_weights=args.inception_weights,
        clip_weights=args.clip_weights,
        clip_arch=args.clip_arch,
        prompts=args.prompts,
        device=args.device,
        batch_size=args.batch_size,
        commands=commands,
    )
    print_table(["quantity", "measured", "paper"], table, title=f"{row.name}: {row.title}")
    print(f"paper numbers: {row.paper.source}")
    return 0


def add_reproduce_parser(sub, positive) -> argparse.ArgumentParser:
    """Register ``cq reproduce``'s arguments on the subparsers ``sub``; the CLI sets the handler (it calls
    `run_reproduce` with its own `Commands`)."""
    rp = sub.add_parser(
        "reproduce",
        help="the CacheQuant paper's rows: --list shows them with their settings; ROW runs fit -> sample -> eval",
        **example("cq reproduce --list", "cq reproduce demo --out reproduce-demo"),
    )
    rp.add_argument("row", nargs="?", help="a row name from --list")
    rp.add_argument("--list", action="store_true", help="list the rows, their settings and the paper's numbers")
    rp.add_argument("--weights", default=None, help="checkpoint of the row's preset (not needed for demo)")
    add_num_samples(
        rp, dest="num", former="--num", type=positive, default=None, help="samples (default: the paper's count)"
    )
    rp.add_argument("--calib", type=positive, default=None, help="calibration trajectories (default: the paper's)")
    rp.add_argument(
        "--psnr-samples",
        type=positive,
        default=None,
        help="held-out samples of the PSNR vs full precision (default: the sample count, at most 256)",
    )
    rp.add_argument("--out", default=None, help="working folder (default reproduce-ROW); finished steps are reused")
    rp.add_argument("--ref", default=None, help="FID reference: statistics .npz (cq eval --make-ref) or real images")
    rp.add_argument("--inception-weights", default=None, metavar="PATH", help="as in cq eval")
    rp.add_argument("--clip-weights", default=None, metavar="PATH|TAG", help="as in cq eval")
    rp.add_argument("--clip-arch", default="ViT-L-14")
    rp.add_argument("--prompts", default=None, metavar="FILE", help="prompts of text rows, one per line")
    rp.add_argument("--batch-size", type=positive, default=None)
    rp.add_argument("--device", default="cpu")
    return rp
