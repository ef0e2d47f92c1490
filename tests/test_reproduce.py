"""Paper rows as data (cq.report.paper_rows): every row's settings are valid for cq; ``cq reproduce --list``; the demo
row end to end at tiny sizes (8 DDIM steps instead of 50, 12 samples, 4 calibration trajectories), through the
library's typed calls (cq.report.reproduce), never the argument parser again."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import cq
from cq.cli import build_parser, main, parser
from cq.errors import ConfigError
from cq.models.presets import PRESETS
from cq.report import paper_rows
from cq.report.paper_rows import ROWS, PaperRow, row_named
from cq.report.reproduce import fit_plan_of
from cq.sampling.resolve import sampler_named
from cq.sampling.shards import read_samples


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_every_row_is_valid_for_cq(row):
    preset = PRESETS[row.preset]
    assert row.steps <= preset.noise.num_timesteps
    conditioner = preset.pipeline.conditioner.kind if preset.pipeline and preset.pipeline.conditioner else None
    assert {None: None, "class_embedder": "imagenet-classes", "clip_text": "prompts"}[conditioner] == row.conditions
    assert (row.metric == "digits") == (preset.name == "demo")  # the digits classifier only fits the demo model
    assert row.embedded == (preset.embedded is not None)
    plan = fit_plan_of(row)  # what run_row fits
    recipe = plan.recipe
    assert plan.budget is None and recipe.cacher.schedule.interval == row.interval
    expected = row.schedule or ("dps" if row.recipe == "cachequant" else "uniform")
    assert type(recipe.cacher.schedule).__name__.lower().startswith(expected[:3])
    assert (recipe.quantizer.weight_bits, recipe.quantizer.act_bits) == (8, 8)
    # the row's sampler takes the preset's sampling settings, which the calibration runs with
    sampling = {k: v for k, v in preset.sampling.items() if k != "steps"} | (
        {"spacing": row.spacing} if row.spacing else {}
    )
    fn, kwargs = sampler_named(row.sampler, sampling)
    assert fn.__name__ == row.sampler and set(kwargs) <= set(sampling)
    numbers = [v for k, v in dataclasses.asdict(row.paper).items() if k != "source" and v is not None]
    assert all(math.isfinite(v) for v in numbers)
    assert row.paper.speedup is None or row.paper.speedup > 1
    if numbers:  # a number is there only with the source it comes from
        assert not row.paper.source.startswith("not retrievable")


def test_rows_are_unique_and_the_ablation_is_a_chain():
    assert len({r.name for r in ROWS}) == len(ROWS)
    chain = [row_named(n) for n in ("imagenet-n20-w8a8", "imagenet-n20-dps", "imagenet-n20-dec")]
    settings = {(r.preset, r.steps, r.interval, r.guidance, r.calibration, r.bits) for r in chain}
    assert len(settings) == 1  # only the method changes along the chain
    assert [(r.recipe, r.schedule) for r in chain] == [("naive", None), ("naive", "dps"), ("cachequant", None)]
    with pytest.raises(ConfigError, match="known rows"):
        row_named("imagenet-n3")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"preset": "no-such-preset"}, "unknown preset"),
        ({"interval": 60}, "exceeds"),
        ({"interval": 0}, "interval must be"),
        ({"eta": 1.0}, "differs from preset"),
        ({"recipe": "magic"}, "recipe must be"),
        ({"schedule": "zigzag"}, "unknown schedule"),
        ({"sampler": "euler"}, "sampler must be"),
        ({"bits": "w9"}, "bits must look like"),
        ({"metric": "clip"}, "CLIP score"),
        ({"calibration": 1}, ">= 2"),
        ({"steps": 6}, "7 timesteps for steps=6"),
    ],
)
def test_bad_rows_are_refused(change, message):
    demo = row_named("demo")
    with pytest.raises(ConfigError, match=message):
        PaperRow(**(dataclasses.asdict(demo) | {"paper": demo.paper} | change))


def test_list_shows_every_row_with_the_paper_numbers(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for row in ROWS:
        line = next(line for line in out.splitlines() if line.startswith(f"| {row.name} "))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == row.preset and cells[5] == str(row.interval) and cells[8] == str(row.calibration)
        for value in (row.paper.speedup, row.paper.fid):
            assert value is None or f"{value}" in cells[-1]
        if all(v is None for v in (row.paper.speedup, row.paper.fid, row.paper.clip_delta)):
            assert cells[-1] == "not known"
        assert f"- {row.name}: " in out  # the source of its numbers


def test_real_rows_refuse_missing_inputs(tmp_path, capsys):
    cases = [
        (["reproduce", "imagenet-n5"], "pass --weights"),
        (["reproduce", "imagenet-n5", "--weights", "w.ckpt"], "pass --ref"),
        (["reproduce", "sd-n5", "--weights", "w.ckpt"], "pass --num"),
        (["reproduce", "sd-n5", "--weights", "w.ckpt", "--num", "8"], "--clip-weights"),
        (["reproduce", "nope"], "known rows"),
        (["reproduce"], "needs a ROW"),
        (["reproduce", "demo", "--list"], "lists the rows"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _table_value(out: str, quantity: str) -> str:
    line = next(line for line in out.splitlines() if line.startswith(f"| {quantity}"))
    return line.strip("|").split("|")[1].strip()


def _quick_demo_row(monkeypatch) -> PaperRow:
    quick = dataclasses.replace(row_named("demo"), steps=8, interval=4)  # 50 steps take minutes here
    monkeypatch.setattr(paper_rows, "ROWS", (quick,))
    return quick


def _refuse_parsing(*args, **kwargs):
    raise AssertionError("cq reproduce parsed a command line again")


def test_reproduce_builds_its_rows_without_parsing_command_lines(tmp_path, capsys, monkeypatch):
    _quick_demo_row(monkeypatch)
    out = tmp_path / "run"
    args = build_parser().parse_args(["reproduce", "demo", "-n", "4", "--calib", "4", "--out", str(out)])
    monkeypatch.setattr(parser, "build_parser", _refuse_parsing)
    for method in ("parse_args", "parse_known_args", "parse_intermixed_args"):
        monkeypatch.setattr(argparse.ArgumentParser, method, _refuse_parsing)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    for quantity in ("MAC speedup", "digits FID", "IS analogue", "PSNR vs full precision, mean", "settings"):
        assert _table_value(printed, quantity)
    assert read_samples(out / "samples")[0].shape[0] == 4


def test_demo_row_end_to_end_at_tiny_sizes(tmp_path, capsys, monkeypatch):
    quick = _quick_demo_row(monkeypatch)
    out = tmp_path / "run"
    argv = ["reproduce", "demo", "--num", "12", "--calib", "4", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    speedup = float(_table_value(printed, "MAC speedup").rstrip("x"))
    assert 1 < speedup < quick.interval  # a cached step still runs the shallow path
    fid = float(_table_value(printed, "digits FID"))
    mean_db = float(_table_value(printed, "PSNR vs full precision, mean").split()[0])
    worst_db = float(_table_value(printed, "PSNR vs full precision, worst").split()[0])
    assert math.isfinite(fid) and fid > 0 and worst_db <= mean_db
    assert _table_value(printed, "settings") == "12 samples, 4 calibration"
    settings = cq.load(out / "model.cq").sampler_settings  # fitted on the row's sampler and steps
    assert (settings.sampler, settings.steps) == (quick.sampler, quick.steps)
    images, seeds, _ = read_samples(out / "samples")
    assert images.shape == (12, 16, 16, 1) and images.dtype == np.uint8 and list(seeds) == sorted(seeds)
    # the table's FID is cq eval's on the same samples
    assert main(["eval", str(out / "samples"), "--extractor", "digits", "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["fid"] == pytest.approx(fid, abs=5e-4)
    capsys.readouterr()
    # finished steps are reused; a folder of another run is refused
    assert main(argv) == 0
    assert re.search(r"fit: reusing .*model.cq", capsys.readouterr().out)
    assert main(["reproduce", "demo", "--num", "10", "--calib", "4", "--out", str(out)]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err
    assert Path(out / "run.json").exists()
