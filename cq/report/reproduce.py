"""`run_row`: one paper row (`cq.report.paper_rows`) end to end, fit -> sample -> measure -> report, and its table
of measured against paper.

Each step calls the library function of the ``cq`` command it stands for, and is resumable (a finished step's
file is reused): `FitPlan.fit` on `Calibration` trajectories of seeds 10000.. (``cq fit``), `sample_folder` of
seeds 0.. into uint8 npz shards (``cq sample --out``), `cq.metrics.fidelity.measure` on those samples (digits FID
for the demo, Inception FID / IS / precision-recall against a reference, CLIP score for Stable Diffusion; ``cq
eval``), and `build_report` for the MAC speedup and the per-sample PSNR against full precision on held-out seeds
30000.. (``cq report --eval``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..errors import ConfigError
from .paper_rows import PaperRow


__all__ = ["CALIBRATION_SEED", "SAMPLE_SEED", "HELD_OUT_SEED", "fit_plan_of", "run_row"]

CALIBRATION_SEED, SAMPLE_SEED, HELD_OUT_SEED = 10_000, 0, 30_000


def fit_plan_of(row: PaperRow):
    """The `cq.fit.plan.FitPlan` of ``row``: its recipe, interval, bits and schedule."""
    from ..fit.plan import fit_plan

    return fit_plan(row.recipe, interval=row.interval, bits=row.bits, schedule=row.schedule)


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
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
) -> list[list[str]]:
    """Fit, sample, evaluate ``row`` under ``out``; returns the ``[quantity, measured, paper]`` table rows.

    ``num`` / ``calibration`` override the row's sample and calibration counts (fewer: a quick check, not the
    paper's setting -- the table says so). Finished steps (``model.cq``, the shards under ``samples/``) are reused when
    ``out/run.json`` records the same settings; a folder of another run is refused.
    """
    from ..artifact import load
    from ..models.base import base_for
    from ..sampling.folder import sample_folder
    from .build import build_report

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
    model_file, samples = out / "model.cq", out / "samples"
    if model_file.exists():
        print(f"[1/4] fit: reusing {model_file}")
    else:
        print(f"[1/4] fit: {row.title}, {calibration} calibration trajectories")
        _fit(row, model_file, weights, conditions, calibration, device, batch_size)
    print(f"[2/4] sample: {num} samples, seeds {SAMPLE_SEED}..{SAMPLE_SEED + num - 1} (finished shards are kept)")
    model = load(model_file)
    base = base_for(model, str(model_file), model=row.preset, weights=weights)
    # sampling and the report condition, batch and run alike
    shared = {"conditions": conditions, "batch_size": batch_size, "device": device, "log": print}
    sample_folder(model, model_file, samples, num=num, seed=SAMPLE_SEED, base=base, **shared)
    print(f"[3/4] eval: {row.metric} metrics of {samples}")
    fidelity = _measure(row, samples, ref, inception_weights, clip_weights, clip_arch, device)
    print(f"[4/4] report: MAC speedup and per-sample PSNR on {psnr_samples} held-out seeds")
    rep = build_report(load(model_file), base, samples=4, eval_samples=psnr_samples, eval_seed=HELD_OUT_SEED, **shared)
    return _table(row, fidelity, rep, num, calibration, psnr_samples)


def _fit(row: PaperRow, path: Path, weights, conditions, calibration: int, device, batch_size) -> None:
    """``cq fit`` of ``row``: its recipe on ``calibration`` trajectories of seeds `CALIBRATION_SEED`.., saved."""
    from ..artifact import save
    from ..calib.calibration import Calibration
    from ..models.base import load_base

    plan = fit_plan_of(row)
    base = load_base(row.preset, weights).to(device)
    run = Calibration.of(
        base,
        steps=row.steps,
        spacing=row.spacing,
        sampler=row.sampler,
        num_samples=calibration,
        seed=CALIBRATION_SEED,
        conditions=conditions,
        guidance=row.guidance,
        batch_size=batch_size,
    )
    print(f"{plan.described}: {run.describe()}, device {device}")
    model, _ = plan.fit(base.unet, run.record(plan.points(base.unet)))
    print(f"wrote {save(model, path)}")


def _measure(row: PaperRow, samples: Path, ref, inception_weights, clip_weights, clip_arch, device):
    """``cq eval``'s metrics of the row's kind on the ``samples`` folder."""
    from ..metrics.clip_score import ClipScorer
    from ..metrics.extractors import DigitsExtractor, InceptionExtractor
    from ..metrics.fidelity import measure
    from ..metrics.image_set import read_image_set
    from ..metrics.reference import read_reference

    images = read_image_set(samples)
    clip, extractor, reference = None, None, None
    if row.metric == "digits":
        extractor, metrics = DigitsExtractor.embedded(), ["fid", "is"]
    elif row.metric == "inception":
        extractor, metrics = InceptionExtractor.load(inception_weights, device=device), ["fid", "is"]
    else:
        metrics = ["clip"]
        clip = ClipScorer.from_open_clip(clip_arch, clip_weights, device=device)
    if extractor is not None:
        reference = read_reference(ref, extractor, batch_size=64, keep_features=10_000, log=print)
        if row.metric == "inception" and reference.features is not None:
            metrics.append("pr")
        if row.metric == "inception" and reference.spatial is not None:
            metrics.append("sfid")
    return measure(images, extractor, reference, metrics=metrics, clip=clip)


def _conditions(row: PaperRow, out: Path, num: int, calibration: int, prompts: str | None):
    """The row's `Conditions`: labels uniform over the 1000 ImageNet classes (written to ``out/labels.txt``: 50
    each at 50k samples), or the prompts file."""
    from ..io import atomic_path
    from ..models.conditioning import Conditions, read_conditions

    if row.conditions == "imagenet-classes":
        labels = out / "labels.txt"
        with atomic_path(labels) as tmp:
            Path(tmp).write_text("\n".join(str(i % 1000) for i in range(max(num, calibration))) + "\n")
        return read_conditions(labels=str(labels))
    if row.conditions == "prompts":
        if prompts is None:
            raise ConfigError(f"row {row.name} samples from prompts: pass --prompts FILE (one prompt per line)")
        return read_conditions(prompt_file=prompts)
    return Conditions()


def _claim_folder(out: Path, settings: dict) -> None:
    """Record the run's settings in ``out/run.json``; refuse a folder that holds a run with other settings (its
    model and samples would be reused)."""
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


def _known(value: float | None, fmt: str = "{:.2f}") -> str:
    return "not known" if value is None else fmt.format(value)


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
